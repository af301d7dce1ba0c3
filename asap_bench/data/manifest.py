"""Manifests: the one on-disk format every dataset is read through, demo or real.

A prepared data root holds one folder per dataset and one CSV per table of its
card (``<root>/<dataset>/<table>.csv``). ``load_manifest`` reads a table,
checks it against the card, and returns a ``Manifest`` whose content hash keys
every cache and split built from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

import pandas as pd

from .cards import SPLIT_VALUES, DatasetCard, Table, load_card

# Identifier and text columns stay strings; label columns are parsed as numbers.
_STRING_COLUMNS = ("case_id", "patient_id", "image", "mask", "split", "qa_type", "question", "answer")


class ManifestError(ValueError):
    """A manifest that does not match its card; names the file, column and rows."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in shown))


@dataclass(frozen=True)
class Manifest:
    dataset: str
    table_name: str
    path: Path  # the CSV
    frame: pd.DataFrame = field(repr=False)
    card: DatasetCard = field(repr=False)
    sha256: str = ""

    @property
    def table(self) -> Table:
        return self.card.table(self.table_name)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def synthetic(self) -> bool:
        """True for the generated demo cohort; its results are never mixed with real ones."""
        from .demo import is_demo_root

        return is_demo_root(self.folder.parent)

    def image_path(self, case_id: str) -> Path:
        return self.folder / self.frame.loc[case_id, "image"]

    def mask_path(self, case_id: str) -> Path:
        return self.folder / self.frame.loc[case_id, "mask"]

    def __len__(self) -> int:
        return len(self.frame)


def _row_names(frame: pd.DataFrame, bad: pd.Series) -> str:
    ids = frame.loc[bad, "case_id"].astype(str).tolist() if "case_id" in frame else []
    head = ", ".join(ids[:5]) + (f" (+{len(ids) - 5} more)" if len(ids) > 5 else "")
    return f"{int(bad.sum())} row(s): {head}"


