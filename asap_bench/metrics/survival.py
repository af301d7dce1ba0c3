"""Survival metrics: Harrell's C-index and AUC at a horizon, NaN with a reason where undefined.

Sign convention: a model outputs a *risk* score per case, higher meaning an earlier
event (a Cox model's log partial hazard). lifelines' ``concordance_index`` expects
scores ordered like survival times (higher = later), so it is given ``-risk``.

Harrell's C counts, over the comparable pairs, how often the case that fails first
has the higher risk (a tied risk counts one half). A pair (i, j) is comparable when
i has an observed event and either leaves earlier than j, or at the same time as a
censored j; two events at one time, or two censored cases, are not comparable.

AUC at a horizon reads the dataset's horizon label column (1: event by the horizon,
0: still at risk after it, empty: censored before it, so unknown). Cases censored
before the horizon are dropped at that horizon only, then it is an ordinary binary
ROC AUC (``classification.binary_auc``).

Degenerate inputs (no case, every case censored, no comparable pair, one class at
a horizon) give a NaN ``Metric`` whose reason says which, never a crash or a 0.5.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from lifelines.utils import concordance_index

from .classification import Metric, binary_auc, as_vector, same_length, undefined

def _survival_pair(time, event) -> tuple[np.ndarray, np.ndarray]:
    t, e = as_vector(time, "time"), as_vector(event, "event")
    same_length(t, e)
    if (t[~np.isnan(t)] < 0).any():
        raise ValueError("survival times must be non-negative")
    known = e[~np.isnan(e)]
    if not set(np.unique(known).tolist()) <= {0.0, 1.0}:
        raise ValueError(f"event indicators must be 0 or 1, got {sorted(set(np.unique(known).tolist()))}")
    return t, e


def c_index(time, risk, event) -> Metric:
    """Harrell's C-index of ``risk`` (higher = shorter survival); NaN with a reason when undefined."""
    t, e = _survival_pair(time, event)
    r = as_vector(risk, "risk")
    same_length(t, r)
    if t.size == 0:
        return undefined("no cases")
    missing = np.isnan(t) | np.isnan(e)
    if missing.any():
        return undefined(f"{int(missing.sum())} case(s) have no time or event")
    if np.isnan(r).any():
        return undefined(f"{int(np.isnan(r).sum())} case(s) have no risk score")
    if not e.any():
        return undefined(f"all {t.size} case(s) are censored; the C-index needs an observed event")
    try:
        value = concordance_index(t, -r, e)
    except ZeroDivisionError:
        return undefined(f"no comparable pair among {t.size} case(s) ({int(e.sum())} event(s)): "
                         "no case leaves after an observed event")
    return Metric(float(value))


def horizon_auc(labels, scores, horizon: str = "the horizon") -> Metric:
    """ROC AUC at one horizon; cases whose label is missing (censored before it) are excluded."""
    y, s = as_vector(labels, "labels"), as_vector(scores, "scores")
    same_length(y, s)
    known = ~np.isnan(y)
    if y.size and not known.any():
        return undefined(f"all {y.size} case(s) are censored before {horizon}")
    metric = binary_auc(y[known], s[known])
    if metric.defined:
        return metric
    return undefined(f"at {horizon}: {metric.reason}")


def score_survival(time, event, risk, horizon_labels: Mapping[str, Sequence[float]] | None,
                   horizon_scores: Mapping[str, Sequence[float]] | None, metrics: Sequence[str]) -> dict[str, Metric]:
    """A prognosis protocol's metrics from per-case outputs: ``c_index`` from (time, event, risk),
    any other name from that horizon's labels and scores, so a record recomputes from its units."""
    horizon_labels, horizon_scores = horizon_labels or {}, horizon_scores or {}
    out: dict[str, Metric] = {}
    for name in metrics:
        if name == "c_index":
            out[name] = c_index(time, risk, event)
        elif name in horizon_labels and name in horizon_scores:
            out[name] = horizon_auc(horizon_labels[name], horizon_scores[name], name)
        else:
            raise ValueError(f"metric {name!r} is neither 'c_index' nor a horizon with labels and scores "
                             f"(horizons: {sorted(horizon_labels)})")
    return out
