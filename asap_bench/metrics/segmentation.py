"""Segmentation metrics per case and per structure: Dice, HD95 and NSD in millimetres (MONAI).

Conventions for structures that are empty in the truth, the prediction or both
(stated here because they move the means):

- both empty: the structure is skipped for that case (not counted in its mean);
- prediction empty, truth not (or the reverse): Dice 0, NSD 0, and HD95 the
  diagonal of the scored volume in mm (the largest distance possible on it), so a
  missed or hallucinated structure is penalised instead of dropped;
- a case whose every structure is skipped has no value (None) and is counted in
  ``skipped_cases``.

A case's value is the mean over its scored foreground structures; a task's
value is the mean over cases (the paper's "mean over structures" per case).
Distances use the voxel spacing of the grid the metrics are computed on.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

METRICS = ("dice", "hd95", "nsd")


@dataclass
class CaseScores:
    """One case: per-structure values (None = skipped) and their means."""

    structures: dict[str, dict[str, float | None]] = field(default_factory=dict)  # metric -> structure -> value

    def mean(self, metric: str) -> float | None:
        values = [v for v in self.structures[metric].values() if v is not None]
        return float(np.mean(values)) if values else None


def _one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[*spatial] integer labels -> [1, n_classes, *spatial] float one-hot (MONAI's metric layout)."""
    out = torch.nn.functional.one_hot(labels.long(), n_classes)
    return out.movedim(-1, 0).unsqueeze(0).float()


def diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def score_case(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, structures: dict[int, str],
               spacing: tuple[float, float, float], nsd_tolerance: dict[int, float], n_classes: int | None = None,
               metrics: tuple[str, ...] = METRICS) -> CaseScores:
    """Score one label map against the truth, both ``[*spatial]`` integer arrays on one grid.

    ``structures`` maps label value -> name (foreground only); ``nsd_tolerance``
    the NSD tolerance in mm per label value.
    """
    pred_t, truth_t = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(truth))
    if pred_t.shape != truth_t.shape:
        raise ValueError(f"prediction shape {list(pred_t.shape)} differs from the mask's {list(truth_t.shape)}")
    labels = sorted(structures)
    n_classes = n_classes or max(labels) + 1
    p1, t1 = _one_hot(pred_t, n_classes), _one_hot(truth_t, n_classes)
    p1, t1 = p1[:, [0, *labels]], t1[:, [0, *labels]]
    present_p = p1[0, 1:].flatten(1).any(dim=1).tolist()
    present_t = t1[0, 1:].flatten(1).any(dim=1).tolist()
    scored = [a or b for a, b in zip(present_p, present_t)]
    both = [a and b for a, b in zip(present_p, present_t)]
    out = CaseScores()
    with warnings.catch_warnings():  # MONAI warns about empty structures, which the conventions above handle
        warnings.simplefilter("ignore")
        _fill(out, p1, t1, labels, structures, spacing, nsd_tolerance, metrics, truth_t.shape, scored, both)
    return out


def _fill(out: CaseScores, p1: torch.Tensor, t1: torch.Tensor, labels: list[int], structures: dict[int, str],
          spacing: tuple[float, float, float], nsd_tolerance: dict[int, float], metrics: tuple[str, ...],
          shape: tuple[int, ...], scored: list[bool], both: list[bool]) -> None:
    if "dice" in metrics:
        dice = compute_dice(p1, t1, include_background=False, ignore_empty=False)[0].tolist()
        out.structures["dice"] = {structures[k]: (float(d) if s else None) for k, d, s in zip(labels, dice, scored)}
    if "hd95" in metrics:
        worst = diagonal_mm(tuple(shape), spacing)
        hd = [math.nan] * len(labels)
        if any(both):
            hd = compute_hausdorff_distance(p1, t1, include_background=False, percentile=95,
                                            spacing=list(spacing))[0].tolist()
        out.structures["hd95"] = {structures[k]: (float(h) if b else (worst if s else None))
                                  for k, h, b, s in zip(labels, hd, both, scored)}
    if "nsd" in metrics:
        nsd = [0.0] * len(labels)
        if any(both):
            nsd = compute_surface_dice(p1, t1, class_thresholds=[float(nsd_tolerance[k]) for k in labels],
                                       include_background=False, spacing=list(spacing))[0].tolist()
        out.structures["nsd"] = {structures[k]: (float(v) if b else (0.0 if s else None))
                                 for k, v, b, s in zip(labels, nsd, both, scored)}


def dice_per_case(pred: torch.Tensor, truth: torch.Tensor, labels: list[int], n_classes: int) -> float | None:
    """Mean foreground Dice of one case (validation / checkpoint selection), same conventions."""
    p1, t1 = _one_hot(pred, n_classes)[:, [0, *labels]], _one_hot(truth, n_classes)[:, [0, *labels]]
    dice = compute_dice(p1, t1, include_background=False, ignore_empty=False)[0]
    scored = (p1[0, 1:].flatten(1).any(dim=1) | t1[0, 1:].flatten(1).any(dim=1))
    return float(dice[scored].mean()) if bool(scored.any()) else None


def summarise(cases: dict[str, CaseScores], metrics: tuple[str, ...]) -> tuple[dict[str, float | None], dict]:
    """Task-level means over cases and the units for paired tests.

    Units follow the statistics layer's layout: ``ids`` and ``per_case[metric]``, a list
    aligned with ``ids`` (None for a skipped case), whose mean over defined values is the
    task value; plus per-structure means over cases.
    """
    ids = sorted(cases)
    summary: dict[str, float | None] = {}
    per_case: dict[str, list[float | None]] = {}
    per_structure: dict[str, dict[str, float | None]] = {}
    skipped: dict[str, int] = {}
    for metric in metrics:
        values = [cases[case].mean(metric) for case in ids]
        kept = [v for v in values if v is not None]
        per_case[metric] = values
        skipped[metric] = len(values) - len(kept)
        summary[metric] = float(np.mean(kept)) if kept else None
        names = sorted({n for s in cases.values() for n in s.structures[metric]})
        per_structure[metric] = {}
        for name in names:
            vals = [s.structures[metric][name] for s in cases.values() if s.structures[metric].get(name) is not None]
            per_structure[metric][name] = float(np.mean(vals)) if vals else None
    units = {"kind": "case", "task": "segmentation", "ids": ids, "per_case": per_case,
             "per_structure": per_structure, "skipped_cases": skipped}
    return summary, units
