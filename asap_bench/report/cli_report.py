"""``asap-bench report``: quoted paper numbers and/or measured run records as tables.

Run records are aggregated per source: records of the synthetic demo cohort
become source ``demo``, real ones ``runs``, so the two are never averaged
together and a table that shows both labels every row. Significance comes from
``stats.best_other`` once per table (its Holm correction runs over one table's
settings, as a caption states), comparing each setting's best encoder with the
runner-up: the dagger of a paper-style table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from .tables import ALPHA, FORMATS, PROTOCOL_TABLE, filter_frame, render, with_chance

SOURCES = ("runs", "paper", "both")
DEFAULT_RECORDS = Path("results") / "runs"


def _run_frames(records_dirs: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records, aggregated) for the run records under ``records_dirs``, source column set."""
    from ..results.store import load_records
    from ..stats import aggregate

    dirs = [Path(d) for d in records_dirs] or [DEFAULT_RECORDS]
    absent = [str(d) for d in dirs if not d.exists()]
    if absent:
        raise FileNotFoundError(f"no such record folder(s): {', '.join(absent)}")
    records = load_records(dirs)
    if "source" in records:
        records = records[records["source"] != "paper"]  # quoted numbers come from results/paper only
    if records.empty:
        raise ValueError(f"no result records found under {', '.join(map(str, dirs))}; run `asap-bench run` first")
    synthetic = records["synthetic"] if "synthetic" in records else pd.Series(False, index=records.index)
    records = records.assign(source=["demo" if s is True or s == 1 else "runs" for s in synthetic])
    parts = []
    for source, rows in records.groupby("source", sort=True):
        agg = aggregate(rows)
        if not agg.empty:
            parts.append(agg.assign(source=source))
    if not parts:
        raise ValueError("the result records hold no successful job with a metric (all failed?)")
    columns = ["encoder", "protocol", "regime", "metric", "mean", "std", "n_seeds", "n_undefined", "source"]
    aggregated = pd.concat(parts, ignore_index=True)
    return records, with_chance(aggregated[[c for c in columns if c in aggregated]], records)


def missing_cells(records: pd.DataFrame, shown: pd.DataFrame | None = None) -> list[str]:
    """Every (encoder, protocol, regime) cell of ``shown`` (default: all) the report cannot fill, a line each.

    Within a data source, every encoder is expected to have every (protocol, regime) that any
    encoder has, with every seed that any encoder ran for that protocol in ``records``
    (``stats.completeness``); ``shown`` is the part of ``records`` the report's filters keep.
    """
    from ..stats import completeness

    shown = records if shown is None else shown
    expected = {key: sorted(int(s) for s in rows["seed"].unique())
                for key, rows in records.groupby(["source", "protocol"], sort=True)}
    lines = []
    for source, rows in shown.groupby("source", sort=True):
        encoders = sorted(rows["encoder"].unique())
        for protocol, sub in rows.groupby("protocol", sort=True):
            seeds = expected[(source, protocol)]
            table = completeness(sub, seeds, all_cells=True)
            for encoder in encoders:  # an encoder with no record of this protocol at all
                if encoder not in set(table["encoder"]):
                    for regime in sorted(sub["regime"].unique()):
                        lines.append(f"{source}: {encoder} {protocol} regime {regime:g}: no records")
            for row in table[~table["complete"]].itertuples():
                lines.append(f"{source}: {row.encoder} {row.protocol} regime {row.regime:g}: {row.problems}")
    return lines


def _significance(records: pd.DataFrame, shown: pd.DataFrame, alpha: float) -> pd.DataFrame | None:
    """Best vs runner-up per setting, tested once per table so Holm runs over that table's settings."""
    from ..stats import best_other

    frames = []
    for source, rows in records.groupby("source", sort=True):
        cells = shown[shown["source"] == source]
        if cells.empty:
            continue
        for _, table in cells.groupby(cells["protocol"].map(lambda p: PROTOCOL_TABLE.get(p, p.split("/")[0]))):
            subset = rows[rows["protocol"].isin(set(table["protocol"])) & rows["encoder"].isin(set(table["encoder"]))
                          & rows["regime"].round(6).isin(set(table["regime"].round(6)))]
            result = best_other(subset, metrics=sorted(set(table["metric"])), alpha=alpha, only_best=True)
            if not result.empty:
                frames.append(result)
    return pd.concat(frames, ignore_index=True) if frames else None


