"""Choosing a hyper-parameter on validation, the one rule every family uses.

The best defined validation score wins; ties go to the stronger regularisation,
so a flat curve never drifts towards the least constrained model. When no value
has a defined score (e.g. validation holds one class), a fixed middle value is
used and the family says so in its notes.
"""

from __future__ import annotations

import math


def choose(curve: dict[float, float], prefer_larger: bool) -> float | None:
    """The grid value with the best defined score; ``prefer_larger``: larger values regularise more."""
    defined = {v: s for v, s in curve.items() if not math.isnan(s)}
    if not defined:
        return None
    sign = 1.0 if prefer_larger else -1.0
    return max(defined, key=lambda v: (defined[v], sign * v))


def default_value(grid: tuple[float, ...]) -> float:
    """The value used without selection: 1.0 where the grid holds it, else its middle value."""
    return 1.0 if 1.0 in grid else grid[len(grid) // 2]
