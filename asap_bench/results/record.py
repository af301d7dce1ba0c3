"""The result record: one JSON file per job, the unit every report is built from.

A record holds the job's metrics, its status (ok, or failed with the error),
timings, and the provenance that makes every number traceable: protocol,
split, encoder, checkpoint and data fingerprints, and the software it ran on.
Per-unit outputs (per case, per label) go to a sidecar file beside it, for
paired tests. Both are written atomically, sidecar first, so an existing
record always means a complete job.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .. import __version__
from ..schema import StrictModel

SCHEMA_VERSION = 1


class Provenance(StrictModel):
    """Where a number came from. Fields a failed job never reached stay None."""

    protocol_id: str
    protocol_version: int
    protocol_fingerprint: str
    split_sha256: str | None = None
    encoder: str
    encoder_variant: str
    encoder_fingerprint: str | None = None
    checkpoint_sha256: str | None = None  # None for random initialisation
    dataset: str
    table: str
    manifest_sha256: str | None = None
    data_fingerprint: str | None = None
    synthetic: bool | None = None  # True on the demo cohort; such results never mix with real ones
    target_dataset: str | None = None  # external validation
    target_data_fingerprint: str | None = None
    input_spec: dict[str, Any] | None = None  # the preprocessing the encoder was fed
    feature_key: str | None = None
    text_model: str | None = None
    text_model_sha256: str | None = None
    software: dict[str, str | None]  # asap-bench version and git commit, python, torch, monai, ...
    device: str


class Timing(StrictModel):
    started: str
    finished: str
    seconds: float
    stages: dict[str, float] = Field(default_factory=dict)


class ResultRecord(StrictModel):
    """One job: encoder x protocol x regime x seed."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_key: str  # hash of everything the result depends on; a record with another key is stale
    encoder: str
    protocol: str
    family: str
    regime: float
    seed: int
    status: Literal["ok", "failed"]
    error: str | None = None
    metrics: dict[str, float | None] = Field(default_factory=dict)  # None: not computable, see notes
    notes: dict[str, str] = Field(default_factory=dict)
    selected: dict[str, Any] = Field(default_factory=dict)  # hyper-parameters chosen on validation
    sizes: dict[str, int] = Field(default_factory=dict)  # cases used: train / val / test
    units_file: str | None = None  # sidecar with per-unit outputs, relative to the record
    provenance: Provenance
    timing: Timing


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def software() -> dict[str, str | None]:
    """Versions every record carries; the git commit when running from a checkout."""
    import monai
    import numpy
    import sklearn
    import torch

    commit = None
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"asap_bench": __version__, "git_commit": commit, "python": platform.python_version(),
            "torch": torch.__version__, "monai": monai.__version__, "numpy": numpy.__version__,
            "scikit_learn": sklearn.__version__, "platform": platform.platform()}


def write_atomic(path: Path, text: str) -> None:
    """Write through a temp file in the same folder and rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: Path, record: ResultRecord, units: dict[str, Any] | None = None) -> None:
    """Sidecar first, record last: the record's presence marks the job complete."""
    if units is not None:
        sidecar = path.with_name(path.stem + ".units.json")
        write_atomic(sidecar, json.dumps(units, sort_keys=True) + "\n")
        record = record.model_copy(update={"units_file": sidecar.name})
    write_atomic(path, record.model_dump_json(indent=1) + "\n")


def read_record(path: Path) -> ResultRecord:
    return ResultRecord.model_validate_json(Path(path).read_text(encoding="utf-8"))


def read_units(path: Path, record: ResultRecord) -> dict[str, Any] | None:
    if record.units_file is None:
        return None
    return json.loads((Path(path).parent / record.units_file).read_text(encoding="utf-8"))


