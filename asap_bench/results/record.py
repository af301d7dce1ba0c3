"""The result record: one JSON file per job, the unit every report is built from.

A record holds the job's metrics, its status (ok, or failed with the error),
timings, and the provenance that makes every number traceable: protocol,
split, encoder, checkpoint and data fingerprints, and the software it ran on.
Per-unit outputs (per case, per label) go to a sidecar file beside it, for
paired tests. Both are written atomically, sidecar first, so an existing
record always means a complete job; the record carries its sidecar's sha256,
so a sidecar left by an interrupted rewrite is never read as this record's.

A result, once ok, is only ever replaced by another ok one: a failed rerun is
recorded beside it (``r<ratio>_s<seed>.failed.json``) and that file goes when
an ok result replaces the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .. import __version__, files
from ..schema import StrictModel

SCHEMA_VERSION = 1
UNITS_SUFFIX = ".units.json"
FAILED_SUFFIX = ".failed.json"


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
    input_fit: str | None = None  # how that input was fitted to the encoder (pad, crop, rebuild, position table)
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
    units_sha256: str | None = None  # the sidecar's sha256 when written; absent in records of older versions
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
    """A record-layer file (record, sidecar, bundle metadata), flushed to disk before it replaces the old one."""
    files.write_atomic(path, text, sync=True)


def sidecar_path(path: Path) -> Path:
    """Where the record at ``path`` keeps its per-unit outputs."""
    return Path(path).with_name(Path(path).stem + UNITS_SUFFIX)


def failed_path(path: Path) -> Path:
    """Where a failed rerun of the job at ``path`` is recorded while an ok record is there."""
    return Path(path).with_name(Path(path).stem + FAILED_SUFFIX)


def record_of_sidecar(sidecar: Path) -> Path:
    return Path(sidecar).with_name(Path(sidecar).name[: -len(UNITS_SUFFIX)] + ".json")


def _ok_record_at(path: Path) -> bool:
    try:
        return read_record(path).status == "ok"
    except (OSError, ValueError):
        return False


def write_record(path: Path, record: ResultRecord, units: dict[str, Any] | None = None) -> Path:
    """Record a job; returns the file written.

    An ok result: sidecar first, then the record (with the sidecar's sha256), then the
    failed sibling and any sidecar it no longer uses go. A failed result never replaces
    an ok record nor touches its sidecar: it is written beside it. With no ok record
    there, it takes the record's place and clears what an earlier attempt left.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    if record.status != "ok":
        if _ok_record_at(path):
            write_atomic(failed_path(path), record.model_dump_json(indent=1) + "\n")
            return failed_path(path)
        write_atomic(path, record.model_dump_json(indent=1) + "\n")
        _remove(sidecar, failed_path(path))
        return path
    if units is not None:
        text = json.dumps(units, sort_keys=True) + "\n"
        write_atomic(sidecar, text)
        record = record.model_copy(update={"units_file": sidecar.name,
                                           "units_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()})
    write_atomic(path, record.model_dump_json(indent=1) + "\n")
    _remove(failed_path(path), *([] if units is not None else [sidecar]))
    return path


def _remove(*paths: Path) -> None:
    for stale in paths:
        stale.unlink(missing_ok=True)


def read_record(path: Path) -> ResultRecord:
    return ResultRecord.model_validate_json(Path(path).read_text(encoding="utf-8"))


def check_units(sidecar: Path, data: bytes, record: ResultRecord) -> None:
    """Raise unless ``data`` (read from ``sidecar``) is the sidecar ``record`` was written with."""
    if record.units_sha256 is not None and hashlib.sha256(data).hexdigest() != record.units_sha256:
        raise ValueError(f"units sidecar {sidecar} is not the one its record was written with (sha256 differs: "
                         "a rewrite of the job was interrupted); rerun the job")


def units_intact(path: Path, record: ResultRecord) -> bool:
    """Whether the record's sidecar (if it has one) is there and is the one it was written with."""
    if record.units_file is None:
        return True
    sidecar = Path(path).parent / record.units_file
    try:
        check_units(sidecar, sidecar.read_bytes(), record)
    except (OSError, ValueError):
        return False
    return True


def read_units(path: Path, record: ResultRecord) -> dict[str, Any] | None:
    if record.units_file is None:
        return None
    sidecar = Path(path).parent / record.units_file
    data = sidecar.read_bytes()
    check_units(sidecar, data, record)
    return json.loads(data.decode("utf-8"))


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and write and remove a file in it; raises OSError where that fails."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-probe-{os.getpid()}"
    write_atomic(probe, "probe\n")
    probe.unlink()
