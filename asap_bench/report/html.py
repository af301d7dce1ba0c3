"""The leaderboard as one static HTML page: sortable, filterable, every number traceable.

The page needs no server and loads nothing from the network (inline CSS and a
small inline script), so it can be opened from disk, attached to a paper's
supplement, or served by any static host.

Why it looks the way it does:

- One row per encoder and source, one column per (protocol, regime, primary
  metric) setting. A measured number and a number quoted from the paper are
  never put in one cell, and every row and cell says which it is.
- Best (bold) and second (underlined) are ranked per column and per source on the
  printed, rounded numbers, so a quoted number never outranks a measured one and
  ties share a mark. A column with a single number marks nothing.
- A dagger comes only from the significance frame (measured rows) or from the
  paper's own marks (quoted rows, the ``dagger`` column of the paper frame).
- Run values are fractions and shown as percent; quoted values are percent
  already; surface distances (HD95) are millimetres and lower is better.
- The table is rendered in full on the server side, so without JavaScript it is
  still complete; the script only sorts, filters and opens provenance details.
- A number that cannot move says so, by the rules of the tables (``report.tables``):
  fewer than two defined seeds print ``(n=1)`` instead of a spread and are ranked only
  against cells of the same n; ``‡`` undefined in some or all seeds (``n/a``), ``§``
  saturated at the metric's bound; a recall@K column states its chance level.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..stats import LOWER_IS_BETTER
from .tables import SATURATED_MARK, UNDEFINED_MARK, count, is_saturated, metric_label, rankable, regime_label

REQUIRED = ("encoder", "protocol", "regime", "metric", "mean", "std", "source")
DEFAULT_TITLE = "asap-bench leaderboard"
PAPER = "ASAP, arXiv:2606.00602"
GROUP_ORDER = ("random", "ssl", "vlp", "other")
UNKNOWN_GROUP = "unknown"
FAMILY_ORDER = ("cls", "seg", "prog", "rg", "voc", "ret", "vqa", "ext")
FAMILY_TITLES = {
    "cls": "Linear-probe classification", "seg": "UNETR segmentation", "prog": "Prognosis",
    "rg": "Report generation", "voc": "Vocabulary classification", "ret": "Volume-report retrieval",
    "vqa": "Visual question answering", "ext": "External validation",
}
SOURCE_LABELS = {
    "paper": "quoted (paper)",
    "demo": "measured (synthetic demo)",
    "run": "measured",
    "runs": "measured",
}


def source_label(source: str) -> str:
    return SOURCE_LABELS.get(str(source), f"measured ({source})")


def is_quoted(source: str) -> bool:
    return str(source) == "paper"


def _paper_tasks() -> dict[str, str]:
    """The paper's short task names, in the paper's column order, where the tables module gives them."""
    try:
        from .tables import TASK_LABELS

        return {str(k): str(v) for k, v in TASK_LABELS.items()}
    except Exception:  # the tables module is optional here; a plain label still identifies the task
        return {}


def task_label(protocol: str) -> str:
    return _paper_tasks().get(protocol) or protocol.split("/", 1)[-1].upper()


def _protocol_rank(protocol: str) -> int:
    order = list(_paper_tasks())
    return order.index(protocol) if protocol in order else len(order)


def _protocol_info(protocol: str) -> tuple[str | None, str]:
    """(primary metric, title) of a shipped protocol; (None, id) for one this install does not know."""
    try:
        from ..protocol import get_protocol

        proto = get_protocol(protocol)
        return proto.primary_metric, proto.title
    except Exception:  # a protocol from a plug-in or an older release still gets a column
        return None, protocol


def card_info(encoder: str) -> dict[str, Any]:
    """What the page shows of an encoder's card; an encoder without a card is still listed."""
    try:
        from ..encoders.registry import get_card

        card = get_card(encoder)
    except Exception:
        return {"name": encoder, "known": False, "label": encoder, "title": encoder, "group": UNKNOWN_GROUP,
                "group_title": "No card", "order": 10**6, "citation": None, "code": None, "status": None,
                "status_why": None, "license": None}
    return {"name": encoder, "known": True, "label": card.table_label, "title": card.title, "group": card.group,
            "group_title": card.group_title, "order": card.order, "citation": card.citation, "code": card.code,
            "status": card.status.level, "status_why": card.status.why, "license": card.license}