def _write(text: str, out: str | Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _compare(pair: str, records_dirs, source: str, fmt: str, metric, family, regime, encoders, out, paper_dir,
             alpha: float, figures) -> str:
    """The across-settings comparison of two encoders, one block per data source."""
    from .compare import compare_command

    frames: dict[str, pd.DataFrame] = {}
    paper = None
    if source in ("paper", "both"):
        from ..results.paper import paper_frame

        paper = paper_frame(paper_dir)
        frames["paper"] = filter_frame(paper, metric=metric, family=family, regime=regime)
    if source in ("runs", "both"):
        _, aggregated = _run_frames(records_dirs)
        for name, rows in aggregated.groupby("source", sort=True):
            frames[str(name)] = filter_frame(rows, metric=metric, family=family, regime=regime)
    names = [e.strip() for e in str(encoders).split(",") if e.strip()] if encoders else None
    text, notes = compare_command(frames, pair, fmt="json" if fmt == "json" else "text", encoders=names,
                                  alpha=alpha, figures=figures, paper=paper)
    if notes:
        sys.stderr.write("\n".join(notes) + "\n")
    _write(text, out)
    return text


def report_command(records_dirs: Sequence[str | Path] = (), source: str = "runs", fmt: str = "latex",
                   metric: str | None = None, family: str | None = None, regime: str | None = None,
                   encoders: str | None = None, out: str | Path | None = None, *,
                   paper_dir: str | Path | None = None, significance: bool = True, alpha: float = ALPHA,
                   figures: str | Path | None = None, compare: str | None = None) -> str:
    """Render the tables and write them to ``out`` (or stdout); returns the text.

    ``source``: "runs" (records under ``records_dirs``, default results/runs), "paper"
    (results/paper of the checkout, or ``paper_dir``), or "both" side by side, labelled.
    ``metric``, ``family``, ``regime`` and ``encoders`` take comma-separated values;
    ``metric`` "all" shows every metric, default the paper's (or the primary) one;
    ``regime`` takes fractions or percentages (0.01 or 1%). ``fmt`` "html" writes the
    leaderboard page (default results/report/leaderboard.html); ``figures`` names a
    folder for the figures (PNG and PDF). ``compare`` ("A,B") prints the across-settings
    comparison of two encoders instead (``report.compare``; ``fmt`` "json" as JSON).
    """
    fmt = {"md": "markdown", "tex": "latex"}.get(fmt, fmt)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if fmt not in (*FORMATS, "html"):
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join((*FORMATS, 'html'))}")
    if family is not None:
        from ..protocol import FAMILIES

        unknown = [f for f in str(family).split(",") if f.strip() and f.strip() not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown family {unknown}; expected one of {', '.join(FAMILIES)}")

    if compare is not None:
        return _compare(compare, records_dirs, source, fmt, metric, family, regime, encoders, out, paper_dir,
                        alpha, figures)
    frames: list[pd.DataFrame] = []
    sig = None
    records = None
    if source in ("paper", "both"):
        from ..results.paper import paper_frame

        frames.append(paper_frame(paper_dir))
    if source in ("runs", "both"):
        records, aggregated = _run_frames(records_dirs)
        frames.append(aggregated)
        gaps = missing_cells(records, filter_frame(records, metric="all", family=family, regime=regime,
                                                   encoders=encoders))
        if gaps:  # an empty or partial cell is named, never dropped from a table in silence
            shown_gaps = gaps[:50] + ([f"... and {len(gaps) - 50} more"] if len(gaps) > 50 else [])
            sys.stderr.write(f"{len(gaps)} incomplete cell(s) (shown as '--' or over fewer seeds):\n  "
                             + "\n  ".join(shown_gaps) + "\n")
        if significance:
            shown = filter_frame(aggregated, metric=metric, family=family, regime=regime, encoders=encoders)
            sig = _significance(records, shown, alpha) if not shown.empty else None
    frame = pd.concat(frames, ignore_index=True)
    if figures is not None:
        from .plots import make_figures

        notes: list[str] = []
        shown = filter_frame(frame, metric=metric, family=family, regime=regime, encoders=encoders)
        written = make_figures(shown, Path(figures), notes=notes)
        sys.stderr.write(f"{len(written)} figure files under {figures}" + "".join(f"\n  {n}" for n in notes) + "\n")
    if fmt == "html":
        from .html import provenance_from_records, render_html

        shown = filter_frame(frame, metric=metric, family=family, regime=regime, encoders=encoders)
        page = Path(out) if out is not None else Path("results") / "report" / "leaderboard.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        render_html(shown, sig, page, provenance=provenance_from_records(records) if records is not None else None)
        sys.stdout.write(f"leaderboard page written to {page}\n")
        return str(page)
    text = render(frame, fmt, sig, metric=metric, family=family, regime=regime, encoders=encoders, alpha=alpha)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return text
