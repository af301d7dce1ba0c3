"""Result records as one pandas frame: the table every aggregate, test and report reads.

One row per (record, metric). A failed record keeps one row with ``metric`` None,
so a completeness check sees the job; a record whose metric could not be computed
keeps its row with ``value`` NaN. A failed rerun recorded beside an ok record
(``*.failed.json``) is not read: the ok result stands. Files that cannot be read are
never dropped silently: they are logged and listed in ``frame.attrs["problems"]``.
"""

from __future__ import annotations

import json
import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .record import FAILED_SUFFIX, UNITS_SUFFIX, ResultRecord, check_units, read_record, record_of_sidecar

log = logging.getLogger(__name__)

COLUMNS = ["source", "encoder", "protocol", "family", "regime", "seed", "metric", "value", "status",
           "protocol_fingerprint", "encoder_fingerprint", "synthetic", "path",
           # beyond the core: where the per-unit outputs are, and what a failure said
           "units_path", "error", "finished"]


def record_files(paths_or_dirs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Record files under the given files and folders (recursively), sidecars and hidden temp files left out.

    A failed rerun's file beside an ok record is left out too; alone, it is the job's record.
    """
    if isinstance(paths_or_dirs, (str, Path)):
        paths_or_dirs = [paths_or_dirs]
    found: list[Path] = []
    for entry in paths_or_dirs:
        entry = Path(entry)
        if entry.is_dir():
            found.extend(p for p in sorted(entry.rglob("*.json"))
                         if not p.name.endswith(UNITS_SUFFIX) and not p.name.startswith(".")
                         and not (p.name.endswith(FAILED_SUFFIX) and _beside_record(p)))
        else:
            found.append(entry)
    seen, unique = set(), []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _beside_record(failed: Path) -> bool:
    return failed.with_name(failed.name[: -len(FAILED_SUFFIX)] + ".json").is_file()


def record_rows(record: ResultRecord, path: Path) -> list[dict[str, Any]]:
    """The frame rows of one record."""
    prov = record.provenance
    units_path = str(Path(path).parent / record.units_file) if record.units_file else None
    base = {"source": "run", "encoder": record.encoder, "protocol": record.protocol, "family": record.family,
            "regime": float(record.regime), "seed": int(record.seed), "status": record.status,
            "protocol_fingerprint": prov.protocol_fingerprint, "encoder_fingerprint": prov.encoder_fingerprint,
            "synthetic": bool(prov.synthetic) if prov.synthetic is not None else None, "path": str(path),
            "units_path": units_path, "error": record.error, "finished": record.timing.finished}
    if record.status == "failed" or not record.metrics:
        return [base | {"metric": None, "value": math.nan}]
    return [base | {"metric": name, "value": math.nan if value is None else float(value)}
            for name, value in sorted(record.metrics.items())]


def load_records(paths_or_dirs: str | Path | Iterable[str | Path], *, strict: bool = False) -> pd.DataFrame:
    """Every record under the given paths as a frame with ``COLUMNS``.

    A file that is not a valid record is logged and listed in ``frame.attrs["problems"]``
    as ``(path, message)``; with ``strict`` it raises instead.
    """
    rows: list[dict[str, Any]] = []
    problems: list[tuple[str, str]] = []
    for path in record_files(paths_or_dirs):
        try:
            record = read_record(path)
        except Exception as error:  # unreadable, not JSON, wrong schema: reported, never dropped silently
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            if strict:
                raise ValueError(f"{path}: not a readable result record ({message})") from error
            log.warning("skipping %s: %s", path, message)
            problems.append((str(path), message))
            continue
        rows.extend(record_rows(record, path))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame = frame.astype({"regime": float, "value": float})
    if len(frame):
        frame["seed"] = frame["seed"].astype(int)
    frame.attrs["problems"] = problems
    return frame


@lru_cache(maxsize=256)
def _units_cached(path: str, mtime_ns: int, record_path: str | None, record_mtime_ns: int) -> dict[str, Any]:
    data = Path(path).read_bytes()
    if record_path is not None:
        check_units(Path(path), data, read_record(Path(record_path)))
    return json.loads(data.decode("utf-8"))


def load_units(units_path: str | Path | None) -> dict[str, Any] | None:
    """A record's per-unit outputs (cached while both files are unchanged); None when it has none.

    Checked against the sha256 its record carries, so a sidecar left by an interrupted
    rewrite of the job is refused rather than paired with another run's numbers.
    """
    if units_path is None or (isinstance(units_path, float) and math.isnan(units_path)):
        return None
    path = Path(units_path)
    if not path.exists():
        raise FileNotFoundError(f"units sidecar {path} is missing; its record cannot be paired")
    owner = record_of_sidecar(path) if path.name.endswith(UNITS_SUFFIX) else None
    if owner is None or not owner.is_file():
        return _units_cached(str(path), path.stat().st_mtime_ns, None, 0)
    return _units_cached(str(path), path.stat().st_mtime_ns, str(owner), owner.stat().st_mtime_ns)