def _group_rank(group: str) -> int:
    return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)


def _family_rank(family: str) -> int:
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def _finite(value: Any) -> bool:
    try:
        return value is not None and not pd.isna(value) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def display_value(value: float, metric: str, source: str) -> float:
    """A stored value in the unit the page prints: percent, or millimetres for distances."""
    if metric in LOWER_IS_BETTER or is_quoted(source):
        return float(value)
    return float(value) * 100.0


def _anchor(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "-", str(name))


def where(frame: pd.DataFrame, mask: list[bool]) -> pd.DataFrame:
    """Rows where ``mask`` holds; unlike ``frame[list]``, an empty mask on an empty frame keeps the columns."""
    return frame.loc[pd.Series(mask, index=frame.index, dtype=bool)]


def choose_metrics(aggregated: pd.DataFrame) -> dict[str, str]:
    """The metric shown per protocol: its primary metric (the demo primary, which can move on the demo's small
    pools, where every row is a demo row), or, where the frame lacks it, the most common one."""
    chosen: dict[str, str] = {}
    for protocol, rows in aggregated.groupby("protocol", sort=True):
        demo = "source" in rows and bool((rows["source"].astype(str) == "demo").all())
        primary = _primary_of(str(protocol), synthetic=demo)
        present = rows["metric"].astype(str)
        if primary is not None and (present == primary).any():
            chosen[str(protocol)] = primary
        else:
            counts = present.value_counts()
            chosen[str(protocol)] = sorted(counts.index, key=lambda m: (-counts[m], m in LOWER_IS_BETTER, m))[0]
    return chosen


def _primary_of(protocol: str, synthetic: bool) -> str | None:
    try:
        from ..protocol import get_protocol

        return get_protocol(protocol).primary(synthetic)
    except Exception:  # a protocol this install does not know: the most common metric is shown
        return None


def _marks(values: dict[Any, float], lower_is_better: bool) -> dict[Any, str]:
    """Dense ranks on the printed numbers: 'best' and 'second'; nothing when only one number is there."""
    if len(values) < 2:
        return {}
    printed = {key: round(value, 1) for key, value in values.items()}
    distinct = sorted(set(printed.values()), reverse=not lower_is_better)
    marks = {}
    for key, value in printed.items():
        if value == distinct[0]:
            marks[key] = "best"
        elif len(distinct) > 1 and value == distinct[1]:
            marks[key] = "second"
    return marks


def _significance_index(significance: pd.DataFrame | None) -> dict[tuple, dict[str, Any]]:
    """(encoder, protocol, regime, metric[, source]) -> the significant test's row."""
    index: dict[tuple, dict[str, Any]] = {}
    if significance is None or significance.empty:
        return index
    for row in significance.to_dict("records"):
        if not bool(row.get("significant", False)):
            continue
        key = (str(row["encoder"]), str(row["protocol"]), round(float(row["regime"]), 6), str(row["metric"]))
        source = row.get("source")
        index[key + ((str(source),) if source is not None and not pd.isna(source) else (None,))] = row
    return index


def _sig_lookup(index: dict[tuple, dict[str, Any]], key: tuple, source: str) -> dict[str, Any] | None:
    return index.get(key + (source,)) or index.get(key + (None,))


def _p(value: Any) -> str:
    return f"{float(value):.3g}" if _finite(value) else "n/a"


def _sig_note(row: Mapping[str, Any]) -> str:
    parts = [str(row.get("test") or "paired test")]
    if row.get("unit"):
        parts.append(f"unit: {row['unit']}")
    if _finite(row.get("n")):
        parts.append(f"n = {int(row['n'])}")
    parts.append(f"p = {_p(row.get('p'))}")
    if _finite(row.get("p_adjusted")):
        parts.append(f"adjusted p = {_p(row.get('p_adjusted'))}")
    if row.get("other"):
        parts.append(f"vs {row['other']}")
    return "significant: " + ", ".join(parts)


