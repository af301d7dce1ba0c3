"""Classification metrics: thin wrappers over scikit-learn that never invent a number.

Every function returns a ``Metric``. Where a metric is undefined on its inputs (no
cases, a single class in the labels, cases without a score) the value is NaN and
``reason`` says why, so a degenerate test set shows up as a gap with an explanation
rather than a crash or a fake 0.5. Macro averages run over the labels whose value is
defined and name the ones they skipped, so a reader can tell 18-label AUC from 16-label AUC.

``score_outputs`` computes a protocol's metrics from stored per-case outputs (labels,
scores, decision thresholds); the linear probe scores test through it, so a record's
metrics can be recomputed from its own units.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

NAN = float("nan")


@dataclass(frozen=True)
class Metric:
    """A metric value; NaN with ``reason`` when undefined, and what a macro average skipped."""

    value: float
    reason: str = ""
    per_label: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # label -> why it is not in the average

    @property
    def defined(self) -> bool:
        return not math.isnan(self.value)


def undefined(reason: str, **extra) -> Metric:
    return Metric(NAN, reason, **extra)


def as_vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def same_length(*arrays: np.ndarray) -> None:
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise ValueError(f"inputs have different numbers of cases: {sorted(lengths)}")


def _class_problem(y: np.ndarray, allowed: set[int] | None = None) -> str:
    """Why integer labels ``y`` cannot be scored ('' when they can)."""
    if y.size == 0:
        return "no cases"
    if np.isnan(y).any():
        return f"{int(np.isnan(y).sum())} case(s) have no label; drop unlabelled cases first"
    if allowed is not None and not set(np.unique(y).tolist()) <= allowed:
        raise ValueError(f"labels must be in {sorted(allowed)}, got {sorted(set(np.unique(y).tolist()))}")
    return ""


def _one_class(y: np.ndarray) -> str:
    present = np.unique(y)
    if len(present) < 2:
        return f"only class {int(present[0])} is present in {y.size} case(s); the metric needs both classes"
    return ""


# ---------------------------------------------------------------------------
# AUC
# ---------------------------------------------------------------------------

def binary_auc(y_true, y_score) -> Metric:
    """ROC AUC of one binary label; NaN when the labels hold one class only."""
    y, s = as_vector(y_true, "y_true"), as_vector(y_score, "y_score")
    same_length(y, s)
    problem = _class_problem(y, {0, 1}) or _one_class(y)
    if not problem and np.isnan(s).any():
        problem = f"{int(np.isnan(s).sum())} case(s) have no score"
    if problem:
        return undefined(problem)
    return Metric(float(roc_auc_score(y, s)))


def macro_over_labels(per_label: dict[str, Metric], what: str) -> Metric:
    """Unweighted mean over the labels whose value is defined; the rest are named as skipped."""
    values = {name: m.value for name, m in per_label.items()}
    skipped = {name: m.reason for name, m in per_label.items() if not m.defined}
    kept = [v for v in values.values() if not math.isnan(v)]
    if not kept:
        detail = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "no labels"
        return undefined(f"{what} is undefined for every label ({detail})", per_label=values, skipped=skipped)
    reason = ""
    if skipped:
        reason = (f"macro {what} over {len(kept)} of {len(values)} labels; skipped "
                  + "; ".join(f"{n} ({r})" for n, r in skipped.items()))
    return Metric(float(np.mean(kept)), reason, per_label=values, skipped=skipped)


def macro_auc(y_true, y_score, names: Sequence[str] | None = None) -> Metric:
    """Multi-label (or single-label) AUC: one AUC per column, macro-averaged over the defined ones.

    NaN labels are dropped per column, so a case unlabelled for one finding still counts for the others.
    """
    Y, S = np.asarray(y_true, dtype=float), np.asarray(y_score, dtype=float)
    if Y.ndim != 2 or Y.shape != S.shape:
        raise ValueError(f"y_true and y_score must be [cases, labels] of one shape, got {Y.shape} and {S.shape}")
    names = list(names) if names is not None else [str(j) for j in range(Y.shape[1])]
    per_label = {}
    for j, name in enumerate(names):
        keep = ~np.isnan(Y[:, j])
        per_label[name] = binary_auc(Y[keep, j], S[keep, j])
    return macro_over_labels(per_label, "AUC")


def multiclass_auc(y_true, y_score, classes: Sequence[str] | None = None) -> Metric:
    """One-vs-rest macro AUC over classes; a class absent from ``y_true`` is skipped and named.

    With every class present this is scikit-learn's ``roc_auc_score(multi_class="ovr")``.
    """
    y, P = as_vector(y_true, "y_true"), np.asarray(y_score, dtype=float)
    if P.ndim != 2:
        raise ValueError(f"y_score must be [cases, classes], got shape {P.shape}")
    same_length(y, P)
    k = P.shape[1]
    classes = list(classes) if classes is not None else [str(c) for c in range(k)]
    problem = _class_problem(y, set(range(k)))
    if not problem and np.isnan(P).any():
        problem = f"{int(np.isnan(P).any(axis=1).sum())} case(s) have no score"
    if not problem and len(np.unique(y)) < 2:
        problem = _one_class(y)
    if problem:
        return undefined(problem)
    per_class = {name: binary_auc(y == c, P[:, c]) for c, name in enumerate(classes)}
    if all(m.defined for m in per_class.values()):
        value = roc_auc_score(y, P, multi_class="ovr", average="macro", labels=list(range(k)))
        return Metric(float(value), per_label={n: m.value for n, m in per_class.items()})
    return macro_over_labels(per_class, "one-vs-rest AUC")


# ---------------------------------------------------------------------------
# decisions: accuracy, balanced accuracy, F1
# ---------------------------------------------------------------------------

def _decision_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray, str]:
    y, p = as_vector(y_true, "y_true"), as_vector(y_pred, "y_pred")
    same_length(y, p)
    problem = _class_problem(y)
    if not problem and np.isnan(p).any():
        problem = f"{int(np.isnan(p).sum())} case(s) have no prediction"
    return y, p, problem


def accuracy(y_true, y_pred) -> Metric:
    y, p, problem = _decision_pair(y_true, y_pred)
    return undefined(problem) if problem else Metric(float(accuracy_score(y, p)))


def balanced_accuracy(y_true, y_pred) -> Metric:
    """Mean recall over the classes present in ``y_true``; NaN when only one class is present,
    since a one-class balanced accuracy is just that class's recall under another name."""
    y, p, problem = _decision_pair(y_true, y_pred)
    problem = problem or _one_class(y)
    if problem:
        return undefined(problem)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return Metric(float(balanced_accuracy_score(y, p)))


