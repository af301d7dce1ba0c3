"""Recompute a record's metrics from its per-unit outputs: the check that a number is what it says.

The statistics layer pairs encoders on these same per-unit outputs, so a record
whose metrics do not follow from its units must never reach a table.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..metrics.classification import score_outputs
from ..metrics.survival import score_survival


def _array(values) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] if isinstance(row, list) else
                     (np.nan if row is None else row) for row in values], dtype=float)


def recompute(units: dict[str, Any], metrics: list[str]) -> dict[str, float | None]:
    """Metrics from a record's units; None where undefined.

    Classification and survival outputs are scored by their metric modules; any other
    family's units (per-case Dice, retrieval hits, text scores) through the statistics
    layer's set metrics under unit weights, the same computation its bootstrap resamples.
    """
    task = units.get("task")
    if task not in ("binary", "multilabel", "multiclass", "survival"):
        from ..stats import set_metric

        ones = np.ones((1, len(units.get("ids", []))))
        out: dict[str, float | None] = {}
        for metric in metrics:
            value = set_metric(units, metric, ones)
            if value is None:
                raise ValueError(f"no way to recompute {metric!r} from units of task {task!r}; "
                                 "register one with stats.register_set_metric")
            out[metric] = None if math.isnan(value[0]) else float(value[0])
        return out
    if task == "survival":
        horizons = units.get("horizons", {})
        labels = {m: _array(h["labels"]) for m, h in horizons.items()}
        scores = {m: _array(h["scores"]) for m, h in horizons.items()}
        values = score_survival(_array(units["time"]), _array(units["event"]), _array(units["risk"]),
                                labels, scores, metrics)
    else:
        values = score_outputs(units["task"], _array(units["labels"]), _array(units["scores"]), metrics,
                               units["score_names"], units.get("thresholds"))
    return {m: (None if v.value is None or math.isnan(v.value) else float(v.value)) for m, v in values.items()}
