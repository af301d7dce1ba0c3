"""The numbers the ASAP paper reports (Tables II-VII), quoted as printed.

They live in ``results/paper/table-<n>.json`` at the repository root, one file per
table, each entry marked ``source: "paper"`` and given in percent, as the paper
prints them. They are reference values, not measurements: no per-case outputs,
no provenance beyond the table they come from, and the paper's significance
daggers are copied, not recomputed.

A wheel carries them as package data (``results/`` itself is not packaged: it also
holds users' run records); ``ASAP_BENCH_PAPER_RESULTS`` or an explicit ``root``
points elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from ..schema import SchemaError, StrictModel

PAPER = "ASAP, arXiv:2606.00602"
TABLES = ("II", "III", "IV", "V", "VI", "VII")
ENV_VAR = "ASAP_BENCH_PAPER_RESULTS"

TableId = Literal["II", "III", "IV", "V", "VI", "VII"]

# The paper's one across-task test, as it states it (Sec. 4.2.7, "Overall improvements"):
# a paired Wilcoxon signed-rank test of ASAP against SimCroP "across task categories".
# It names neither the units nor n; ``report --compare asap,simcrop --source paper`` recomputes it.
ACROSS_TASKS_CLAIM = {
    "a": "asap", "b": "simcrop", "p": 6.72e-7, "test": "paired Wilcoxon signed-rank test",
    "where": "Sec. 4.2.7 (Discussion, 'Overall improvements', Fig. 5)",
}


class PaperEntry(StrictModel):
    """One printed cell: mean (and std where printed) in percent, and the paper's dagger."""

    source: Literal["paper"]
    table: TableId
    encoder: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    protocol: str = Field(pattern=r"^[a-z]+/[a-z0-9-]+$")
    regime: float = Field(gt=0, le=1)
    metric: str = Field(min_length=1)
    mean: float = Field(ge=0, le=100)
    std: float | None = Field(ge=0)  # None where the paper prints none (Table VII)
    dagger: bool = False


class PaperTable(StrictModel):
    """One table of the paper: what it shows and every cell it prints."""

    source: Literal["paper"]
    paper: str = PAPER
    table: TableId
    title: str
    quoted: str  # the statement that these are quoted numbers
    significance: str | None = None  # what the paper's dagger means, in its words; None: no daggers
    unit: Literal["percent"]
    entries: list[PaperEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "PaperTable":
        seen: set[tuple] = set()
        for entry in self.entries:
            if entry.table != self.table:
                raise ValueError(f"entry {entry.encoder} {entry.protocol} is marked table {entry.table}, "
                                 f"inside table {self.table}")
            key = (entry.encoder, entry.protocol, entry.regime, entry.metric)
            if key in seen:
                raise ValueError(f"duplicate entry {key}")
            seen.add(key)
        if self.significance is None and any(e.dagger for e in self.entries):
            raise ValueError("entries carry daggers but the table states no significance test")
        return self


def paper_dir(root: Path | str | None = None) -> Path:
    """The folder of the quoted tables: ``root``, ``$ASAP_BENCH_PAPER_RESULTS``, or the shipped one."""
    if root is None and not os.environ.get(ENV_VAR):
        from ..resources import resource_dir

        return resource_dir("paper")
    candidate = Path(root) if root is not None else Path(os.environ[ENV_VAR])
    if not candidate.is_dir():
        raise FileNotFoundError(f"the paper's reference numbers were not found at {candidate} "
                                f"({'root' if root is not None else ENV_VAR})")
    return candidate


def load_paper_table(path: Path | str) -> PaperTable:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SchemaError(path, [("<json>", f"not valid JSON at line {err.lineno}: {err.msg}")]) from None
    try:
        return PaperTable.model_validate(data)
    except ValidationError as err:
        raise SchemaError(path, [(".".join(map(str, e["loc"])) or "<root>", e["msg"]) for e in err.errors()]) from None


def load_paper_tables(root: Path | str | None = None) -> dict[str, PaperTable]:
    """Every quoted table, keyed by its roman numeral, in the paper's order."""
    folder = paper_dir(root)
    tables: dict[str, PaperTable] = {}
    for path in sorted(folder.glob("*.json")):
        table = load_paper_table(path)
        if table.table in tables:
            raise SchemaError(path, [("table", f"table {table.table} is defined twice")])
        tables[table.table] = table
    return {t: tables[t] for t in TABLES if t in tables}


def paper_frame(root: Path | str | None = None, tables: list[str] | None = None):
    """The quoted numbers as an aggregated frame, the shape the report renders.

    Columns: encoder, protocol, regime, metric, mean, std, n_seeds, source ("paper"),
    table, dagger. n_seeds is 5 where the paper prints a std (it states five seeds)
    and missing where it prints none.
    """
    import pandas as pd

    rows = []
    for tag, table in load_paper_tables(root).items():
        if tables is not None and tag not in tables:
            continue
        for e in table.entries:
            rows.append({"encoder": e.encoder, "protocol": e.protocol, "regime": e.regime, "metric": e.metric,
                         "mean": e.mean, "std": e.std, "n_seeds": 5 if e.std is not None else None,
                         "source": "paper", "table": tag, "dagger": e.dagger})
    columns = ["encoder", "protocol", "regime", "metric", "mean", "std", "n_seeds", "source", "table", "dagger"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["n_seeds"] = frame["n_seeds"].astype("Int64")
    frame["std"] = frame["std"].astype(float)
    return frame