def f1_macro(y_true, y_pred, labels: Sequence[int] = (0, 1)) -> Metric:
    """Macro F1 over ``labels``; a class neither present nor predicted has no F1 and is left out."""
    y, p, problem = _decision_pair(y_true, y_pred)
    if problem:
        return undefined(problem)
    value = float(f1_score(y, p, labels=list(labels), average="macro", zero_division=np.nan))
    return undefined("no class is present or predicted") if math.isnan(value) else Metric(value)


DECISION_METRICS: dict[str, Callable[..., Metric]] = {
    "acc": accuracy,
    "balanced_acc": balanced_accuracy,
    "f1_macro": f1_macro,
}
SUPPORTED = ("auc", *DECISION_METRICS)


# ---------------------------------------------------------------------------
# a protocol's metrics from per-case outputs
# ---------------------------------------------------------------------------

def decisions(scores, thresholds) -> np.ndarray:
    """Binary decisions per label: score >= that label's threshold (NaN where unscored)."""
    S = np.asarray(scores, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    out = (S >= t[None, :]).astype(float)
    out[np.isnan(S) | np.isnan(t)[None, :]] = np.nan
    return out


def score_outputs(kind: str, labels, scores, metrics: Sequence[str], names: Sequence[str],
                  thresholds: Sequence[float] | None = None) -> dict[str, Metric]:
    """The named metrics of one set of per-case outputs.

    ``kind`` is the label set's kind. ``labels`` is [cases, columns] with NaN where a
    case is unlabelled; ``scores`` is [cases, outputs]: one probability per label
    (binary, multilabel) or per class (multiclass); ``names`` name the outputs.
    Binary and multi-label decisions use ``thresholds`` (one per label); multi-class
    decisions are the most probable class. Multi-label decision metrics are macro
    means over labels, like AUC.
    """
    Y, S = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    if Y.ndim != 2 or S.ndim != 2 or len(Y) != len(S):
        raise ValueError(f"labels and scores must be [cases, ...] with one row per case, got {Y.shape}, {S.shape}")
    unknown = [m for m in metrics if m not in SUPPORTED]
    if unknown:
        raise ValueError(f"unsupported classification metric(s) {unknown}; supported: {list(SUPPORTED)}")
    out: dict[str, Metric] = {}
    if kind == "multiclass":
        keep = ~np.isnan(Y[:, 0])
        y, P = Y[keep, 0], S[keep]
        predicted = np.full(len(P), np.nan)
        scored = ~np.isnan(P).any(axis=1)
        predicted[scored] = P[scored].argmax(axis=1)
        for metric in metrics:
            if metric == "auc":
                out[metric] = multiclass_auc(y, P, names)
            elif metric == "f1_macro":
                out[metric] = f1_macro(y, predicted, labels=range(S.shape[1]))
            else:
                out[metric] = DECISION_METRICS[metric](y, predicted)
        return out
    if kind not in ("binary", "multilabel"):
        raise ValueError(f"unknown label-set kind {kind!r}")
    if Y.shape != S.shape:
        raise ValueError(f"a {kind} label set has one score per label column, got {Y.shape} and {S.shape}")
    predicted = None
    for metric in metrics:
        if metric == "auc":
            out[metric] = macro_auc(Y, S, names)
            continue
        if thresholds is None:
            raise ValueError(f"metric {metric!r} needs one decision threshold per label")
        if predicted is None:
            predicted = decisions(S, thresholds)
        per_label = {}
        for j, name in enumerate(names):
            keep = ~np.isnan(Y[:, j])
            per_label[name] = DECISION_METRICS[metric](Y[keep, j], predicted[keep, j])
        if len(names) == 1:
            out[metric] = per_label[names[0]]
        else:
            out[metric] = macro_over_labels(per_label, metric)
    return out
