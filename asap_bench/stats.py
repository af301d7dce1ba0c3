"""Aggregation and significance tests over result records (a frame from ``results.store.load_records``).

Numbers are shown as mean ± std over seeds (sample std, ddof=1; 0.0 for a single
seed, as the paper prints at 100 %). A cell never mixes protocol fingerprints,
encoder fingerprints, or demo (synthetic) with real data: ``aggregate`` and every
comparison raise instead, unless ``keep`` says which rows to use.

Significance is paired at the finest honest unit, because five seeds cannot carry
a two-sided Wilcoxon test (its smallest exact p is 2/2**5 = 0.0625):

* ``case``: per-case quantities (Dice, correctness). For each case id the A - B
  differences are matched by case id and seed and averaged over the seeds both
  encoders have; scipy's Wilcoxon signed-rank test runs over the cases
  (``pool_seeds="stack"`` treats every (case, seed) pair as a unit instead).
* ``label``: multi-label AUC. Each label's AUC is averaged over the shared seeds
  per encoder; Wilcoxon signed-rank over the labels.
* ``bootstrap``: set-level metrics (AUC, C-index, BLEU, recall@K, balanced
  accuracy, F1). Each replicate draws the shared test case ids with replacement
  (one draw used for both encoders and for every seed when the seeds share their
  test ids), recomputes the metric from the units per encoder and seed, and takes
  the mean over seeds of A - B. With observed difference d and replicates d_b
  (replicates where the metric is undefined are dropped, B' kept):
  p = min(1, 2 (1 + #{d_b <= 0}) / (B' + 1)) when d > 0,
  p = min(1, 2 (1 + #{d_b >= 0}) / (B' + 1)) when d < 0, and p = 1 when d = 0.
* ``seed``: Wilcoxon over seeds of the record values. Reported, but a test whose
  smallest attainable p (2/2**n for n non-zero differences) is not below alpha is
  flagged ``can_be_significant=False`` and never marked significant.

Per-unit outputs are the record's sidecar: classification units (``task`` binary,
multilabel or multiclass: ``ids``, ``labels``, ``scores``, ``thresholds``,
``per_label``), survival units (``time``, ``event``, ``risk``, ``horizons``), and,
for any family, ``per_case: {metric: [value per id]}`` aligned with ``ids``. A
family whose set-level metric is not a mean of per-case values (corpus BLEU)
registers its weighted recomputation with ``register_set_metric``.

Across tasks: Wilcoxon over settings, mean ranks, and Friedman + Nemenyi critical
difference. Settings mix units (fractions, HD95 in mm), so the Wilcoxon test over
them ranks a unit-free difference per setting (``SCALES``), never raw differences
unless asked. All tests are scipy.stats; only Holm's step-down adjustment is written here.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .metrics.classification import SUPPORTED as CLS_METRICS, decisions
from .results.record import read_record
from .results.store import load_units

ALPHA = 0.05
N_BOOT = 2000
LOWER_IS_BETTER = frozenset({"hd95", "hd", "asd", "assd", "masd"})
SET_LEVEL_PREFIXES = ("auc", "c_index", "bleu", "recall@", "balanced_acc", "f1")
MIX_COLUMNS = ("protocol_fingerprint", "encoder_fingerprint", "synthetic")
CELL = ["encoder", "protocol", "regime"]
UNITS = ("auto", "case", "label", "bootstrap", "seed")
SCALES = {
    "relative": "symmetric relative difference (A - B) / ((|A| + |B|) / 2) per setting, sign flipped for "
                "lower-is-better metrics: unit-free, in [-2, 2], defined when one side is 0 (both 0: a tie)",
    "raw": "raw difference A - B of the seed means, sign flipped for lower-is-better metrics: "
           "depends on each metric's unit",
}


def higher_is_better(metric: str, lower_is_better: Iterable[str] | None = None) -> bool:
    return metric not in (LOWER_IS_BETTER if lower_is_better is None else set(lower_is_better))


def is_set_level(metric: str) -> bool:
    """Metrics that are not a mean over cases, so a per-case test would not test them."""
    return metric.startswith(SET_LEVEL_PREFIXES)


def wilcoxon_min_p(n: int) -> float:
    """Smallest two-sided p an exact Wilcoxon signed-rank test can give with n non-zero differences."""
    return 1.0 if n <= 0 else min(1.0, 2.0 / 2.0 ** n)


# ---------------------------------------------------------------------------
# selecting rows: never mix fingerprints or demo with real
# ---------------------------------------------------------------------------

def _select(frame: pd.DataFrame, keep: Mapping[str, Any] | None) -> pd.DataFrame:
    """Rows matching ``keep`` (column -> value, or a list of accepted values)."""
    if not keep:
        return frame
    mask = pd.Series(True, index=frame.index)
    for column, wanted in keep.items():
        if column not in frame:
            raise KeyError(f"keep names column {column!r}, which the frame does not have")
        if isinstance(wanted, (list, tuple, set, frozenset)):
            mask &= frame[column].isin(list(wanted))
        else:
            mask &= frame[column] == wanted
    return frame[mask]


def _distinct(values: pd.Series) -> list:
    return sorted({v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))}, key=str)


def _mixing(rows: pd.DataFrame) -> dict[str, list]:
    return {c: _distinct(rows[c]) for c in MIX_COLUMNS if c in rows and len(_distinct(rows[c])) > 1}


def _refuse_mixing(rows: pd.DataFrame, by: list[str], what: str) -> None:
    problems = []
    for key, group in rows.groupby(by, dropna=False, sort=True):
        for column, values in _mixing(group).items():
            label = ", ".join(f"{k}={v}" for k, v in zip(by, key if isinstance(key, tuple) else (key,)))
            kind = ("demo (synthetic) and real data" if column == "synthetic" else
                    f"{len(values)} {column.replace('_', ' ')}s {[str(v)[:12] for v in values]}")
            problems.append(f"{label} mixes {kind}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"{what} refuses to mix results: {shown}. Pass keep={{column: value}} "
                         "(e.g. keep={'synthetic': False} or keep={'protocol_fingerprint': '...'}) to choose.")


def _ok_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["status"] == "ok") & frame["metric"].notna()]


def _refuse_duplicates(rows: pd.DataFrame, what: str) -> None:
    keys = [c for c in ("source", "encoder", "protocol", "regime", "metric", "seed") if c in rows]
    dup = rows[rows.duplicated(keys, keep=False)]
    if len(dup):
        first = dup.iloc[0]
        where = f" ({', '.join(map(str, dup['path'].head(3)))})" if "path" in dup else ""
        raise ValueError(f"{what}: {first['encoder']} {first['protocol']} regime {first['regime']:g} seed "
                         f"{first['seed']} has {int((dup[keys] == first[keys]).all(axis=1).sum())} records"
                         f"{where}; keep one")


# ---------------------------------------------------------------------------
# mean ± std over seeds, and what is missing
# ---------------------------------------------------------------------------

def aggregate(frame: pd.DataFrame, *, keep: Mapping[str, Any] | None = None,
              metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean ± std over seeds per (encoder, protocol, regime, metric), from ok records only.

    Columns: source, encoder, protocol, family, regime, metric, mean, std, n_seeds
    (seeds with a defined value), n_undefined, seeds, synthetic, protocol_fingerprint.
    """
    rows = _ok_rows(_select(frame, keep))
    if metrics is not None:
        rows = rows[rows["metric"].isin(list(metrics))]
    by = (["source"] if "source" in rows else []) + CELL
    _refuse_mixing(rows, by, "aggregate")
    _refuse_duplicates(rows, "aggregate")
    out = []
    keys = by + ["family", "metric"]
    for key, group in rows.groupby(keys, sort=True, dropna=False):
        values = group["value"].to_numpy(dtype=float)
        defined = np.isfinite(values)
        kept = values[defined]
        std = float(np.std(kept, ddof=1)) if len(kept) > 1 else (0.0 if len(kept) == 1 else math.nan)
        entry = dict(zip(keys, key))
        entry.update(mean=float(np.mean(kept)) if len(kept) else math.nan, std=std, n_seeds=int(defined.sum()),
                     n_undefined=int((~defined).sum()),
                     seeds=tuple(sorted(int(s) for s in group["seed"][defined])),
                     synthetic=(_distinct(group["synthetic"]) or [None])[0],
                     protocol_fingerprint=(_distinct(group["protocol_fingerprint"]) or [None])[0])
        out.append(entry)
    columns = by + ["family", "metric", "mean", "std", "n_seeds", "n_undefined", "seeds", "synthetic",
                    "protocol_fingerprint"]
    return pd.DataFrame(out, columns=columns)


