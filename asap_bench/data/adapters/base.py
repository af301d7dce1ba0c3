"""What every dataset adapter shares: reading the official files, writing the manifest.

An adapter reads one dataset's official download (``--source``) and returns the
rows of each table of its card. Raw files MONAI reads (NIfTI) are referenced in
place through one symbolic link per dataset, ``<root>/<dataset>/source``, so the
manifest holds paths like ``source/Task06_Lung/imagesTr/lung_001.nii.gz`` that do
not depend on where the download lives (and the data fingerprint does not
either). Files in other formats are converted into ``images/`` and ``masks/``
beside the tables, named by case id, as the demo cohort does.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from ..cards import load_card

SOURCE_LINK = "source"
PREPARED = "prepared.json"


class PrepareError(ValueError):
    """The source folder does not hold what the official layout promises; names the path and what was expected."""


@dataclass
class Context:
    """One prepare run: the raw download, the dataset's output folder, and adapter options."""

    dataset: str
    source: Path
    out: Path  # <root>/<dataset>
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.out.parent

    def find(self, *candidates: str, kind: str = "file") -> Path:
        """The first of ``candidates`` (paths relative to the source) that exists; else a clear error."""
        for relative in candidates:
            path = self.source / relative
            if (path.is_file() if kind == "file" else path.is_dir()):
                return path
        raise PrepareError(f"{self.source}: expected {kind} {' or '.join(repr(c) for c in candidates)} "
                           f"of the official {self.dataset} layout (see `asap-bench datasets show {self.dataset}`)")

    def glob(self, pattern: str, what: str) -> list[Path]:
        found = sorted(p for p in self.source.glob(pattern))
        if not found:
            raise PrepareError(f"{self.source}: no {what} matching {pattern!r} "
                               f"(see `asap-bench datasets show {self.dataset}` for the layout)")
        return found

    def ref(self, path: Path) -> str:
        """Manifest path of a raw file referenced in place (through the ``source`` link)."""
        try:  # as found under the source, even where the download itself links elsewhere
            relative = Path(os.path.normpath(path.absolute())).relative_to(os.path.normpath(self.source.absolute()))
        except ValueError:
            relative = path.resolve().relative_to(self.source.resolve())
        return f"{SOURCE_LINK}/{relative.as_posix()}"

    def image_path(self, case_id: str) -> tuple[str, Path]:
        rel = f"images/{safe_name(case_id)}.nii.gz"
        return rel, self.out / rel

    def mask_path(self, case_id: str) -> tuple[str, Path]:
        rel = f"masks/{safe_name(case_id)}.nii.gz"
        return rel, self.out / rel

    def reuse(self, path: Path) -> bool:
        """True when a converted file is already there and the run may keep it (``--resume``)."""
        return bool(self.options.get("resume")) and path.is_file() and path.stat().st_size > 0

    def note(self, message: str) -> None:
        self.notes.append(message)


def safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)


def read_table(path: Path, columns: Iterable[str], sep: str | None = None, **kw) -> pd.DataFrame:
    """A label table with the columns the adapter relies on; names the missing ones."""
    if sep is None:
        sep = "\t" if path.suffix == ".tsv" else ","
    try:
        frame = pd.read_csv(path, sep=sep, **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PrepareError(f"{path}: not a readable table ({err})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing}; found {list(frame.columns)[:30]}")
    return frame


def to_binary(value, path: Path, column: str) -> int | None:
    """0/1 from the spellings label files use (0, 1, 0.0, True, 'False'); None for empty."""
    if value is None or (isinstance(value, float) and pd.isna(value)) or (isinstance(value, str) and not value.strip()):
        return None
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return 1
    if text in ("0", "0.0", "false", "no"):
        return 0
    raise PrepareError(f"{path}: column {column!r} holds {value!r}; expected 0/1 or True/False")


def link_source(ctx: Context) -> None:
    """Point ``<out>/source`` at the raw download (replacing an older link, never a real folder)."""
    link = ctx.out / SOURCE_LINK
    target = ctx.source.resolve()
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():
        raise PrepareError(f"{link} exists and is not a link; it is reserved for the link to the raw download")
    link.symlink_to(target, target_is_directory=True)


def write_tables(ctx: Context, rows: dict[str, list[dict]]) -> dict[str, int]:
    """One CSV per card table, in the card's column order; every declared column must be filled by the adapter."""
    card = load_card(ctx.dataset)
    counts = {}
    for name, table in card.tables.items():
        records = rows.get(name)
        if not records:
            raise PrepareError(f"{ctx.source}: no {ctx.dataset} cases found for table {name!r}")
        frame = pd.DataFrame(records)
        columns = table.columns()
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise RuntimeError(f"adapter {ctx.dataset}/{name} did not fill column(s) {missing}")
        if table.survival is not None:
            for column in table.survival.horizons:
                frame[column] = frame[column].astype("Int64")
        for labels in table.labels.values():
            for column in labels.columns:
                frame[column] = frame[column].astype("Int64")
        frame = frame[columns].sort_values("case_id", kind="stable")
        path = ctx.out / f"{name}.csv"
        tmp = path.with_name(f".{path.name}.tmp")
        frame.to_csv(tmp, index=False, lineterminator="\n")
        tmp.replace(path)
        counts[name] = len(frame)
    return counts


def write_prepared(ctx: Context, counts: dict[str, int]) -> None:
    info = {"dataset": ctx.dataset, "source": str(ctx.source.resolve()), "tables": counts, "notes": ctx.notes,
            "options": {k: v for k, v in ctx.options.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    (ctx.out / PREPARED).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


Prepare = Callable[[Context], dict[str, list[dict]]]


@dataclass(frozen=True)
class Adapter:
    """One dataset's reader of its official layout."""

    name: str
    prepare: Prepare | None  # None: no public download (bring your own manifest)
    formats: str  # what it reads, and what it converts
    needs: tuple[str, ...] = ()  # optional Python packages it imports
    options: tuple[str, ...] = ()  # the --set keys it reads
