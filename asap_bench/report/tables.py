"""Result tables laid out like the ASAP paper's Tables II-VII: LaTeX, Markdown, CSV and JSON.

The input is an aggregated frame, one row per (encoder, source, protocol, regime,
metric) with ``mean``, ``std`` and ``n_seeds``. Run records are in fractions; the
paper's quoted numbers (``source == "paper"``) are in percent as printed; every
table prints percent with one decimal, distances (HD95) in mm.

Why the rules are what they are:

- Rows follow the encoder cards (``group``, ``order``, ``table_label``), so a
  table reads like the paper's: Random init, 3D Med-SSL, 3D Med-VLP, then others.
- Protocols the paper reports go into its table (II-VII) with the paper's columns
  when the data fits them; anything else gets a generic table per family.
- Best (bold) and second-best (underlined; italics in Markdown) are ranked on the
  printed, rounded numbers, per column and per source, so quoted and measured
  numbers never outrank each other; ties share a mark (dense ranking).
- A dagger comes only from a significance frame (measured rows) or from the
  paper's own marks (quoted rows). A seed-level Wilcoxon test that cannot reach
  alpha never marks a cell, and the caption says so.
- Quoted and measured rows shown together are always labelled (a Source column).
- A number that cannot move says so. A cell with fewer than two defined seeds prints
  its n (``36.4 (n=1)``) instead of a standard deviation, and is ranked only where
  every cell it is compared with has the same n. ``‡`` marks a cell undefined in some
  or all of its seeds (``n/a‡`` when in all; the record notes say why, e.g. recall@K
  with K >= the retrieval pool). ``§`` marks a saturated measured cell: every defined
  seed at the metric's best bound (100 % for the fractions: AUC, accuracy, recall,
  Dice, NSD, C-index, BLEU; 0 mm for surface distances), i.e. the mean sits at the
  bound with zero variance, so the metric cannot separate encoders there. The
  caption states both rules when a table holds such a cell; csv and json carry
  ``n_seeds``, ``n_undefined``, ``undefined``, ``saturated`` and, for recall@K, the
  ``chance`` level of a uniformly random ranking (also stated in the caption).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from typing import Any, Iterable, Sequence

import pandas as pd

from ..stats import LOWER_IS_BETTER  # surface distances, in mm

PAPER = "ASAP, arXiv:2606.00602"
ALPHA = 0.05
FORMATS = ("latex", "markdown", "csv", "json")
NOT_PERCENT = LOWER_IS_BETTER  # printed in mm; every other metric in %
GROUP_ORDER = ("random", "ssl", "vlp", "other")
GROUP_TITLES = {"random": "Random init", "ssl": "3D Med-SSL", "vlp": "3D Med-VLP", "other": "Other"}
SOURCE_ORDER = ("paper", "runs", "demo")
FAMILY_TITLES = {
    "cls": "Linear-probe classification", "seg": "UNETR segmentation", "prog": "Prognosis",
    "rg": "Report generation", "voc": "Vocabulary classification", "ret": "Volume-report retrieval",
    "vqa": "Visual question answering", "ext": "External validation",
}

METRIC_LABELS = {
    "auc": "AUC", "acc": "ACC", "balanced_acc": "BAcc", "f1_macro": "F1", "accuracy": "Acc",
    "dice": "Dice", "hd95": "HD95", "nsd": "NSD", "c_index": "C-Index",
    "auc_1m": "AUC 1M", "auc_6m": "AUC 6M", "auc_12m": "AUC 12M",
    "bleu1": "BL-1", "bleu2": "BL-2", "bleu3": "BL-3", "bleu4": "BL-4", "rouge_l": "ROUGE-L", "bertscore_f1": "B-S",
}
TASK_LABELS = {
    "cls/ct-rate": "CT-RATE", "cls/stoic": "STOIC-2021", "cls/rad-chestct": "Rad-ChestCT", "cls/luna16": "LUNA16",
    "cls/inspect-pe": "INSPECT", "cls/cc-ccii": "CC-CCII",
    "seg/luna16-lung": "LUNA16", "seg/msd-lung": "MSD-Lung", "seg/covid19-20": "COVID-19-20",
    "seg/segthor": "SegThor", "seg/fumpe": "FUMPE", "seg/btcv": "BTCV", "seg/acdc": "ACDC",
    "prog/inspect-mortality": "INSPECT", "prog/stoic-severity": "STOIC-2021 severity",
    "rg/ctrg": "CTRG", "rg/ct-rate": "CT-RATE",
    "voc/ct-rate": "CT-RATE Voc", "voc/ahph": "AHPH-10K Voc", "ret/ct-rate": "CT-RATE Ret", "ret/ahph": "AHPH-10K Ret",
    "vqa/radgenome": "RadGenome-ChestCT",
    "ext/ct-rate-ahph": "CT-RATE→AHPH-10K", "ext/inspect-rspect": "INSPECT→RSPECT", "ext/msd-rider": "MSD-Lung→RIDER",
    "ext/luna16-c19": "LUNA16→C19-CT", "ext/covid1920-c19": "COVID-19-20→C19-CT",
}


def metric_label(metric: str) -> str:
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    found = re.fullmatch(r"recall@(\d+)_(v2r|r2v)", metric)
    return f"R@{found.group(1)} {found.group(2).upper()}" if found else metric


def regime_label(regime: float) -> str:
    return f"{round(regime * 100, 6):g}%"


def _r(regime: float) -> float:
    return round(float(regime), 6)


@dataclass(frozen=True)
class Column:
    """One printed column: a (protocol, metric, regime) setting and its header labels, top level first."""

    protocol: str
    metric: str
    regime: float
    header: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.protocol, self.metric, _r(self.regime))

    @property
    def flat(self) -> str:
        return " ".join(h for h in self.header if h)


def _layout(spec: Iterable[tuple[str, str, str, Sequence[float], Any]]) -> list[Column]:
    columns = []
    for protocol, label, metric, regimes, middle in spec:
        for regime in regimes:
            header = (label, middle, regime_label(regime)) if middle is not None else (label, regime_label(regime))
            columns.append(Column(protocol, metric, regime, header))
    return columns


_R3, _R2, _R1 = (0.01, 0.1, 1.0), (0.1, 1.0), (1.0,)
_BLEU = ("bleu1", "bleu2", "bleu3", "bleu4", "bertscore_f1")

# The paper's tables: title and columns in its order, with its header wording.
PAPER_LAYOUTS: dict[str, tuple[str, list[Column]]] = {
    "II": ("Linear-probe classification on six benchmarks", _layout([
        ("cls/ct-rate", "CT-RATE", "auc", _R3, "(AUC)"), ("cls/stoic", "STOIC-2021", "auc", _R3, "(AUC)"),
        ("cls/rad-chestct", "Rad-ChestCT", "auc", _R2, "(AUC)"), ("cls/luna16", "LUNA16", "auc", _R2, "(AUC)"),
        ("cls/inspect-pe", "INSPECT", "auc", _R2, "(AUC)"), ("cls/cc-ccii", "CC-CCII", "acc", _R3, "(ACC)")])),
    "III": ("UNETR segmentation on seven benchmarks (Dice)", _layout([
        ("seg/luna16-lung", "LUNA16", "dice", _R3, None), ("seg/msd-lung", "MSD-Lung", "dice", _R2, None),
        ("seg/covid19-20", "COVID-19-20", "dice", _R2, None), ("seg/segthor", "SegThor", "dice", _R2, None),
        ("seg/fumpe", "FUMPE", "dice", _R1, None), ("seg/btcv", "BTCV", "dice", _R1, None),
        ("seg/acdc", "ACDC", "dice", _R1, None)])),
    "IV": ("In-hospital mortality prediction on INSPECT (AUC at 1, 6 and 12 months; C-index)",
           [Column("prog/inspect-mortality", f"auc_{h}", r, ("INSPECT", "(AUC)", regime_label(r), h.upper()))
            for r in _R3 for h in ("1m", "6m", "12m")]
           + [Column("prog/inspect-mortality", "c_index", r, ("INSPECT", "(C-Index)", regime_label(r), ""))
              for r in _R3]),
    "V": ("Report generation on CTRG and CT-RATE (BLEU, BERTScore)",
          [Column(p, m, 1.0, (label, metric_label(m))) for p, label in (("rg/ctrg", "CTRG"), ("rg/ct-rate", "CT-Rate"))
           for m in _BLEU]),
    "VI": ("Vocabulary classification (AUC) and volume-report retrieval (Recall@50) on CT-RATE and AHPH-10K",
           [c for name, ds in (("CT-Rate", "ct-rate"), ("AHPH-10K", "ahph")) for c in (
               Column(f"voc/{ds}", "auc", 1.0, (name, "Voc", "(AUC)")),
               Column(f"ret/{ds}", "recall@50_v2r", 1.0, (name, "Ret (R@50)", "V2R")),
               Column(f"ret/{ds}", "recall@50_r2v", 1.0, (name, "Ret (R@50)", "R2V")))]),
    "VII": ("Cross-dataset external validation, source→target", _layout([
        ("ext/ct-rate-ahph", "CT-Rate→AHPH-10K", "auc", _R3, "(AUC)"),
        ("ext/inspect-rspect", "INSPECT→RSPECT", "auc", _R2, "(AUC)"),
        ("ext/msd-rider", "MSD-Lung→RIDER", "dice", _R2, "(Dice)"),
        ("ext/luna16-c19", "LUNA16→C19-CT", "dice", _R3, "(Dice)"),
        ("ext/covid1920-c19", "COVID-19-20→C19-CT", "dice", _R2, "(Dice)")])),
}
PROTOCOL_TABLE = {c.protocol: tag for tag, (_, cols) in PAPER_LAYOUTS.items() for c in cols}
_PROTOCOL_ORDER = list(dict.fromkeys(c.protocol for _, cols in PAPER_LAYOUTS.values() for c in cols))


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    encoder: str
    source: str
    label: str
    group: str
    order: int

    @property
    def group_title(self) -> str:
        return GROUP_TITLES[self.group]


@lru_cache(maxsize=None)
def encoder_row_info(name: str) -> tuple[str, int, str]:
    """(group, order, table label) from the encoder's card; an encoder without a card goes to Other."""
    from ..encoders.card import encoder_names, load_encoder_card

    try:
        if name in encoder_names():
            card = load_encoder_card(name)
        else:
            from ..encoders.registry import get_card

            card = get_card(name)
        return card.group, card.order, card.table_label
    except Exception:  # an unknown or broken plug-in still gets a row, under Other
        return "other", 10_000, name