def completeness(frame: pd.DataFrame, expected_seeds: int | Iterable[int] = 5, *,
                 all_cells: bool = True) -> pd.DataFrame:
    """Per (encoder, protocol, regime): missing, failed and duplicated seeds, and mixed provenance.

    ``expected_seeds`` is a count (seeds 0..n-1) or the seeds themselves. With
    ``all_cells``, a (protocol, regime) that any encoder has is expected of every
    encoder, so an encoder missing a whole task shows up too.
    """
    expected = tuple(range(expected_seeds)) if isinstance(expected_seeds, int) else tuple(sorted(expected_seeds))
    records = frame.drop_duplicates("path") if "path" in frame else frame
    cells: dict[tuple, pd.DataFrame] = {tuple(k): g for k, g in records.groupby(CELL, sort=True)}
    if all_cells and len(records):
        families = records.drop_duplicates(["protocol", "regime"]).set_index(["protocol", "regime"])["family"]
        for encoder in sorted(records["encoder"].unique()):
            for (protocol, regime) in families.index:
                cells.setdefault((encoder, protocol, regime), records.iloc[0:0])
    out = []
    for (encoder, protocol, regime), group in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        ok = sorted(int(s) for s in group.loc[group["status"] == "ok", "seed"])
        failed = sorted(int(s) for s in group.loc[group["status"] == "failed", "seed"])
        present = ok + failed
        duplicates = sorted({s for s in present if present.count(s) > 1})
        missing = [s for s in expected if s not in present]
        mixed = _mixing(group)
        undefined = 0
        if len(group):
            rows = frame[frame["path"].isin(group["path"])] if "path" in frame else group
            undefined = int((rows["status"].eq("ok") & rows["metric"].notna() & rows["value"].isna()).sum())
        problems = []
        if not len(group):
            problems.append("no records")
        elif missing:
            problems.append(f"missing seeds {missing}")
        if failed:
            messages = _distinct(group.loc[group["status"] == "failed", "error"]) if "error" in group else []
            first = f" ({messages[0].splitlines()[0][:80]})" if messages else ""
            problems.append(f"failed seeds {sorted(set(failed))}{first}")
        if duplicates:
            problems.append(f"several records for seeds {duplicates}")
        for column, values in mixed.items():
            problems.append("mixes demo and real data" if column == "synthetic"
                            else f"mixes {len(values)} {column.replace('_', ' ')}s")
        family = group["family"].iloc[0] if len(group) else (
            records.loc[(records["protocol"] == protocol), "family"].iloc[0])
        out.append({"encoder": encoder, "protocol": protocol, "family": family, "regime": float(regime),
                    "seeds_ok": tuple(ok), "missing_seeds": tuple(missing), "failed_seeds": tuple(sorted(set(failed))),
                    "duplicate_seeds": tuple(duplicates), "mixed": tuple(mixed), "n_undefined_metrics": undefined,
                    "complete": not problems, "problems": "; ".join(problems)})
    columns = ["encoder", "protocol", "family", "regime", "seeds_ok", "missing_seeds", "failed_seeds",
               "duplicate_seeds", "mixed", "n_undefined_metrics", "complete", "problems"]
    return pd.DataFrame(out, columns=columns)


# ---------------------------------------------------------------------------
# a comparison's result
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """One paired test: A vs B, with the unit it paired over and the effect (mean of A - B)."""

    test: str
    unit: str
    n: int
    statistic: float
    p: float
    effect: float
    a: str = ""
    b: str = ""
    protocol: str = ""
    regime: float = math.nan
    metric: str = ""
    seeds: tuple[int, ...] = ()
    min_p: float = 0.0  # the smallest p this test could give with this n
    can_be_significant: bool = True
    ci: tuple[float, float] | None = None  # bootstrap percentile interval of the difference
    note: str = ""
    x: np.ndarray | None = field(default=None, repr=False, compare=False)  # the paired inputs of the test
    y: np.ndarray | None = field(default=None, repr=False, compare=False)

    def significant(self, alpha: float = ALPHA, p: float | None = None) -> bool:
        p = self.p if p is None else p
        return bool(self.can_be_significant and math.isfinite(p) and p < alpha)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("x"), out.pop("y")
        return out


def _undecided(test: str, unit: str, note: str, **extra) -> Comparison:
    return Comparison(test, unit, 0, math.nan, math.nan, math.nan, can_be_significant=False, note=note, **extra)


