"""Segmentation metrics against known shapes and an independent scipy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from scipy import ndimage

from asap_bench.metrics.segmentation import diagonal_mm, dice_per_case, score_case, summarise

SPACING = (1.0, 1.0, 2.0)  # anisotropic, mm


def sphere(shape, centre_mm, radius_mm, spacing=SPACING) -> np.ndarray:
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    cx, cy, cz = centre_mm
    return ((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius_mm ** 2).astype(np.int64)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from the surface voxels of ``a`` to the surface of ``b`` (scipy, independent of MONAI)."""
    surf_a = a.astype(bool) & ~ndimage.binary_erosion(a.astype(bool))
    surf_b = b.astype(bool) & ~ndimage.binary_erosion(b.astype(bool))
    return ndimage.distance_transform_edt(~surf_b, sampling=spacing)[surf_a]


SHAPE = (48, 48, 24)
CENTRE = (24.0, 24.0, 24.0)


def test_concentric_spheres_match_analytic_and_scipy():
    inner, outer = sphere(SHAPE, CENTRE, 10.0), sphere(SHAPE, CENTRE, 14.0)
    scores = score_case(inner, outer, {1: "ball"}, SPACING, {1: 1.0})
    dice = scores.structures["dice"]["ball"]
    counted = 2 * inner.sum() / (inner.sum() + outer.sum())
    assert dice == pytest.approx(counted, abs=1e-6)
    assert dice == pytest.approx(2 * 10 ** 3 / (10 ** 3 + 14 ** 3), abs=0.03)  # volumes of the continuous balls
    d_ab, d_ba = surface_distances(inner, outer, SPACING), surface_distances(outer, inner, SPACING)
    independent = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    assert scores.structures["hd95"]["ball"] == pytest.approx(independent, abs=1e-3)
    assert scores.structures["hd95"]["ball"] == pytest.approx(4.0, abs=1.0)  # radii differ by 4 mm
    # every boundary point is ~4 mm from the other boundary: NSD ~0 at 1 mm, ~1 at 6 mm
    assert scores.structures["nsd"]["ball"] < 0.1
    wide = score_case(inner, outer, {1: "ball"}, SPACING, {1: 6.0})
    assert wide.structures["nsd"]["ball"] > 0.95


@pytest.mark.parametrize("tolerance", [1.0, 2.0, 3.5])
def test_nsd_matches_an_independent_surface_count(tolerance):
    """NSD = boundary points of either mask within ``tolerance`` mm of the other boundary / all boundary points."""
    a, b = sphere(SHAPE, CENTRE, 10.0), sphere(SHAPE, (26.0, 23.0, 28.0), 9.0)
    d_ab, d_ba = surface_distances(a, b, SPACING), surface_distances(b, a, SPACING)
    independent = ((d_ab <= tolerance).sum() + (d_ba <= tolerance).sum()) / (len(d_ab) + len(d_ba))
    assert 0.05 < independent < 0.95  # a partial agreement, not a trivial 0 or 1
    nsd = score_case(b, a, {1: "ball"}, SPACING, {1: tolerance}).structures["nsd"]["ball"]
    assert nsd == pytest.approx(independent, abs=1e-6)


def test_spacing_scales_distances():
    a, b = sphere(SHAPE, CENTRE, 10.0), sphere(SHAPE, (24.0, 24.0, 30.0), 10.0)  # shifted 6 mm = 3 slices
    coarse = score_case(a, b, {1: "ball"}, SPACING, {1: 1.0}).structures["hd95"]["ball"]
    doubled = score_case(a, b, {1: "ball"}, tuple(2 * s for s in SPACING), {1: 1.0}).structures["hd95"]["ball"]
    assert doubled == pytest.approx(2 * coarse, rel=1e-6)
    independent = max(np.percentile(surface_distances(a, b, SPACING), 95),
                      np.percentile(surface_distances(b, a, SPACING), 95))
    assert coarse == pytest.approx(independent, abs=1e-3)
    assert 3.0 < coarse <= 6.0 + 1e-6


def test_multi_structure_mean_and_monai_dice():
    truth = sphere(SHAPE, CENTRE, 10.0) + sphere(SHAPE, (10.0, 10.0, 10.0), 5.0) * 2
    pred = np.roll(truth, 2, axis=0)
    scores = score_case(pred, truth, {1: "a", 2: "b"}, SPACING, {1: 1.0, 2: 1.0})
    onehot = lambda m: torch.nn.functional.one_hot(torch.as_tensor(m), 3).movedim(-1, 0)[None].float()  # noqa: E731
    monai = compute_dice(onehot(pred), onehot(truth), include_background=False)[0].tolist()
    assert [scores.structures["dice"]["a"], scores.structures["dice"]["b"]] == pytest.approx(monai, abs=1e-6)
    assert scores.mean("dice") == pytest.approx(np.mean(monai), abs=1e-6)
    assert dice_per_case(torch.as_tensor(pred), torch.as_tensor(truth), [1, 2], 3) == pytest.approx(np.mean(monai))


def test_empty_structure_conventions():
    truth = np.zeros(SHAPE, dtype=np.int64)
    truth[10:20, 10:20, 5:10] = 1
    empty = np.zeros_like(truth)
    structures, tol = {1: "a", 2: "b"}, {1: 1.0, 2: 1.0}
    missed = score_case(empty, truth, structures, SPACING, tol)
    assert missed.structures["dice"] == {"a": 0.0, "b": None}  # b empty in both: skipped
    assert missed.structures["nsd"]["a"] == 0.0
    assert missed.structures["hd95"]["a"] == pytest.approx(diagonal_mm(SHAPE, SPACING))
    assert diagonal_mm(SHAPE, SPACING) == pytest.approx(math.sqrt(48 ** 2 + 48 ** 2 + 48 ** 2))
    hallucinated = score_case(truth * 2, truth, structures, SPACING, tol)  # b predicted where only a is
    assert hallucinated.structures["dice"] == {"a": 0.0, "b": 0.0}
    nothing = score_case(empty, empty, structures, SPACING, tol)
    assert nothing.mean("dice") is None
    perfect = score_case(truth, truth, structures, SPACING, tol)
    assert perfect.structures["hd95"]["a"] == 0.0 and perfect.structures["nsd"]["a"] == 1.0
    summary, units = summarise({"x": perfect, "y": missed, "z": nothing}, ("dice", "hd95", "nsd"))
    assert summary["dice"] == pytest.approx(0.5)
    assert units["ids"] == ["x", "y", "z"] and units["per_case"]["dice"] == [1.0, 0.0, None]
    from asap_bench.results.recompute import recompute

    assert recompute(units, ["dice", "hd95", "nsd"]) == pytest.approx(summary)
    assert units["skipped_cases"]["dice"] == 1
    assert units["per_structure"]["dice"] == {"a": 0.5, "b": None}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="prediction shape"):
        score_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), {1: "a"}, SPACING, {1: 1.0})