# --------------------------------------------------------------------------- numbers


def fmt1(value: float) -> str:
    """One decimal, half up, on the decimal value (82.25 -> 82.3 whatever its binary form)."""
    return str(Decimal(repr(round(float(value), 9))).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def _finite(value: Any) -> bool:
    try:
        return value is not None and not pd.isna(value) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


UNDEFINED_MARK, SATURATED_MARK = "‡", "§"


def is_saturated(mean: Any, metric: str, source: str) -> bool:
    """A measured mean (in stored units: fraction, or mm) at the metric's best bound: 1, or 0 for distances.

    Every metric here is bounded on that side, so the mean reaches the bound only when every
    defined seed does (zero variance at the bound). Quoted numbers are printed rounded and never flagged.
    """
    if source == "paper" or not _finite(mean):
        return False
    return math.isclose(float(mean), 0.0 if metric in LOWER_IS_BETTER else 1.0, rel_tol=0.0, abs_tol=1e-12)


def count(value: Any) -> int | None:
    return int(value) if _finite(value) else None


@dataclass
class Cell:
    mean: float  # NaN where every seed is undefined
    std: float | None
    n_seeds: int | None  # seeds with a defined value
    dagger: bool = False
    mark: str | None = None  # "best" or "second"
    n_undefined: int = 0
    saturated: bool = False
    chance: float | None = None  # display units, where the metric has a chance level (recall@K)

    @property
    def defined(self) -> bool:
        return _finite(self.mean)

    @property
    def single(self) -> bool:
        """Fewer than two defined seeds: no spread to show, so the cell prints its n instead."""
        return self.n_seeds is not None and self.n_seeds < 2

    @property
    def text(self) -> str:
        return fmt1(self.mean) if self.defined else "n/a"

    @property
    def std_text(self) -> str | None:
        return fmt1(self.std) if _finite(self.std) and self.defined and not self.single else None

    @property
    def n_text(self) -> str | None:
        """The n of a cell over fewer seeds than it ran, or over fewer than two."""
        return f"(n={self.n_seeds})" if self.defined and (self.single or self.n_undefined) else None

    @property
    def flags(self) -> str:
        return (UNDEFINED_MARK if self.n_undefined else "") + (SATURATED_MARK if self.saturated else "")


@dataclass
class Table:
    """One rendered table: its columns, rows, cells and caption sentences (format tokens unresolved)."""

    key: str
    title: str
    columns: list[Column]
    rows: list[Row]
    cells: dict[tuple[int, int], Cell]
    sentences: list[str] = field(default_factory=list)
    paper_layout: bool = False

    @property
    def name(self) -> str:
        return f"Table {self.key}" if self.key in PAPER_LAYOUTS else f"{FAMILY_TITLES.get(self.key, self.key)} ({self.key})"

    @property
    def sources(self) -> list[str]:
        return _ordered_sources({r.source for r in self.rows})

    @property
    def mixed(self) -> bool:
        return len(self.sources) > 1

    def caption(self, fmt: str) -> str:
        tokens = {"latex": {"cellfmt": "mean$_{\\mathrm{std}}$", "second": "underlined"},
                  "markdown": {"cellfmt": "mean ± std", "second": "in italics"}}.get(
            fmt, {"cellfmt": "mean ± std", "second": "marked second"})
        text = " ".join(self.sentences)
        for token, value in tokens.items():
            text = text.replace("{" + token + "}", value)
        return text


def _ordered_sources(sources: Iterable[str]) -> list[str]:
    return sorted(set(sources), key=lambda s: (SOURCE_ORDER.index(s) if s in SOURCE_ORDER else len(SOURCE_ORDER), s))


# --------------------------------------------------------------------------- frames


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


def parse_regime(value: Any) -> float:
    """A regime as a fraction: 0.01, "0.01", "1%" and "10 %" are accepted; percent needs the % sign."""
    text = str(value).strip()
    if text.endswith("%"):
        ratio = float(text[:-1]) / 100
    else:
        ratio = float(text)
    if not 0 < ratio <= 1:
        raise ValueError(f"regime {value!r} is not a fraction in (0, 1] (write percentages with %, e.g. 10%)")
    return _r(ratio)


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Checked copy in display units: run values (fractions) become percent; paper values already are."""
    required = ["encoder", "protocol", "regime", "metric", "mean"]
    missing = [c for c in required if c not in frame]
    if missing:
        raise ValueError(f"the aggregated frame lacks column(s) {missing}; it needs {required} "
                         "(and optionally std, n_seeds, source, dagger)")
    out = frame.copy()
    if "std" not in out:
        out["std"] = math.nan
    if "n_seeds" not in out:
        out["n_seeds"] = pd.NA
    out["n_undefined"] = [count(v) or 0 for v in out["n_undefined"]] if "n_undefined" in out else 0
    out["chance"] = out["chance"].astype(float) if "chance" in out else math.nan
    if "source" not in out:
        out["source"] = "runs"
    if "dagger" not in out:
        out["dagger"] = False
    out["source"] = out["source"].fillna("runs").astype(str).replace({"run": "runs"})
    if "synthetic" in out:  # aggregate() output passed straight in: demo rows must not pass as real ones
        demo = [s != "paper" and v is not None and not pd.isna(v) and bool(v)
                for s, v in zip(out["source"], out["synthetic"])]
        out.loc[demo, "source"] = "demo"
    out["dagger"] = [False if v is None or pd.isna(v) else bool(v) for v in out["dagger"]]
    out["regime"] = out["regime"].astype(float).map(_r)
    out["mean"] = out["mean"].astype(float)
    out["std"] = out["std"].astype(float)
    out = out[out["mean"].map(_finite) | (out["n_undefined"] > 0)]  # a cell undefined in every seed is shown
    out["saturated"] = [is_saturated(m, metric, s) for m, metric, s in zip(out["mean"], out["metric"], out["source"])]
    measured = (out["source"] != "paper") & ~out["metric"].isin(NOT_PERCENT)
    too_big = out[measured & (out["mean"].abs() > 1 + 1e-9)]
    if len(too_big):
        first = too_big.iloc[0]
        raise ValueError(f"measured values must be fractions in [0, 1], got {first['mean']} for {first['encoder']} "
                         f"{first['protocol']} {first['metric']} (source {first['source']!r}); only source 'paper' "
                         "is given in percent")
    out.loc[measured, ["mean", "std", "chance"]] = out.loc[measured, ["mean", "std", "chance"]] * 100
    keys = ["encoder", "source", "protocol", "regime", "metric"]
    dup = out[out.duplicated(keys, keep=False)]
    if len(dup):
        raise ValueError(f"the aggregated frame has {len(dup)} rows for the same cell, e.g. "
                         f"{dict(dup.iloc[0][keys])}; aggregate over seeds first")
    return out.reset_index(drop=True)


def with_chance(aggregated: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """``aggregated`` with a ``chance`` column (fraction; NaN where none): the chance level a record's units
    state for its metric (recall@K: it depends on the test pool, the same for every seed of a cell)."""
    from ..results.store import load_units

    keys = ["source", "encoder", "protocol", "regime"]
    found: list[dict[str, Any]] = []
    if {"units_path", "metric", *keys} <= set(records.columns):
        wanted = records[(records["status"] == "ok") & records["metric"].fillna("").str.startswith("recall@")
                         & records["units_path"].notna()]
        for key, rows in wanted.groupby(keys, sort=True):
            try:
                chance = (load_units(rows["units_path"].iloc[0]) or {}).get("chance") or {}
            except (OSError, ValueError):  # a missing or damaged sidecar: that cell shows no chance level
                continue
            found += [dict(zip(keys, key), metric=m, chance=float(v)) for m, v in chance.items()]
    if not found:
        return aggregated.assign(chance=math.nan)
    table = pd.DataFrame(found).drop_duplicates(keys + ["metric"])
    return aggregated.merge(table, on=keys + ["metric"], how="left")


@lru_cache(maxsize=1)
def _protocol_metrics() -> dict[str, tuple[list[str], str, str]]:
    """Per shipped protocol: (metrics, primary metric, primary metric on the demo cohort)."""
    try:
        from ..protocol import shipped_protocols

        return {pid: (list(p.metrics), p.primary(False), p.primary(True)) for pid, p in shipped_protocols().items()}
    except Exception:  # shipped protocols unreadable: every metric counts as listed
        return {}


def _default_metrics(protocol: str, source: str = "runs") -> set[str] | None:
    """What a table shows without --metric: the paper's metrics and the protocol's primary one (on demo rows
    its demo primary, a metric that can move on the demo's small pools)."""
    known = _protocol_metrics().get(protocol)
    primary = {known[2] if source == "demo" else known[1]} if known else set()
    if protocol in PROTOCOL_TABLE:
        return {c.metric for c in PAPER_LAYOUTS[PROTOCOL_TABLE[protocol]][1] if c.protocol == protocol} | primary
    return primary or None


def filter_frame(frame: pd.DataFrame, *, metric: Any = None, family: Any = None, regime: Any = None,
                 encoders: Any = None) -> pd.DataFrame:
    """Rows kept by the filters. ``metric`` None shows the paper's metrics (primary elsewhere), "all" all."""
    out = frame
    metrics = _as_list(metric)
    if metrics is None:
        sources = out["source"] if "source" in out else pd.Series("runs", index=out.index)
        keep = [m in (_default_metrics(p, str(s)) or {m}) for p, m, s in zip(out["protocol"], out["metric"], sources)]
        out = out[keep]
    elif metrics != ["all"]:
        out = out[out["metric"].isin(metrics)]
    families = _as_list(family)
    if families is not None:
        out = out[out["protocol"].str.split("/").str[0].isin(families)]
    regimes = _as_list(regime)
    if regimes is not None:
        wanted = {parse_regime(r) for r in regimes}
        out = out[out["regime"].map(_r).isin(wanted)]
    names = _as_list(encoders)
    if names is not None:
        out = out[out["encoder"].isin(names)]
    return out


# --------------------------------------------------------------------------- significance


def _min_p(row: pd.Series) -> float | None:
    """The smallest p the row's test could give: its ``min_p``, else 2/2**n for an exact Wilcoxon test."""
    if "min_p" in row and _finite(row["min_p"]):
        return float(row["min_p"])
    n = row.get("n")
    if "wilcoxon" in str(row.get("test", "")).lower() and _finite(n) and int(n) > 0:
        return 2.0 / 2 ** int(n)
    return None


def _underpowered(row: pd.Series, alpha: float) -> bool:
    """A test that cannot reach alpha (a seed-level Wilcoxon over 5 seeds) or was not decided: never a dagger."""
    flag = row.get("can_be_significant")
    if flag is not None and not pd.isna(flag) and not bool(flag):
        return True
    min_p = _min_p(row)
    return min_p is not None and min_p >= alpha


def _significance_rows(significance: pd.DataFrame | None) -> pd.DataFrame | None:
    if significance is None or len(significance) == 0:
        return None
    needed = ["encoder", "protocol", "regime", "metric", "significant"]
    missing = [c for c in needed if c not in significance]
    if missing:
        raise ValueError(f"the significance frame lacks column(s) {missing}; it needs encoder, protocol, regime, "
                         "metric, p, p_adjusted, significant, test, unit, n")
    sig = significance.copy()
    for column in ("p", "p_adjusted", "test", "unit", "n"):
        if column not in sig:
            sig[column] = None
    sig["regime"] = sig["regime"].astype(float).map(_r)
    return sig


def _effective(row: pd.Series, alpha: float) -> bool:
    if not bool(row["significant"]) or _underpowered(row, alpha):
        return False
    p = row["p_adjusted"] if _finite(row["p_adjusted"]) else row["p"]
    return not (_finite(p) and float(p) >= alpha)


def _n_text(values: list[int]) -> str:
    values = sorted(set(values))
    if not values:
        return "n not given"
    return f"n = {values[0]}" if len(values) == 1 else f"n = {values[0]}–{values[-1]}"


def _by_test(rows: pd.DataFrame):
    return rows.groupby([rows["test"].astype(str), rows["unit"].astype(str)], sort=True)


def _significance_sentences(sig: pd.DataFrame, alpha: float) -> list[str]:
    """Caption sentences naming each test, its unit, n and alpha, and every test that could not reach alpha."""
    sentences = []
    weak_mask = [_underpowered(r, alpha) for _, r in sig.iterrows()]
    usable = sig[[not w for w in weak_mask]]
    weak = sig[weak_mask]
    if len(usable):
        parts = [f"{test}, unit {unit}, {_n_text([int(n) for n in g['n'] if _finite(n)])}"
                 for (test, unit), g in _by_test(usable)]
        adjusted = usable["p_adjusted"].map(_finite).any()
        correction = ""
        if adjusted and "correction" in usable and usable["correction"].notna().any():
            correction = f", {usable['correction'].dropna().iloc[0]}"
        which = f"adjusted p < {alpha:g}{correction}" if adjusted else f"p < {alpha:g}"
        none = "" if any(_effective(r, alpha) for _, r in usable.iterrows()) else " No cell reaches it."
        sentences.append(f"† significantly better than the best other encoder in that setting ({which}): "
                         + "; ".join(parts) + "." + none)
    for (test, unit), g in _by_test(weak):
        ns = [int(n) for n in g["n"] if _finite(n)]
        bounds = [b for b in (_min_p(r) for _, r in g.iterrows()) if b is not None]
        if bounds and min(bounds) >= alpha:
            sentences.append(f"{test} over unit {unit} ({_n_text(ns)}) cannot reach p < {alpha:g} "
                             f"(smallest attainable p = {min(bounds):.4g}); no cell is marked on it.")
        else:
            sentences.append(f"{len(g)} comparison(s) by {test} over unit {unit} could not be decided; "
                             "no cell is marked on them.")
    return sentences


# --------------------------------------------------------------------------- assembly


def _generic_columns(sub: pd.DataFrame) -> list[Column]:
    known = _protocol_metrics()
    settings = sub[["protocol", "metric", "regime"]].drop_duplicates()

    def order(item: tuple[str, str, float]) -> tuple:
        protocol, metric, regime = item
        p_rank = _PROTOCOL_ORDER.index(protocol) if protocol in _PROTOCOL_ORDER else len(_PROTOCOL_ORDER)
        listed = known.get(protocol, ([], ""))[0]
        m_rank = listed.index(metric) if metric in listed else len(listed)
        return (p_rank, protocol, m_rank, metric, regime)

    items = sorted(((p, m, _r(r)) for p, m, r in settings.itertuples(index=False)), key=order)
    return [Column(p, m, r, (TASK_LABELS.get(p, p), f"({metric_label(m)})", regime_label(r))) for p, m, r in items]


def rankable(n_seeds: Sequence[int | None]) -> list[bool]:
    """Which of the compared cells (by their defined seeds) may take a mark: all of them when they share one n,
    else only those with two or more seeds, so a lone seed never outranks a mean over seeds."""
    if len(set(n_seeds)) <= 1:
        return [True] * len(n_seeds)
    return [n is None or n >= 2 for n in n_seeds]


def _rank(table: Table) -> None:
    """Bold the best and underline the second-best value per column and source, on printed numbers."""
    for j, column in enumerate(table.columns):
        sign = -1 if column.metric in LOWER_IS_BETTER else 1
        for source in table.sources:
            compared = [(i, c) for (i, jj), c in table.cells.items()
                        if jj == j and table.rows[i].source == source and c.defined]
            allowed = rankable([c.n_seeds for _, c in compared])
            entries = [(i, Decimal(c.text)) for (i, c), ok in zip(compared, allowed) if ok]
            if len(entries) < 2:
                continue
            distinct = sorted({v for _, v in entries}, key=lambda v: sign * v, reverse=True)
            for i, value in entries:
                if value == distinct[0]:
                    table.cells[(i, j)].mark = "best"
                elif len(distinct) > 1 and value == distinct[1]:
                    table.cells[(i, j)].mark = "second"


def _seeds_sentence(sub: pd.DataFrame, sources: list[str]) -> str:
    parts = []
    for source in sources:
        rows = sub[sub["source"] == source]
        if source == "paper":
            if rows["std"].map(_finite).any():
                parts.append("quoted rows: over five seeds, as the paper states")
            else:
                parts.append("quoted rows: mean only (the paper prints no standard deviation)")
            continue
        ns = [int(n) + int(u) for n, u in zip(rows["n_seeds"], rows["n_undefined"]) if _finite(n)]  # seeds run
        prefix = f"{source} rows: " if len(sources) > 1 else ""
        parts.append(f"{prefix}over {_n_text(ns).replace('n = ', '')} seeds" if ns else f"{prefix}seeds not given")
    return "Cells show {cellfmt}; " + "; ".join(parts) + "."


def _honesty_sentences(table: Table) -> list[str]:
    """What the n, the flags and the chance levels of this table's cells mean, for the cells that have them."""
    cells = list(table.cells.values())
    out = []
    if any(c.single and c.defined for c in cells):
        out.append("(n=1): one defined seed, so no standard deviation; such a cell is marked only when every "
                   "cell of its column and source has the same n.")
    if any(c.n_undefined for c in cells):
        out.append(f"{UNDEFINED_MARK} undefined in some seeds (n counts the defined ones) or in all (n/a); the "
                   "record notes say why (e.g. recall@K with K at or above the retrieval pool, which every "
                   "query hits whatever the scores).")
    if any(c.saturated for c in cells):
        out.append(f"{SATURATED_MARK} saturated: every defined seed at the metric's best bound (100 %, or 0 mm "
                   "for surface distances), so the metric cannot separate encoders here.")
    chance = {}
    for (i, j), c in sorted(table.cells.items()):
        if c.chance is not None:
            column, source = table.columns[j], table.rows[i].source
            chance.setdefault((column.flat, source), c.chance)
    if chance:
        several = len({s for _, s in chance}) > 1
        shown = "; ".join(f"{name}{f' ({s})' if several else ''} {fmt1(v)}" for (name, s), v in chance.items())
        out.append("Chance level of recall@K (a uniformly random ranking; V2R: K/P over P pooled reports, R2V: "
                   f"1 - C(V-m, K)/C(V, K) over V volumes, m carrying the report, averaged): {shown}.")
    return out


def _source_sentence(key: str, sources: list[str]) -> str:
    where = f"{PAPER}, Table {key}" if key in PAPER_LAYOUTS else PAPER
    notes = {"paper": f"quoted from the paper ({where}), not measured by asap-bench",
             "runs": "measured with asap-bench",
             "demo": "measured with asap-bench on the synthetic demo cohort, not comparable with real data"}
    if sources == ["paper"]:
        return f"Quoted from the paper ({where}); these numbers are not measured by asap-bench."
    if len(sources) == 1:
        return notes.get(sources[0], f"source {sources[0]!r}").capitalize() + "."
    return "Source column: " + "; ".join(f"'{s}' rows are {notes.get(s, 'from ' + s)}" for s in sources) + "."


def _build_table(key: str, sub: pd.DataFrame, sig: pd.DataFrame | None, alpha: float) -> Table:
    layout = PAPER_LAYOUTS.get(key)
    present = {(p, m, _r(r)) for p, m, r in sub[["protocol", "metric", "regime"]].itertuples(index=False)}
    use_layout = layout is not None and present <= {c.key for c in layout[1]}
    if use_layout:
        title, columns = layout[0], [c for c in layout[1] if c.key in present]
    else:
        title = layout[0] if layout else FAMILY_TITLES.get(key, key)
        columns = _generic_columns(sub)
    col_index = {c.key: j for j, c in enumerate(columns)}

    row_keys = sub[["encoder", "source"]].drop_duplicates()
    rows = []
    for encoder, source in row_keys.itertuples(index=False):
        group, order, label = encoder_row_info(encoder)
        rows.append(Row(encoder, source, label, group if group in GROUP_ORDER else "other", order))
    source_rank = {s: i for i, s in enumerate(_ordered_sources(r.source for r in rows))}
    rows.sort(key=lambda r: (GROUP_ORDER.index(r.group), r.order, r.encoder, source_rank[r.source]))
    row_index = {(r.encoder, r.source): i for i, r in enumerate(rows)}

    sig_keys: set[tuple] = set()
    if sig is not None:
        sig_keys = {(r["encoder"], r["protocol"], r["regime"], r["metric"]) for _, r in sig.iterrows() if _effective(r, alpha)}

    cells: dict[tuple[int, int], Cell] = {}
    for rec in sub.itertuples(index=False):
        i, j = row_index[(rec.encoder, rec.source)], col_index[(rec.protocol, rec.metric, _r(rec.regime))]
        if rec.source == "paper":
            dagger = bool(rec.dagger)
        else:
            dagger = (rec.encoder, rec.protocol, _r(rec.regime), rec.metric) in sig_keys
        cells[(i, j)] = Cell(float(rec.mean), float(rec.std) if _finite(rec.std) else None, count(rec.n_seeds),
                             dagger, n_undefined=int(rec.n_undefined), saturated=bool(rec.saturated),
                             chance=float(rec.chance) if _finite(rec.chance) else None)

    table = Table(key, title, columns, rows, cells, paper_layout=use_layout)
    _rank(table)

    sources = table.sources
    metrics = {c.metric for c in columns}
    units = "Values in %" + ("; HD95 in mm" if metrics & NOT_PERCENT else "") + "."
    direction = "higher is better" + (" (lower for surface distances)" if metrics & LOWER_IS_BETTER else "")
    marks = (f"Best in bold, second-best {{second}} per column{' within each source' if len(sources) > 1 else ''}, "
             f"ranked on the printed numbers ({direction}; ties share a mark).")
    sentences = [f"{title}.", _source_sentence(key, sources), _seeds_sentence(sub, sources), units, marks]
    sentences += _honesty_sentences(table)
    if "paper" in sources:
        if sub.loc[sub["source"] == "paper", "dagger"].any():
            sentences.append("† as marked in the paper: ASAP significantly better than the second-best method by a "
                             "paired Wilcoxon signed-rank test, p < 0.05; the paper states neither the unit nor n "
                             "(over five seeds alone a two-sided test cannot reach p < 0.05).")
        else:
            sentences.append("The paper marks no significance for these cells.")
    if any(s != "paper" for s in sources):
        measured = sub[sub["source"] != "paper"]
        matched = None
        if sig is not None:
            cells_here = set(zip(measured["encoder"], measured["protocol"], measured["regime"].map(_r), measured["metric"]))
            mask = [k in cells_here for k in zip(sig["encoder"], sig["protocol"], sig["regime"], sig["metric"])]
            matched = sig[mask]
        if matched is not None and len(matched):
            sentences += _significance_sentences(matched, alpha)
        else:
            sentences.append("No significance test was supplied for the measured cells; none carries a dagger.")
    table.sentences = sentences
    return table


def build_tables(frame: pd.DataFrame, significance: pd.DataFrame | None = None, *, metric: Any = None,
                 family: Any = None, regime: Any = None, encoders: Any = None, alpha: float = ALPHA) -> list[Table]:
    """Tables from an aggregated frame: the paper's II-VII where the data fits, one per family otherwise."""
    data = filter_frame(normalise(frame), metric=metric, family=family, regime=regime, encoders=encoders)
    if data.empty:
        raise ValueError("no results left after the filters "
                         f"(metric={metric!r}, family={family!r}, regime={regime!r}, encoders={encoders!r})")
    sig = _significance_rows(significance)
    keys = [PROTOCOL_TABLE.get(p, p.split("/")[0]) for p in data["protocol"]]
    data = data.assign(_table=keys)
    families = list(FAMILY_TITLES)
    order = list(PAPER_LAYOUTS) + families
    ordered = sorted(set(keys), key=lambda k: (order.index(k) if k in order else len(order), k))
    return [_build_table(k, data[data["_table"] == k].drop(columns="_table"), sig, alpha) for k in ordered]


# --------------------------------------------------------------------------- LaTeX

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "→": r"$\rightarrow$", "±": r"$\pm$", "†": r"$^{\dagger}$", "‡": r"$^{\ddagger}$",
                  "§": r"\S{}", "α": r"$\alpha$", "–": "--",
                  "<": r"$<$", ">": r"$>$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _caption_latex(text: str) -> str:
    """Escape a caption but keep the ``$...$`` math it was given for the cell format."""
    pieces = re.split(r"(\$[^$]*\$)", text)
    return "".join(p if p.startswith("$") and p.endswith("$") and len(p) > 1 else latex_escape(p) for p in pieces)


_LATEX_FLAGS = {UNDEFINED_MARK: r"\ddagger", SATURATED_MARK: r"\S"}


def _latex_cell(cell: Cell | None) -> str:
    if cell is None:
        return "--"
    inner = cell.text if cell.defined else r"\mathrm{n/a}"
    if cell.std_text is not None:
        inner += f"_{{{cell.std_text}}}"
    marks = ([r"\dagger"] if cell.dagger else []) + [_LATEX_FLAGS[f] for f in cell.flags]
    if marks:
        inner += "^{" + ",".join(marks) + "}"
    if cell.mark == "best":
        inner = rf"\mathbf{{{inner}}}"
    elif cell.mark == "second":
        inner = rf"\underline{{{inner}}}"
    return f"${inner}$" + (f" {cell.n_text}" if cell.n_text else "")


def _spans(columns: list[Column], level: int) -> list[tuple[str, int, int]]:
    spans: list[list] = []
    for j, column in enumerate(columns):
        key = column.header[: level + 1]
        if spans and spans[-1][3] == key:
            spans[-1][2] = j
        else:
            spans.append([column.header[level], j, j, key])
    return [(label, start, end) for label, start, end, _ in spans]


def _subdivided(columns: list[Column], level: int, start: int, end: int) -> bool:
    below = [s for s in _spans(columns, level + 1) if start <= s[1] <= end]
    return len(below) > 1


def _groups(rows: list[Row]) -> list[tuple[str, list[int]]]:
    out: list[tuple[str, list[int]]] = []
    for i, row in enumerate(rows):
        if out and out[-1][0] == row.group:
            out[-1][1].append(i)
        else:
            out.append((row.group, [i]))
    return out


def _latex_table(table: Table, float_env: str) -> str:
    lead = ["Method"] + (["Source"] if table.mixed else [])
    nlead, columns = len(lead), table.columns
    ncols = nlead + len(columns)
    depth = len(columns[0].header)
    label = "tab:asap-" + ("paper" if table.sources == ["paper"] else "bench") + "-" + re.sub(r"[^a-z0-9]+", "-", table.key.lower())
    lines = [rf"\begin{{{float_env}}}[t]", r"\centering", rf"\caption{{{_caption_latex(table.caption('latex'))}}}",
             rf"\label{{{label}}}", r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             rf"\begin{{tabular}}{{@{{}}{'l' * nlead}{'c' * len(columns)}@{{}}}}", r"\toprule"]
    first = True
    for level in range(depth):
        spans = _spans(columns, level)
        if not any(label for label, _, _ in spans):
            continue
        cells = list(lead) if first else [""] * nlead
        first = False
        for text, start, end in spans:
            width = end - start + 1
            cells.append(latex_escape(text) if width == 1 else rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(text)}}}")
        lines.append(" & ".join(cells) + r" \\")
        if level < depth - 1:
            rules = [rf"\cmidrule(lr){{{start + nlead + 1}-{end + nlead + 1}}}" for text, start, end in spans
                     if text and _subdivided(columns, level, start, end)]
            if rules:
                lines.append(" ".join(rules))
    lines.append(r"\midrule")
    for g, (group, indices) in enumerate(_groups(table.rows)):
        if g:
            lines.append(r"\midrule")
        title = GROUP_TITLES[group]
        if not all(table.rows[i].label == title for i in indices):
            lines.append(rf"\multicolumn{{{ncols}}}{{l}}{{\textit{{{latex_escape(title)}}}}} \\")
        for i in indices:
            row = table.rows[i]
            cells = [latex_escape(row.label)] + ([latex_escape(row.source)] if table.mixed else [])
            cells += [_latex_cell(table.cells.get((i, j))) for j in range(len(columns))]
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", rf"\end{{{float_env}}}"]
    return "\n".join(lines)