def wilcoxon_paired(x: Sequence[float], y: Sequence[float], unit: str, *, alpha: float = ALPHA,
                    note: str = "") -> Comparison:
    """scipy's two-sided Wilcoxon signed-rank test of x against y (pairs with a non-finite side dropped)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    finite = np.isfinite(x) & np.isfinite(y)
    dropped = int((~finite).sum())
    x, y = x[finite], y[finite]
    notes = [note] if note else []
    if dropped:
        notes.append(f"{dropped} pair(s) with an undefined value left out")
    test = "Wilcoxon signed-rank (two-sided)"
    if len(x) == 0:
        return _undecided(test, unit, "; ".join(notes + ["no pairs"]))
    d = x - y
    nonzero = int(np.count_nonzero(d))
    effect = float(np.mean(d))
    min_p = wilcoxon_min_p(nonzero)
    if nonzero == 0:
        notes.append("all differences are zero")
        return Comparison(test, unit, len(x), 0.0, 1.0, effect, min_p=min_p, can_be_significant=False,
                          note="; ".join(notes), x=x, y=y)
    result = stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    can = min_p < alpha
    if not can:
        notes.append(f"with n = {nonzero} a two-sided exact Wilcoxon test cannot reach p < {alpha:g} "
                     f"(smallest p = 2/2^{nonzero} = {min_p:.4g}); not marked significant")
    if nonzero < len(x):
        notes.append(f"{len(x) - nonzero} zero difference(s) dropped by the test")
    return Comparison(test, unit, len(x), float(result.statistic), float(result.pvalue), effect, min_p=min_p,
                      can_be_significant=can, note="; ".join(notes), x=x, y=y)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values; NaN stays NaN and does not count as a test."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="mergesort")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


# ---------------------------------------------------------------------------
# per-unit values from a record's units
# ---------------------------------------------------------------------------

def _array(values) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(float, copy=False)
    return np.array([[np.nan if v is None else v for v in row] if isinstance(row, list) else
                     (np.nan if row is None else row) for row in values], dtype=float)


def per_case_values(units: Mapping[str, Any], metric: str) -> np.ndarray | None:
    """One value per case (aligned with ``units["ids"]``), or None when the units have none for ``metric``.

    ``per_case[metric]`` when the family stored it; for single-label classification,
    accuracy's per-case correctness follows from labels, scores and thresholds.
    """
    per_case = units.get("per_case")
    if isinstance(per_case, Mapping) and metric in per_case:
        return _array(per_case[metric])
    task = units.get("task")
    if metric in ("acc", "accuracy") and task in ("binary", "multiclass") and "labels" in units:
        Y, S = _array(units["labels"]), _array(units["scores"])
        y = Y[:, 0]
        if task == "multiclass":
            pred = np.full(len(S), np.nan)
            scored = ~np.isnan(S).any(axis=1)
            pred[scored] = S[scored].argmax(axis=1)
        else:
            if units.get("thresholds") is None:
                return None
            pred = decisions(S, units["thresholds"])[:, 0]
        correct = (pred == y).astype(float)
        correct[np.isnan(y) | np.isnan(pred)] = np.nan
        return correct
    return None


def _ids(units: Mapping[str, Any]) -> list[str]:
    ids = [str(i) for i in units.get("ids", [])]
    if len(set(ids)) != len(ids):
        raise ValueError("units hold a case id more than once; cases cannot be paired")
    return ids


# ---------------------------------------------------------------------------
# set-level metrics under bootstrap weights (a resample = integer weights per case)
# ---------------------------------------------------------------------------

SetMetric = Callable[[Mapping[str, Any], str, np.ndarray], "np.ndarray | None"]
_SET_METRICS: dict[str, SetMetric] = {}


# the shipped families' set metrics, imported on first use (their modules import this one)
_SHIPPED_SET_METRICS = {"text_generation": "asap_bench.metrics.text:text_set_metric"}


def register_set_metric(task: str, fn: SetMetric) -> None:
    """Let a family's units (``units["task"] == task``) be bootstrapped: ``fn(units, metric, W)`` returns the
    metric for each row of weights ``W`` [replicates, cases] (NaN where undefined), or None if it has no such metric."""
    _SET_METRICS[task] = fn


def _registered(task: str | None) -> SetMetric | None:
    if task not in _SET_METRICS and task in _SHIPPED_SET_METRICS:
        module, _, name = _SHIPPED_SET_METRICS[task].partition(":")
        _SET_METRICS[task] = getattr(importlib.import_module(module), name)
    return _SET_METRICS.get(task)


# Internally weights are held cases-first, T = W.T [cases, replicates], so that picking
# and summing cases reads contiguous rows.

def _auc_t(y: np.ndarray, s: np.ndarray, T: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Weighted Mann-Whitney AUC (a tie counts one half) per replicate; NaN where a class has no weight.

    ``rows`` are the rows of ``T`` that ``y`` and ``s`` describe (all rows when None).
    """
    rows = np.arange(len(y)) if rows is None else rows
    pos, neg = rows[y == 1], rows[y == 0]
    if not len(pos) or not len(neg):
        return np.full(T.shape[1], np.nan)
    neg_s, pos_s = s[y == 0], s[y == 1]
    order = np.argsort(neg_s, kind="mergesort")
    neg_scores = neg_s[order]
    below = np.empty((len(neg) + 1, T.shape[1]))
    below[0] = 0.0
    np.cumsum(T[neg[order]], axis=0, out=below[1:])
    lo = np.searchsorted(neg_scores, pos_s, side="left")
    hi = np.searchsorted(neg_scores, pos_s, side="right")
    Tp = T[pos]
    if np.array_equal(lo, hi):
        num = np.einsum("ij,ij->j", Tp, below[lo])
    else:
        num = 0.5 * (np.einsum("ij,ij->j", Tp, below[lo]) + np.einsum("ij,ij->j", Tp, below[hi]))
    den = Tp.sum(axis=0) * below[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_auc(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    """ROC AUC per weight row of ``W`` [replicates, cases] (ties count one half); NaN where a class has no weight."""
    return _auc_t(np.asarray(y, dtype=float), np.asarray(s, dtype=float), np.ascontiguousarray(np.atleast_2d(W).T))


def _drawn(T: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Whether any case in ``mask`` carries weight, per replicate."""
    return T[mask].sum(axis=0) > 0 if mask.any() else np.zeros(T.shape[1], dtype=bool)


def _auc_column(y: np.ndarray, s: np.ndarray, T: np.ndarray) -> np.ndarray:
    """binary_auc on the labelled cases of one column: NaN where a drawn labelled case has no score."""
    known = ~np.isnan(y)
    scored = known & ~np.isnan(s)
    value = _auc_t(y[scored], s[scored], T, np.flatnonzero(scored))
    value[_drawn(T, known & np.isnan(s))] = np.nan
    return value


def _decision_metric(metric: str, y: np.ndarray, pred: np.ndarray, T: np.ndarray,
                     labels: Sequence[int]) -> np.ndarray:
    """acc / balanced_acc / f1_macro on the labelled cases, per replicate."""
    known = ~np.isnan(y)
    bad = _drawn(T, known & np.isnan(pred))
    y, pred, Tk = y[known], pred[known], T[known]
    total = Tk.sum(axis=0)
    weight = lambda mask: Tk[mask].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "acc":
            value = np.where(total > 0, weight(y == pred) / total, np.nan)
        elif metric == "balanced_acc":
            recalls, present = [], []
            for c in np.unique(y):
                in_c = weight(y == c)
                present.append(in_c > 0)
                recalls.append(np.where(in_c > 0, weight((y == c) & (pred == c)) / np.where(in_c > 0, in_c, 1), 0.0))
            if recalls:
                R, P = np.array(recalls), np.array(present)
                value = np.where(P.sum(axis=0) >= 2, R.sum(axis=0) / np.maximum(P.sum(axis=0), 1), np.nan)
            else:
                value = np.full(T.shape[1], np.nan)
        elif metric == "f1_macro":
            scores = []
            for c in labels:
                tp = weight((y == c) & (pred == c))
                fp, fn = weight((y != c) & (pred == c)), weight((y == c) & (pred != c))
                den = 2 * tp + fp + fn
                scores.append(np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan))
            value = _nanmean_rows(np.array(scores))
        else:
            raise ValueError(f"no weighted form of {metric!r}")
    value[bad | (total == 0)] = np.nan
    return value


def _nanmean_rows(M: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the defined entries; NaN where none is defined."""
    count = np.isfinite(M).sum(axis=0)
    total = np.where(np.isfinite(M), M, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _classification_metric(units: Mapping[str, Any], metric: str, T: np.ndarray) -> np.ndarray | None:
    """score_outputs under weights: the same conventions (macro over defined labels, stored thresholds)."""
    if metric not in CLS_METRICS:
        return None
    kind = units["task"]
    Y, S = _array(units["labels"]), _array(units["scores"])
    if kind == "multiclass":
        keep = ~np.isnan(Y[:, 0])
        y, P, Tk = Y[keep, 0], S[keep], T[keep]
        unscored = np.isnan(P).any(axis=1)
        if metric == "auc":
            if unscored.any():
                per_class = np.full((P.shape[1], T.shape[1]), np.nan)
            else:
                rows = np.flatnonzero(keep)
                per_class = np.array([_auc_t((y == c).astype(float), P[:, c], T, rows) for c in range(P.shape[1])])
            value = _nanmean_rows(per_class)
            value[_drawn(Tk, unscored)] = np.nan
            return value
        pred = np.full(len(P), np.nan)
        pred[~unscored] = P[~unscored].argmax(axis=1)
        return _decision_metric(metric, y, pred, Tk, range(S.shape[1]))
    if metric == "auc":
        per_label = np.array([_auc_column(Y[:, j], S[:, j], T) for j in range(Y.shape[1])])
    else:
        if units.get("thresholds") is None:
            return None
        pred = decisions(S, units["thresholds"])
        per_label = np.array([_decision_metric(metric, Y[:, j], pred[:, j], T, (0, 1)) for j in range(Y.shape[1])])
    return per_label[0] if len(per_label) == 1 else _nanmean_rows(per_label)


def _pair_matrices(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Comparable pairs (i fails first: an event before j's time, or at a censored j's time) and their concordance."""
    t, e, r = (np.nan_to_num(a) for a in (time, event, risk))
    e = e.astype(bool)
    comparable = e[:, None] & ((t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :]))
    concordant = comparable * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :]))
    return comparable.astype(float), concordant


def _c_index_t(time, event, risk, T: np.ndarray, pairs=None) -> np.ndarray:
    bad = _drawn(T, np.isnan(time) | np.isnan(event) | np.isnan(risk))
    comparable, concordant = pairs if pairs is not None else _pair_matrices(time, event, risk)
    num = ((concordant.T @ T) * T).sum(axis=0)
    den = ((comparable.T @ T) * T).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    value[bad] = np.nan
    return value


def weighted_c_index(time, event, risk, W: np.ndarray) -> np.ndarray:
    """Harrell's C per weight row of ``W`` [replicates, cases], with ``metrics.survival.c_index``'s pair rule."""
    return _c_index_t(_array(time), _array(event), _array(risk), np.ascontiguousarray(np.atleast_2d(W).T))


def _survival_metric(units: Mapping[str, Any], metric: str, T: np.ndarray) -> np.ndarray | None:
    if metric == "c_index":
        time, event, risk = _array(units["time"]), _array(units["event"]), _array(units["risk"])
        cache = units.get("_prepared")
        if cache is None:
            return _c_index_t(time, event, risk, T)
        if "pairs" not in cache:
            cache["pairs"] = _pair_matrices(time, event, risk)
        return _c_index_t(time, event, risk, T, cache["pairs"])
    horizon = units.get("horizons", {}).get(metric)
    if horizon is None:
        return None
    return _auc_column(_array(horizon["labels"]), _array(horizon["scores"]), T)


def _per_case_mean(units: Mapping[str, Any], metric: str, T: np.ndarray) -> np.ndarray | None:
    values = per_case_values(units, metric)
    if values is None:
        return None
    defined = np.isfinite(values)
    Td = T[defined]
    total = Td.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, values[defined] @ Td / np.where(total > 0, total, 1), np.nan)


def set_metric(units: Mapping[str, Any], metric: str, W: np.ndarray) -> np.ndarray | None:
    """``metric`` recomputed from ``units`` under each row of case weights ``W`` [replicates, cases];
    None when the units cannot give it."""
    W = np.atleast_2d(np.asarray(W, dtype=float))
    task = units.get("task")
    if _registered(task) is not None:
        value = _SET_METRICS[task](units, metric, W)
        if value is not None:
            return np.asarray(value, dtype=float)
    T = np.ascontiguousarray(W.T)
    if task in ("binary", "multilabel", "multiclass"):
        value = _classification_metric(units, metric, T)
        if value is not None:
            return value
    if task == "survival":
        value = _survival_metric(units, metric, T)
        if value is not None:
            return value
    return _per_case_mean(units, metric, T)


def resample_units(units: Mapping[str, Any], index: Sequence[int]) -> dict[str, Any]:
    """The units of the cases at ``index`` (repeats allowed): what a bootstrap replicate scores."""
    index = list(index)
    out = dict(units)
    for key in ("ids", "labels", "scores", "time", "event", "risk"):
        if key in units:
            out[key] = [units[key][i] for i in index]
    if "horizons" in units:
        out["horizons"] = {m: dict(h, labels=[h["labels"][i] for i in index], scores=[h["scores"][i] for i in index])
                           for m, h in units["horizons"].items()}
    if isinstance(units.get("per_case"), Mapping):
        out["per_case"] = {m: [v[i] for i in index] for m, v in units["per_case"].items()}
    return out


# ---------------------------------------------------------------------------
# paired tests on units
# ---------------------------------------------------------------------------

def case_wilcoxon(units_a: Mapping[int, Mapping], units_b: Mapping[int, Mapping], metric: str, *,
                  pool_seeds: str = "mean", alpha: float = ALPHA) -> Comparison:
    """Wilcoxon over cases of a per-case quantity, pairs matched by case id and seed (see module doc)."""
    if pool_seeds not in ("mean", "stack"):
        raise ValueError(f"pool_seeds is 'mean' or 'stack', not {pool_seeds!r}")
    seeds = sorted(set(units_a) & set(units_b))
    pairs: dict[str, list[tuple[float, float]]] = {}
    stacked_a, stacked_b = [], []
    for s in seeds:
        va, vb = per_case_values(units_a[s], metric), per_case_values(units_b[s], metric)
        if va is None or vb is None:
            raise ValueError(f"seed {s}: the units hold no per-case values of {metric!r}")
        ib = {c: i for i, c in enumerate(_ids(units_b[s]))}
        for i, case in enumerate(_ids(units_a[s])):
            if case in ib:
                x, y = va[i], vb[ib[case]]
                if np.isfinite(x) and np.isfinite(y):
                    pairs.setdefault(case, []).append((x, y))
                    stacked_a.append(x)
                    stacked_b.append(y)
    if pool_seeds == "mean":
        cases = sorted(pairs)
        x = np.array([np.mean([p[0] for p in pairs[c]]) for c in cases])
        y = np.array([np.mean([p[1] for p in pairs[c]]) for c in cases])
        unit, note = "case", f"per-case values averaged over {len(seeds)} seed(s)"
    else:
        x, y = np.array(stacked_a), np.array(stacked_b)
        unit, note = "case x seed", f"(case, seed) pairs from {len(seeds)} seed(s)"
    return _with(wilcoxon_paired(x, y, unit, alpha=alpha, note=note), seeds=tuple(seeds))


def label_wilcoxon(units_a: Mapping[int, Mapping], units_b: Mapping[int, Mapping], *, alpha: float = ALPHA,
                   record_values: tuple[Mapping[int, float], Mapping[int, float]] | None = None,
                   tol: float = 1e-6) -> Comparison:
    """Wilcoxon over labels of the per-label AUC, each averaged over the seeds both encoders define it in.

    ``record_values`` (the records' macro AUC per seed) must equal the mean of the defined per-label values.
    """
    seeds = sorted(set(units_a) & set(units_b))
    if record_values is not None:
        for which, units, values in (("A", units_a, record_values[0]), ("B", units_b, record_values[1])):
            for s in seeds:
                defined = [v for v in units[s].get("per_label", {}).values() if v is not None and math.isfinite(v)]
                reported = values.get(s)
                if defined and reported is not None and math.isfinite(reported) and \
                        not abs(float(np.mean(defined)) - reported) <= tol:
                    raise ValueError(f"encoder {which} seed {s}: the mean per-label AUC of the units is "
                                     f"{np.mean(defined):.6g}, the record says {reported:.6g}; refusing to test it")
    names: list[str] = []
    for s in seeds:
        for name in units_a[s].get("per_label", {}):
            if name not in names:
                names.append(name)
    x, y, kept = [], [], []
    for name in names:
        pa, pb = [], []
        for s in seeds:
            va, vb = units_a[s].get("per_label", {}).get(name), units_b[s].get("per_label", {}).get(name)
            if va is not None and vb is not None and math.isfinite(va) and math.isfinite(vb):
                pa.append(va)
                pb.append(vb)
        if pa:
            x.append(float(np.mean(pa)))
            y.append(float(np.mean(pb)))
            kept.append(name)
    note = f"per-label AUC averaged over {len(seeds)} seed(s); {len(kept)} of {len(names)} labels defined"
    return _with(wilcoxon_paired(x, y, "label", alpha=alpha, note=note), seeds=tuple(seeds))


def bootstrap_p(observed: float, replicates: np.ndarray) -> float:
    """Two-sided bootstrap p: twice the share (add-one) of replicate differences on the far side of 0."""
    d = np.asarray(replicates, dtype=float)
    d = d[np.isfinite(d)]
    if not math.isfinite(observed) or len(d) == 0:
        return math.nan
    if observed == 0:
        return 1.0
    far = int((d <= 0).sum()) if observed > 0 else int((d >= 0).sum())
    return min(1.0, 2.0 * (1 + far) / (len(d) + 1))


def paired_bootstrap(units_a: Mapping[int, Mapping], units_b: Mapping[int, Mapping], metric: str, *,
                     n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA,
                     record_values: tuple[Mapping[int, float], Mapping[int, float]] | None = None,
                     tol: float = 1e-6) -> Comparison:
    """Paired bootstrap over test cases of a set-level metric, pooling seeds (see the module doc for p).

    ``record_values`` (per seed, per encoder) are checked against the metric recomputed
    from the units where the units' cases are all shared: a record whose number does not
    follow from its units is refused.
    """
    test = f"paired bootstrap over cases (two-sided, B={n_boot})"
    seeds = sorted(set(units_a) & set(units_b))
    if not seeds:
        return _undecided(test, "case (bootstrap)", "no seed has units for both encoders")
    common: dict[int, list[str]] = {}
    for s in seeds:
        ids_b = set(_ids(units_b[s]))
        common[s] = sorted(c for c in _ids(units_a[s]) if c in ids_b)
    shared = all(set(common[s]) == set(common[seeds[0]]) for s in seeds)
    rng = np.random.default_rng(seed)

    def draw(m: int) -> np.ndarray:
        idx = rng.integers(0, m, size=(n_boot, m))
        flat = (idx + np.arange(n_boot)[:, None] * m).ravel()
        return np.bincount(flat, minlength=n_boot * m).reshape(n_boot, m).astype(float)

    shared_counts = draw(len(common[seeds[0]])) if shared and common[seeds[0]] else None
    diffs, observed = [], []
    for s in seeds:
        ids = common[s]
        if not ids:
            continue
        counts = shared_counts if shared else draw(len(ids))
        per_encoder = []
        for which, units in (("A", units_a[s]), ("B", units_b[s])):
            position = {c: i for i, c in enumerate(_ids(units))}
            rows = np.array([position[c] for c in ids])
            values = _chunked_metric(_numeric(units), metric, rows, len(position), counts)
            if values is None:
                raise ValueError(f"no way to recompute {metric!r} from units of task {units.get('task')!r}; "
                                 "register one with stats.register_set_metric")
            if record_values is not None and len(ids) == len(position):
                reported = record_values[0 if which == "A" else 1].get(s)
                if reported is not None and math.isfinite(reported) and not abs(values[0] - reported) <= tol:
                    raise ValueError(f"encoder {which} seed {s}: {metric} recomputed from the units is "
                                     f"{values[0]:.6g}, the record says {reported:.6g}; refusing to test it "
                                     "(a metric that is not a mean of per-case values needs "
                                     "stats.register_set_metric)")
            per_encoder.append(values)
        observed.append(per_encoder[0][0] - per_encoder[1][0])
        diffs.append(per_encoder[0][1:] - per_encoder[1][1:])
    n = len(common[seeds[0]]) if shared else int(np.mean([len(v) for v in common.values()]))
    if not diffs:
        return _undecided(test, "case (bootstrap)", "no shared test cases", seeds=tuple(seeds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        effect = float(np.nanmean(observed)) if np.isfinite(observed).any() else math.nan
        D = np.array(diffs)
        replicate = np.where(np.isfinite(D).any(axis=0), np.nanmean(D, axis=0), np.nan)
    kept = replicate[np.isfinite(replicate)]
    p = bootstrap_p(effect, kept)
    notes = [f"{len(seeds)} seed(s) pooled; " + ("one resample of the shared test ids for every seed" if shared
                                               else "test ids differ between seeds: one resample per seed")]
    if len(kept) < n_boot:
        notes.append(f"{n_boot - len(kept)} replicate(s) with an undefined metric dropped")
    if not math.isfinite(effect):
        notes.append(f"{metric} is undefined on the test cases")
    min_p = 2.0 / (len(kept) + 1) if len(kept) else 1.0
    ci = (float(np.percentile(kept, 2.5)), float(np.percentile(kept, 97.5))) if len(kept) else None
    return Comparison(test, "case (bootstrap)", n, effect, p, effect, seeds=tuple(seeds), min_p=min_p,
                      can_be_significant=bool(math.isfinite(p) and min_p < alpha), ci=ci, note="; ".join(notes))


def _numeric(units: Mapping[str, Any]) -> dict[str, Any]:
    """The units with their per-case lists parsed to arrays once, not once per chunk of replicates."""
    out = dict(units)
    for key in ("labels", "scores", "time", "event", "risk"):
        if key in units:
            out[key] = _array(units[key])
    if "horizons" in units:
        out["horizons"] = {m: dict(h, labels=_array(h["labels"]), scores=_array(h["scores"]))
                           for m, h in units["horizons"].items()}
    if isinstance(units.get("per_case"), Mapping):
        out["per_case"] = {m: _array(v) for m, v in units["per_case"].items()}
    out["_prepared"] = {}  # per-units precomputation shared by the chunks (the C-index's pair matrices)
    return out


def _chunked_metric(units: Mapping[str, Any], metric: str, rows: np.ndarray, n_cases: int, counts: np.ndarray,
                    chunk: int = 256) -> np.ndarray | None:
    """The metric on the shared cases (first value), then under each replicate's counts, a chunk at a time."""
    out = []
    for block in [np.ones((1, len(rows)))] + [counts[i:i + chunk] for i in range(0, len(counts), chunk)]:
        W = np.zeros((len(block), n_cases))
        W[:, rows] = block
        values = set_metric(units, metric, W)
        if values is None:
            return None
        out.append(values)
    return np.concatenate(out)


def _with(comparison: Comparison, **fields) -> Comparison:
    return Comparison(**{**{k: getattr(comparison, k) for k in comparison.__dataclass_fields__}, **fields})


# ---------------------------------------------------------------------------
# comparisons on the frame
# ---------------------------------------------------------------------------

def _units_of(row: pd.Series) -> Mapping[str, Any] | None:
    units_path = row.get("units_path")
    if isinstance(units_path, str):
        return load_units(units_path)
    path = row.get("path")
    if isinstance(path, str) and path:
        record = read_record(Path(path))
        if record.units_file:
            return load_units(Path(path).parent / record.units_file)
    return None


def _setting_rows(frame: pd.DataFrame, protocol: str, regime: float, metric: str,
                  keep: Mapping[str, Any] | None) -> pd.DataFrame:
    rows = _ok_rows(_select(frame, keep))
    rows = rows[(rows["protocol"] == protocol) & np.isclose(rows["regime"].astype(float), float(regime))
                & (rows["metric"] == metric)]
    what = f"comparing on {protocol} regime {float(regime):g} {metric}"
    if "source" in rows and rows["source"].nunique() > 1:
        raise ValueError(f"{what}: rows come from sources {sorted(rows['source'].unique())}; "
                         "pass keep={'source': ...} to choose one")
    setting = rows.drop(columns=["encoder_fingerprint"], errors="ignore")
    _refuse_mixing(setting.assign(setting=f"{protocol}@{float(regime):g}"), ["setting"], what)
    _refuse_mixing(rows, ["encoder"], what)
    _refuse_duplicates(rows, what)
    return rows


def auto_unit(metric: str, units: Mapping[str, Any] | None) -> str:
    """The finest honest unit the units allow for ``metric``."""
    if units is None:
        return "seed"
    if metric == "auc" and units.get("task") == "multilabel" and len(units.get("per_label", {})) >= 2:
        return "label"
    if not is_set_level(metric) and per_case_values(units, metric) is not None:
        return "case"
    return "bootstrap" if bootstrappable(units, metric) else "seed"


def bootstrappable(units: Mapping[str, Any], metric: str) -> bool:
    """Whether ``set_metric`` can recompute ``metric`` from these units (checked without computing it)."""
    task = units.get("task")
    if not units.get("ids"):
        return False
    if _registered(task) is not None:
        return True
    if task in ("binary", "multilabel", "multiclass") and metric in CLS_METRICS:
        return metric == "auc" or task == "multiclass" or units.get("thresholds") is not None
    if task == "survival" and (metric == "c_index" or metric in units.get("horizons", {})):
        return True
    return per_case_values(units, metric) is not None


def compare(frame: pd.DataFrame, a: str, b: str, *, protocol: str, regime: float, metric: str,
            unit: str = "auto", alpha: float = ALPHA, n_boot: int = N_BOOT, seed: int = 0,
            pool_seeds: str = "mean", keep: Mapping[str, Any] | None = None) -> Comparison:
    """Encoder ``a`` vs ``b`` on one setting, paired at ``unit`` ('auto' picks the finest honest one)."""
    if unit not in UNITS:
        raise ValueError(f"unit is one of {UNITS}, not {unit!r}")
    rows = _setting_rows(frame, protocol, regime, metric, keep)
    ra, rb = rows[rows["encoder"] == a], rows[rows["encoder"] == b]
    context = dict(a=a, b=b, protocol=protocol, regime=float(regime), metric=metric)
    if ra.empty or rb.empty:
        missing = [e for e, r in ((a, ra), (b, rb)) if r.empty]
        return _undecided("none", unit, f"no ok records of {missing} for this setting", **context)
    values_a = {int(r.seed): float(r.value) for r in ra.itertuples()}
    values_b = {int(r.seed): float(r.value) for r in rb.itertuples()}
    seeds = sorted(set(values_a) & set(values_b))
    if unit != "seed":
        units_a = {int(r["seed"]): _units_of(r) for _, r in ra.iterrows() if int(r["seed"]) in seeds}
        units_b = {int(r["seed"]): _units_of(r) for _, r in rb.iterrows() if int(r["seed"]) in seeds}
        have = [s for s in seeds if units_a.get(s) is not None and units_b.get(s) is not None]
        if unit == "auto":
            unit = auto_unit(metric, units_a[have[0]]) if have else "seed"
        units_a = {s: units_a[s] for s in have}
        units_b = {s: units_b[s] for s in have}
    if unit == "seed":
        x = [values_a[s] for s in seeds]
        y = [values_b[s] for s in seeds]
        result = wilcoxon_paired(x, y, "seed", alpha=alpha, note=f"record values of {len(seeds)} shared seed(s)")
        return _with(result, seeds=tuple(seeds), test="Wilcoxon signed-rank over seeds (two-sided)", **context)
    if unit == "case":
        result = case_wilcoxon(units_a, units_b, metric, pool_seeds=pool_seeds, alpha=alpha)
    elif unit == "label":
        result = label_wilcoxon(units_a, units_b, alpha=alpha, record_values=(values_a, values_b))
    else:
        result = paired_bootstrap(units_a, units_b, metric, n_boot=n_boot, seed=seed, alpha=alpha,
                                  record_values=(values_a, values_b))
    if len(have) < len(seeds):
        result = _with(result, note=f"{result.note}; {len(seeds) - len(have)} seed(s) without units left out")
    return _with(result, **context)


def seed_wilcoxon(frame: pd.DataFrame, a: str, b: str, *, protocol: str, regime: float, metric: str,
                  alpha: float = ALPHA, keep: Mapping[str, Any] | None = None) -> Comparison:
    """Wilcoxon over seeds; flagged (never significant) when n cannot reach ``alpha`` (n = 5: min p = 0.0625)."""
    return compare(frame, a, b, protocol=protocol, regime=regime, metric=metric, unit="seed", alpha=alpha, keep=keep)


def best_other(frame: pd.DataFrame, *, metrics: Sequence[str] | None = None, unit: str = "auto",
               alpha: float = ALPHA, holm_correction: bool = True, n_boot: int = N_BOOT, seed: int = 0,
               only_best: bool = False, pool_seeds: str = "mean", keep: Mapping[str, Any] | None = None,
               lower_is_better: Iterable[str] | None = None) -> pd.DataFrame:
    """Each encoder vs the best other one (by mean over seeds) in every (protocol, regime, metric) setting.

    Call once per table: Holm's correction runs over every comparison returned (on by
    default). ``only_best`` compares just the best encoder of each setting with the
    runner-up (the dagger of a table). ``better`` says whether the encoder's mean is on
    the good side of the other's; ``significant`` is p_adjusted < alpha on a test that can reach alpha.
    """
    agg = aggregate(frame, keep=keep, metrics=metrics)
    out = []
    for (protocol, regime, metric), cell in agg.groupby(["protocol", "regime", "metric"], sort=True):
        cell = cell[np.isfinite(cell["mean"])]
        if len(cell) < 2:
            continue
        sign = 1.0 if higher_is_better(metric, lower_is_better) else -1.0
        ranked = cell.assign(_key=sign * cell["mean"]).sort_values(["_key", "encoder"], ascending=[False, True])
        encoders = list(ranked["encoder"])
        means = dict(zip(ranked["encoder"], ranked["mean"]))
        for encoder in (encoders[:1] if only_best else encoders):
            other = next(e for e in encoders if e != encoder)
            c = compare(frame, encoder, other, protocol=protocol, regime=regime, metric=metric, unit=unit,
                        alpha=alpha, n_boot=n_boot, seed=seed, pool_seeds=pool_seeds, keep=keep)
            row = c.as_dict()
            row.update(family=cell["family"].iloc[0], encoder=encoder, other=other, mean=means[encoder],
                       other_mean=means[other],
                       better=bool(sign * (means[encoder] - means[other]) > 0))
            out.append(row)
    first = ["protocol", "family", "regime", "metric", "encoder", "other", "mean", "other_mean", "better",
             "test", "unit", "n", "statistic", "p", "p_adjusted", "significant", "effect"]
    table = pd.DataFrame(out)
    if table.empty:
        return pd.DataFrame(columns=first)
    table["p_adjusted"] = holm(table["p"].to_numpy()) if holm_correction else table["p"]
    table["significant"] = [bool(can and math.isfinite(p) and p < alpha)
                            for can, p in zip(table["can_be_significant"], table["p_adjusted"])]
    table["correction"] = f"Holm over {int(np.isfinite(table['p']).sum())} tests" if holm_correction else "none"
    return table[first + [c for c in table.columns if c not in first]].drop(columns=["a", "b"])


# ---------------------------------------------------------------------------
# across tasks: Wilcoxon over settings, mean ranks, critical difference
# ---------------------------------------------------------------------------

def settings_matrix(frame: pd.DataFrame, *, metrics: Sequence[str] | None = None,
                    encoders: Sequence[str] | None = None, keep: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Mean over seeds per setting (rows: protocol, regime, metric) and encoder (columns), complete rows only.

    Takes a record frame or an ``aggregate`` frame.
    """
    agg = (_select(frame, keep) if "mean" in frame and "value" not in frame
           else aggregate(frame, keep=keep, metrics=metrics))
    if metrics is not None:
        agg = agg[agg["metric"].isin(list(metrics))]
    twice = agg[agg.duplicated(["encoder", "protocol", "regime", "metric"], keep=False)]
    if len(twice):
        first = twice.iloc[0]
        raise ValueError(f"{first['encoder']} {first['protocol']} regime {first['regime']:g} {first['metric']} "
                         "appears more than once (several sources?); pass keep={'source': ...}")
    matrix = agg.pivot_table(index=["protocol", "regime", "metric"], columns="encoder", values="mean",
                             aggfunc="first")
    if encoders is not None:
        absent = [e for e in encoders if e not in matrix.columns]
        if absent:
            raise KeyError(f"no results for encoder(s) {absent}")
        matrix = matrix[list(encoders)]
    return matrix.dropna(axis=0, how="any")


def _oriented(matrix: pd.DataFrame, lower_is_better: Iterable[str] | None) -> pd.DataFrame:
    signs = np.array([1.0 if higher_is_better(m, lower_is_better) else -1.0
                      for m in matrix.index.get_level_values("metric")])
    return matrix.mul(signs, axis=0)


def setting_differences(matrix: pd.DataFrame, a: str, b: str, scale: str = "relative",
                        lower_is_better: Iterable[str] | None = None) -> pd.Series:
    """Per setting, how much better ``a`` is than ``b`` on ``scale`` (see ``SCALES``); positive: ``a`` better.

    The relative scale divides by the pooled magnitude of the two values of the same
    setting, so rescaling a metric (mm or m, fraction or percent), or giving a distance as
    its negation with higher-is-better, leaves every difference as it is.
    """
    if scale not in SCALES:
        raise ValueError(f"scale is one of {sorted(SCALES)}, not {scale!r}")
    oriented = _oriented(matrix[[a, b]], lower_is_better)
    d = oriented[a] - oriented[b]
    if scale == "relative":
        pooled = (matrix[a].abs() + matrix[b].abs()) / 2.0
        with np.errstate(invalid="ignore", divide="ignore"):
            d = d.where(d == 0, d / pooled)
    return d.rename(f"{a} - {b} ({scale})")


def across_settings(frame: pd.DataFrame, a: str, b: str, *, metrics: Sequence[str] | None = None,
                    alpha: float = ALPHA, keep: Mapping[str, Any] | None = None,
                    lower_is_better: Iterable[str] | None = None, scale: str = "relative") -> Comparison:
    """Two-sided Wilcoxon signed-rank over every setting both encoders have (unit: setting, n: settings).

    Each setting (protocol x regime x metric) gives one difference of the seed means on
    ``scale``. The default, ``relative``, is (A - B) / ((|A| + |B|) / 2), sign-aligned so
    a positive value means ``a`` is better: it has no unit, so HD95 in mm or in m, or a
    metric in percent or as a fraction, give the same p; it stays finite when one value
    is 0 (|d| = 2) and is a tie when both are. Dividing by |B| alone would be undefined
    at B = 0, and by the seed std undefined for one seed or identical seeds. ``raw``
    ranks A - B as it is, which only means something when every metric shares a unit.
    ``effect`` is the mean difference on that scale.
    """
    matrix = settings_matrix(frame, metrics=metrics, encoders=[a, b], keep=keep)
    d = setting_differences(matrix, a, b, scale, lower_is_better)
    result = wilcoxon_paired(d.to_numpy(), np.zeros(len(d)), "setting", alpha=alpha,
                             note=f"{len(matrix)} settings (task x regime x metric), seed means; "
                                  f"scale: {SCALES[scale]}")
    return _with(result, a=a, b=b, metric=",".join(sorted(set(matrix.index.get_level_values("metric")))))


def wilcoxon_method(differences: Sequence[float]) -> str:
    """How scipy's ``wilcoxon(method="auto")`` gets its p for these differences, in words for a caption."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    nonzero = np.abs(d[d != 0])
    ties = len(np.unique(nonzero)) < len(nonzero)
    if len(d) > 50:
        return f"normal approximation with tie correction (n = {len(d)} > 50)"
    if not ties and len(nonzero) == len(d):
        return "exact null distribution"
    if len(d) <= 13:
        return "exact permutation distribution (ties or zeros)"
    return "normal approximation with tie correction (ties or zeros)"


def sign_test(differences: Sequence[float]) -> tuple[int, int, int, float]:
    """(wins, ties, losses, two-sided exact binomial p over the non-tied): unchanged by any monotone rescaling."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    return wins, int((d == 0).sum()), losses, p


def mean_ranks(frame: pd.DataFrame, *, metrics: Sequence[str] | None = None, encoders: Sequence[str] | None = None,
               keep: Mapping[str, Any] | None = None, lower_is_better: Iterable[str] | None = None) -> pd.Series:
    """Mean rank per encoder (1 = best, ties averaged) over the settings every encoder has."""
    matrix = _oriented(settings_matrix(frame, metrics=metrics, encoders=encoders, keep=keep), lower_is_better)
    ranks = matrix.rank(axis=1, ascending=False, method="average")
    return ranks.mean(axis=0).sort_values().rename("mean_rank")


@dataclass(frozen=True)
class CriticalDifference:
    """Friedman test over settings and the Nemenyi critical difference of mean ranks."""

    k: int  # encoders
    n: int  # settings (blocks)
    statistic: float
    p: float
    alpha: float
    q_alpha: float  # studentized range quantile / sqrt(2)
    cd: float
    mean_ranks: pd.Series
    cliques: list[tuple[str, ...]]  # groups whose mean ranks differ by less than cd

    def different(self, a: str, b: str) -> bool:
        return bool(abs(self.mean_ranks[a] - self.mean_ranks[b]) >= self.cd)


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """(q_alpha, CD) with q_alpha = studentized_range.ppf(1 - alpha, k, inf) / sqrt(2), CD = q sqrt(k(k+1)/(6n))."""
    q = float(stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))
    return q, q * math.sqrt(k * (k + 1) / (6.0 * n))


def cliques(ranks: pd.Series, cd: float) -> list[tuple[str, ...]]:
    """Maximal runs of encoders (in rank order) whose mean ranks lie within less than ``cd`` of each other."""
    ranks = ranks.sort_values()
    names, values = list(ranks.index), ranks.to_numpy()
    groups: list[tuple[str, ...]] = []
    last_end = -1
    for i in range(len(names)):
        j = i
        while j + 1 < len(names) and values[j + 1] - values[i] < cd:
            j += 1
        if j > i and j > last_end:
            groups.append(tuple(names[i:j + 1]))
            last_end = j
    return groups


def critical_difference(frame: pd.DataFrame, *, alpha: float = ALPHA, metrics: Sequence[str] | None = None,
                        encoders: Sequence[str] | None = None, keep: Mapping[str, Any] | None = None,
                        lower_is_better: Iterable[str] | None = None) -> CriticalDifference:
    """Friedman (scipy.stats.friedmanchisquare) over the complete settings, then the Nemenyi CD and cliques."""
    matrix = _oriented(settings_matrix(frame, metrics=metrics, encoders=encoders, keep=keep), lower_is_better)
    k, n = matrix.shape[1], matrix.shape[0]
    if k < 3:
        raise ValueError(f"a critical-difference analysis needs at least 3 encoders, got {k}")
    if n < 2:
        raise ValueError(f"a critical-difference analysis needs at least 2 complete settings, got {n}")
    result = stats.friedmanchisquare(*[matrix[c].to_numpy() for c in matrix.columns])
    ranks = matrix.rank(axis=1, ascending=False, method="average").mean(axis=0).sort_values().rename("mean_rank")
    q, cd = nemenyi_cd(k, n, alpha)
    return CriticalDifference(k, n, float(result.statistic), float(result.pvalue), alpha, q, cd, ranks,
                              cliques(ranks, cd))