def _check(frame: pd.DataFrame, table: Table) -> list[str]:
    problems: list[str] = []
    expected = table.columns()
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        return [f"missing column(s) {missing}; the card declares {expected}"]
    for column in ("case_id", "patient_id", "image"):
        empty = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if empty.any():
            problems.append(f"column '{column}': empty in {int(empty.sum())} row(s); expected a value in every row")
    duplicated = frame["case_id"].duplicated(keep=False)
    if duplicated.any():
        problems.append(f"column 'case_id': duplicated in {_row_names(frame, duplicated)}; expected unique ids")
    if table.official_split:
        bad = ~frame["split"].isin(SPLIT_VALUES)
        if bad.any():
            problems.append(f"column 'split': not one of {list(SPLIT_VALUES)} in {_row_names(frame, bad)}")
    for name, labels in table.labels.items():
        allowed = set(range(len(labels.classes))) if labels.kind == "multiclass" else {0, 1}
        for column in labels.columns:
            values = pd.to_numeric(frame[column], errors="coerce")
            bad = frame[column].notna() & ~values.isin(allowed)
            if bad.any():
                problems.append(f"column '{column}' (label set '{name}'): expected values {sorted(allowed)} "
                                f"or empty, got {frame.loc[bad, column].unique()[:5].tolist()} in {_row_names(frame, bad)}")
    if table.survival is not None:
        surv = table.survival
        time = pd.to_numeric(frame[surv.time], errors="coerce")
        bad = ~(time >= 0)
        if bad.any():
            problems.append(f"column '{surv.time}': expected a non-negative time in {surv.unit} in {_row_names(frame, bad)}")
        event = pd.to_numeric(frame[surv.event], errors="coerce")
        bad = ~event.isin({0, 1})
        if bad.any():
            problems.append(f"column '{surv.event}': expected 0 or 1 in {_row_names(frame, bad)}")
        for column in surv.horizons:
            values = pd.to_numeric(frame[column], errors="coerce")
            bad = frame[column].notna() & ~values.isin({0, 1})
            if bad.any():
                problems.append(f"column '{column}': expected 1, 0 or empty (censored) in {_row_names(frame, bad)}")
    if table.mask is not None:
        empty = frame["mask"].isna()
        if empty.any():
            problems.append(f"column 'mask': empty in {_row_names(frame, empty)}; every segmentation case needs a mask")
    return problems


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(root: Path | str, dataset: str, table: str = "volumes") -> Manifest:
    """Read ``<root>/<dataset>/<table>.csv`` and check it against the dataset card."""
    card = load_card(dataset)
    spec = card.table(table)
    path = Path(root) / dataset / f"{table}.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest for table {table!r} of dataset {dataset!r}; "
            f"run `asap-bench datasets prepare {dataset}` or point --data-root at a prepared root"
        )
    dtypes = {c: "string" for c in _STRING_COLUMNS}
    try:
        frame = pd.read_csv(path, dtype=dtypes, keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ManifestError(path, [f"not a readable CSV: {err}"]) from None
    problems = _check(frame, spec)
    if problems:
        raise ManifestError(path, problems)
    frame = frame.set_index("case_id", drop=False)
    frame.index.name = None
    return Manifest(dataset, table, path, frame, card, file_sha256(path))


def label_matrix(manifest: Manifest, target: str) -> pd.DataFrame:
    """The label columns of one label set, indexed by case id (NaN where unlabelled)."""
    labels = manifest.table.labels[target]
    return manifest.frame[labels.columns].apply(pd.to_numeric, errors="coerce")


def _referenced_files(manifest: Manifest) -> list[str]:
    columns = [c for c in ("image", "mask") if c in manifest.frame]
    return sorted({f for c in columns for f in manifest.frame[c].dropna().tolist()})


def content_hashing_requested() -> bool:
    """``ASAP_BENCH_HASH_CONTENT=1`` turns on full content hashing wherever a fingerprint is taken."""
    return os.environ.get("ASAP_BENCH_HASH_CONTENT", "").strip().lower() in ("1", "true", "yes", "on")


_SHA256_SEEN: dict[tuple, str] = {}


def _content_sha256(path: Path, stat: os.stat_result) -> str:
    """``file_sha256``, read once per process while the file's inode, size, mtime and ctime stay the same
    (ctime moves on any write or ``utime``, so a rewrite that restores the mtime is read again)."""
    seen = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if seen not in _SHA256_SEEN:
        _SHA256_SEEN[seen] = file_sha256(path)
    return _SHA256_SEEN[seen]


def file_identity(manifest: Manifest, relative: str, content: bool | None = None) -> dict:
    """What a cache entry made from one file is keyed on: its path relative to the dataset folder, size and
    mtime_ns, and its sha256 with content hashing. Copies that keep mtimes (``cp -p``, ``rsync -a``) keep
    the identity; a replaced, touched, truncated or deleted file (size and mtime -1) gets a new one."""
    content = content_hashing_requested() if content is None else content
    path = manifest.folder / relative
    try:
        stat = path.stat()
    except OSError:
        return {"path": relative, "size": -1, "mtime_ns": -1}
    identity = {"path": relative, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if content:
        identity["sha256"] = _content_sha256(path, stat) if S_ISREG(stat.st_mode) else None
    return identity


def files_identity(manifest: Manifest, files: list[str] | None = None, content: bool | None = None) -> str:
    """One hash of the identity of ``files`` (default: every image and mask the manifest references).

    A stat per file. Unlike ``data_fingerprint`` it moves when a file is rewritten with the same
    size, so it belongs in keys that must never serve a result computed from an older file.
    """
    files = _referenced_files(manifest) if files is None else files
    digest = hashlib.sha256(manifest.sha256.encode())
    for relative in files:
        digest.update(json.dumps(file_identity(manifest, relative, content), sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def fingerprint_details(manifest: Manifest, content: bool | None = None) -> dict:
    """What a data fingerprint is made of: the label table's hash and every referenced file with its size
    (and its sha256 when ``content``), by its path relative to the dataset folder, so the record is the
    same wherever the data lives. A missing file has size -1."""
    content = content_hashing_requested() if content is None else content
    files = []
    for relative in _referenced_files(manifest):
        path = manifest.folder / relative
        entry = {"path": relative, "size": path.stat().st_size if path.exists() else -1}
        if content:
            entry["sha256"] = _content_sha256(path, path.stat()) if path.is_file() else None
        files.append(entry)
    return {"dataset": manifest.dataset, "table": manifest.table_name, "label_table_sha256": manifest.sha256,
            "n_rows": len(manifest), "content": content, "files": files}


def data_fingerprint(manifest: Manifest, content: bool | None = None) -> str:
    """The label table's hash plus every referenced file's relative path and size.

    Cheap (a stat per file) and shareable: two groups can show they ran on the same
    data without exchanging it. With ``content`` (or ``ASAP_BENCH_HASH_CONTENT=1``)
    each file's sha256 is folded in too; that reads every byte, and the result is
    marked so it never equals a size-only fingerprint.
    """
    details = fingerprint_details(manifest, content)
    digest = hashlib.sha256(manifest.sha256.encode())
    for entry in details["files"]:
        digest.update(f"{entry['path']}\0{entry['size']}\n".encode())
        if details["content"]:
            digest.update(f"sha256\0{entry['sha256']}\n".encode())
    return digest.hexdigest()