def to_latex(tables: list[Table], float_env: str = "table") -> str:
    head = "% asap-bench result tables; the preamble needs \\usepackage{booktabs,graphicx}\n"
    return head + "\n\n".join(_latex_table(t, float_env) for t in tables) + "\n"


def latex_document(body: str) -> str:
    """A minimal document around rendered tables, for compiling them on their own."""
    return ("\\documentclass{article}\n\\usepackage[margin=2cm]{geometry}\n\\usepackage{booktabs,graphicx}\n"
            "\\begin{document}\n" + body + "\n\\end{document}\n")


# --------------------------------------------------------------------------- Markdown, CSV, JSON


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    core = cell.text + (f" ± {cell.std_text}" if cell.std_text is not None else "")
    if cell.mark == "best":
        core = f"**{core}**"
    elif cell.mark == "second":
        core = f"*{core}*"
    return core + ("†" if cell.dagger else "") + cell.flags + (f" {cell.n_text}" if cell.n_text else "")


def to_markdown(tables: list[Table]) -> str:
    blocks = []
    for table in tables:
        lead = ["Method"] + (["Source"] if table.mixed else [])
        header = lead + [_md_escape(c.flat) for c in table.columns]
        lines = [f"**{table.name}.** {_md_escape(table.caption('markdown'))}", "",
                 "| " + " | ".join(header) + " |",
                 "| " + " | ".join([":--"] * len(lead) + ["--:"] * len(table.columns)) + " |"]
        for group, indices in _groups(table.rows):
            title = GROUP_TITLES[group]
            if not all(table.rows[i].label == title for i in indices):
                lines.append("| " + " | ".join([f"*{title}*"] + [""] * (len(header) - 1)) + " |")
            for i in indices:
                row = table.rows[i]
                cells = [_md_escape(row.label)] + ([row.source] if table.mixed else [])
                cells += [_md_cell(table.cells.get((i, j))) for j in range(len(table.columns))]
                lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