def _flatten(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [f"{k}: {v}" for k, v in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [str(v) for v in (sorted(value, key=str) if isinstance(value, (set, frozenset)) else value)]
    return [str(value)]


def provenance_from_records(records: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per-encoder provenance for ``render_html`` from a ``results.store.load_records`` frame.

    Counts record files (not metric rows), failed jobs, and lists the encoder and
    protocol fingerprints the numbers come from, so a reader can trace a cell.
    """
    out: dict[str, dict[str, Any]] = {}
    if records is None or records.empty:
        return out
    for encoder, rows in records.groupby("encoder", sort=True):
        files = rows.drop_duplicates("path") if "path" in rows else rows
        entry: dict[str, Any] = {"records": int(len(files))}
        if "status" in files:
            entry["failed"] = int((files["status"] == "failed").sum())
        prints: dict[str, Any] = {}
        if "encoder_fingerprint" in rows:
            values = sorted({str(v) for v in rows["encoder_fingerprint"].dropna()})
            if values:
                prints["encoder"] = values
        if "protocol_fingerprint" in rows:
            for protocol, prow in rows.groupby("protocol", sort=True):
                values = sorted({str(v) for v in prow["protocol_fingerprint"].dropna()})
                if values:
                    prints[f"protocol {protocol}"] = values
        if prints:
            entry["fingerprints"] = prints
        if "synthetic" in rows:
            flags = {bool(v) for v in rows["synthetic"].dropna()}
            if flags:
                entry["synthetic demo data"] = "yes" if flags == {True} else "no" if flags == {False} else "mixed"
        out[str(encoder)] = entry
    return out


def build_context(aggregated: pd.DataFrame, significance: pd.DataFrame | None = None,
                  title: str = DEFAULT_TITLE, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the template shows, computed here so the template only lays it out (and tests can read it)."""
    missing = [c for c in REQUIRED if c not in aggregated.columns]
    if missing:
        raise ValueError(f"the aggregated frame lacks column(s) {missing}; it needs {list(REQUIRED)}")
    frame = aggregated.copy()
    frame["encoder"] = frame["encoder"].astype(str)
    frame["protocol"] = frame["protocol"].astype(str)
    frame["metric"] = frame["metric"].astype(str)
    frame["source"] = frame["source"].astype(str)
    frame["regime"] = frame["regime"].astype(float).round(6)
    chosen = {(p, s): m for s, rows in frame.groupby("source", sort=True) for p, m in choose_metrics(rows).items()}
    frame = where(frame, [chosen.get((p, s)) == m for p, m, s in zip(frame["protocol"], frame["metric"],
                                                                     frame["source"])])
    undefined = frame["n_undefined"] if "n_undefined" in frame else pd.Series(0, index=frame.index)
    frame = where(frame, [_finite(v) or (count(u) or 0) > 0 for v, u in zip(frame["mean"], undefined)])

    settings = sorted({(p, r, m) for p, r, m in zip(frame["protocol"], frame["regime"], frame["metric"])},
                      key=lambda s: (_family_rank(s[0].split("/")[0]), _protocol_rank(s[0]), s[0], s[1], s[2]))
    columns = []
    for i, (protocol, regime, metric) in enumerate(settings):
        family = protocol.split("/")[0]
        _, ptitle = _protocol_info(protocol)
        lower = metric in LOWER_IS_BETTER
        columns.append({"index": i, "id": f"c{i}", "protocol": protocol, "family": family, "regime": regime,
                        "regime_key": f"{regime:g}", "regime_label": regime_label(regime), "metric": metric,
                        "metric_label": metric_label(metric), "task_label": task_label(protocol),
                        "protocol_title": ptitle, "lower_is_better": lower, "unit": "mm" if lower else "%",
                        "chance": _chance_text(frame, protocol, regime, metric)})

    cards = {e: card_info(e) for e in sorted(set(frame["encoder"]) | set(aggregated["encoder"].astype(str)))}
    sig_index = _significance_index(significance)
    has_dagger_col = "dagger" in frame.columns
    has_table_col = "table" in frame.columns

    cells: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for row in frame.to_dict("records"):
        col = settings.index((row["protocol"], row["regime"], row["metric"]))
        source = row["source"]
        n, n_undefined = count(row.get("n_seeds")), count(row.get("n_undefined")) or 0
        defined = _finite(row["mean"])
        mean = display_value(row["mean"], row["metric"], source) if defined else math.nan
        std = display_value(row["std"], row["metric"], source) if _finite(row.get("std")) else None
        single = n is not None and n < 2
        text = f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None and not single else "") if defined else "n/a"
        n_text = f"(n={n})" if defined and (single or n_undefined) else ""
        saturated = is_saturated(row["mean"], row["metric"], source)
        if is_quoted(source):
            table_ref = f", Table {row['table']}" if has_table_col and _finite_str(row.get("table")) else ""
            note = f"quoted from the paper ({PAPER}{table_ref})"
        else:
            note = f"measured over {n} seed{'s' if n != 1 else ''}" if n is not None else "measured"
            if source == "demo":
                note += " on the synthetic demo cohort"
        flags = []
        if n_undefined:
            flags.append((UNDEFINED_MARK, f"undefined in {n_undefined} of {(n or 0) + n_undefined} seeds "
                                          "(the record notes say why)"))
        if saturated:
            flags.append((SATURATED_MARK, "saturated: every seed at the metric's best bound, so it cannot "
                                          "separate encoders here"))
        dagger = None
        key = (row["encoder"], row["protocol"], row["regime"], row["metric"])
        if is_quoted(source):
            flag = row.get("dagger") if has_dagger_col else None
            if flag is not None and not pd.isna(flag) and bool(flag):
                dagger = "significant per the paper's own mark (copied, not recomputed)"
        else:
            sig = _sig_lookup(sig_index, key, source)
            if sig is not None:
                dagger = _sig_note(sig)
        cells.setdefault((row["encoder"], source), {})[col] = {
            "value": mean if defined else None, "text": text, "note": note + "".join(f"; {w}" for _, w in flags),
            "dagger": dagger, "mark": None, "source": source, "n": n, "n_text": n_text, "flags": flags}

    for col in columns:
        by_source: dict[str, list[tuple[tuple[str, str], dict[str, Any]]]] = {}
        for key, row_cells in cells.items():
            cell = row_cells.get(col["index"])
            if cell is not None and cell["value"] is not None:
                by_source.setdefault(key[1], []).append((key, cell))
        for entries in by_source.values():
            allowed = rankable([cell["n"] for _, cell in entries])
            values = {key: cell["value"] for (key, cell), ok in zip(entries, allowed) if ok}
            for key, mark in _marks(values, col["lower_is_better"]).items():
                cells[key][col["index"]]["mark"] = mark

    source_rank = {"paper": 0}
    rows = []
    for (encoder, source) in sorted(cells, key=lambda k: (source_rank.get(k[1], 1), k[1],
                                                           _group_rank(cards[k[0]]["group"]),
                                                           cards[k[0]]["order"], k[0])):
        card = cards[encoder]
        rows.append({"encoder": encoder, "source": source, "source_label": source_label(source),
                     "quoted": is_quoted(source), "card": card, "anchor": _anchor(encoder),
                     "id": f"row-{_anchor(encoder)}-{_anchor(source)}",
                     "group_value": _group_rank(card["group"]) * 10**7 + card["order"],
                     "cells": [cells[(encoder, source)].get(c["index"]) for c in columns]})
    for i, row in enumerate(rows):
        row["position"] = i

    provenance = dict(provenance or {})
    page_provenance = _flatten_items(provenance.pop("*", None))
    quoted_tables: dict[str, set[str]] = {}
    if has_table_col:
        for row in frame[frame["source"] == "paper"].to_dict("records"):
            if _finite_str(row.get("table")):
                quoted_tables.setdefault(row["encoder"], set()).add(str(row["table"]))
    encoders = sorted(cards, key=lambda e: (_group_rank(cards[e]["group"]), cards[e]["order"], e))
    details = []
    for encoder in encoders:
        given = provenance.get(encoder) or {}
        entry = dict(given) if isinstance(given, Mapping) else {"records": given}
        records = entry.pop("records", None)
        fingerprints = entry.pop("fingerprints", None)
        sources = sorted({s for (e, s) in cells if e == encoder}, key=lambda s: (source_rank.get(s, 1), s))
        details.append({
            "encoder": encoder, "anchor": _anchor(encoder), "card": cards[encoder],
            "records": records, "fingerprints": _flatten_items(fingerprints),
            "extra": _flatten_items(entry), "sources": [source_label(s) for s in sources],
            "quoted_tables": sorted(quoted_tables.get(encoder, set())),
        })

    families = sorted({c["family"] for c in columns}, key=lambda f: (_family_rank(f), f))
    regimes = sorted({c["regime"] for c in columns})
    sources = sorted({r["source"] for r in rows}, key=lambda s: (source_rank.get(s, 1), s))
    tests = sorted({(str(r.get("test")), str(r.get("unit"))) for r in sig_index.values()})
    shown = [c for r in rows for c in r["cells"] if c]
    return {
        "has_single": any(c["n"] is not None and c["n"] < 2 and c["value"] is not None for c in shown),
        "has_undefined": any(m == UNDEFINED_MARK for c in shown for m, _ in c["flags"]),
        "has_saturated": any(m == SATURATED_MARK for c in shown for m, _ in c["flags"]),
        "has_chance": any(c["chance"] for c in columns),
        "title": title, "paper": PAPER, "columns": columns, "rows": rows, "details": details,
        "families": [{"key": f, "title": FAMILY_TITLES.get(f, f)} for f in families],
        "regimes": [{"key": f"{r:g}", "label": regime_label(r)} for r in regimes],
        "sources": [{"key": s, "label": source_label(s)} for s in sources],
        "tests": tests, "page_provenance": page_provenance,
        "has_quoted": any(r["quoted"] for r in rows), "has_measured": any(not r["quoted"] for r in rows),
    }


def _chance_text(frame: pd.DataFrame, protocol: str, regime: float, metric: str) -> str:
    """The chance level of a column's metric in percent (per source where they differ); "" where none is given."""
    if "chance" not in frame:
        return ""
    rows = frame[(frame["protocol"] == protocol) & (frame["regime"] == regime) & (frame["metric"] == metric)]
    levels = {str(s): float(v) * (1.0 if is_quoted(s) else 100.0) for s, v in zip(rows["source"], rows["chance"])
              if _finite(v)}
    if not levels:
        return ""
    if len({round(v, 1) for v in levels.values()}) == 1:
        return f"chance {next(iter(levels.values())):.1f} %"
    return "chance " + ", ".join(f"{v:.1f} % ({source_label(s)})" for s, v in sorted(levels.items()))


def _finite_str(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


def _flatten_items(value: Any) -> list[tuple[str, list[str]]]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [(str(k), _flatten(v)) for k, v in value.items()]
    return [("", _flatten(value))]


def render_html(aggregated: pd.DataFrame, significance: pd.DataFrame | None, out: Path,
                title: str = DEFAULT_TITLE, provenance: dict | None = None) -> Path:
    """Write the leaderboard page to ``out`` and return its path.

    ``aggregated``: encoder, protocol, regime, metric, mean, std, n_seeds, source (run
    values as fractions, ``source == "paper"`` values in percent; an optional ``table``
    and ``dagger`` column for quoted rows). ``significance``: encoder, protocol, regime,
    metric, p, p_adjusted, significant, test, unit, n (optional ``source``, ``other``).
    ``provenance``: ``{encoder: {"records": int, "fingerprints": {...}, other: value}}``,
    and ``"*"`` for page-wide facts; see ``provenance_from_records``.
    """
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                      autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("leaderboard.html.j2").render(**build_context(aggregated, significance, title, provenance))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