CSV_COLUMNS = ["table", "group", "method", "encoder", "source", "protocol", "task", "metric", "regime", "column",
               "mean", "std", "n_seeds", "n_undefined", "undefined", "saturated", "chance", "unit", "display", "best",
               "second", "dagger"]


def cell_records(tables: list[Table]) -> list[dict[str, Any]]:
    """One record per printed cell, values in display units (percent, mm for distances)."""
    out = []
    for table in tables:
        for (i, j), cell in sorted(table.cells.items()):
            row, column = table.rows[i], table.columns[j]
            out.append({
                "table": table.key, "group": row.group_title, "method": row.label, "encoder": row.encoder,
                "source": row.source, "protocol": column.protocol, "task": TASK_LABELS.get(column.protocol, column.protocol),
                "metric": column.metric, "regime": column.regime, "column": column.flat,
                "mean": float(cell.text) if cell.defined else None,
                "std": float(cell.std_text) if cell.std_text is not None else None,
                "n_seeds": cell.n_seeds, "n_undefined": cell.n_undefined, "undefined": cell.n_undefined > 0,
                "saturated": cell.saturated, "chance": float(fmt1(cell.chance)) if cell.chance is not None else None,
                "unit": "mm" if column.metric in NOT_PERCENT else "%",
                "display": _md_cell(replace(cell, mark=None)),
                "best": cell.mark == "best", "second": cell.mark == "second", "dagger": cell.dagger,
            })
    return out


def to_csv(tables: list[Table]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in cell_records(tables):
        writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
    return buffer.getvalue()


def to_json(tables: list[Table]) -> str:
    payload = {"tables": [{
        "table": t.key, "name": t.name, "title": t.title, "caption": t.caption("json"), "sources": t.sources,
        "paper_layout": t.paper_layout,
        "columns": [{"protocol": c.protocol, "metric": c.metric, "regime": c.regime, "header": list(c.header)}
                    for c in t.columns],
        "rows": [{"encoder": r.encoder, "method": r.label, "group": r.group_title, "source": r.source} for r in t.rows],
        "cells": cell_records([t]),
    } for t in tables]}
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


def render(frame: pd.DataFrame, fmt: str = "latex", significance: pd.DataFrame | None = None, *, metric: Any = None,
           family: Any = None, regime: Any = None, encoders: Any = None, alpha: float = ALPHA) -> str:
    """An aggregated frame (and optional significance frame) as text in ``fmt``."""
    fmt = {"md": "markdown", "tex": "latex"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; expected one of {', '.join(FORMATS)}")
    tables = build_tables(frame, significance, metric=metric, family=family, regime=regime, encoders=encoders,
                          alpha=alpha)
    return {"latex": to_latex, "markdown": to_markdown, "csv": to_csv, "json": to_json}[fmt](tables)
