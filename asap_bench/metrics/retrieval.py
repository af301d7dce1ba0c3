"""Retrieval metrics: the rank of each query's true candidate and recall@K over queries.

A query may have several relevant candidates (report -> volume: every volume that
carries the report's text); it is a hit at K when its best-placed relevant candidate
is within the first K. Ties are broken against the query: the rank of the truth is
1 + the number of irrelevant candidates scoring at least as high as the best relevant
one. A constant scorer therefore gets rank = pool size (never a lucky hit), and the
result does not depend on candidate order.

Per-query ranks are what a record keeps: recall@K is the mean of ``rank <= K``, so it
recomputes from the ranks and pairs across encoders query by query.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .classification import Metric, undefined

DIRECTIONS = ("v2r", "r2v")


def truth_ranks(scores, relevant) -> np.ndarray:
    """Rank (1-based) of each query's best relevant candidate, ties counted against the query.

    ``scores`` and ``relevant`` are [queries, candidates]; every query needs at least one
    relevant candidate and every score must be finite.
    """
    S = np.asarray(scores, dtype=float)
    R = np.asarray(relevant, dtype=bool)
    if S.ndim != 2 or S.shape != R.shape:
        raise ValueError(f"scores and relevant must be [queries, candidates] of one shape, got {S.shape}, {R.shape}")
    if not np.isfinite(S).all():
        raise ValueError(f"{int((~np.isfinite(S)).sum())} similarity score(s) are not finite")
    lacking = np.flatnonzero(~R.any(axis=1))
    if len(lacking):
        raise ValueError(f"{len(lacking)} query(ies) have no relevant candidate, e.g. rows {lacking[:5].tolist()}")
    best = np.where(R, S, -np.inf).max(axis=1)
    return 1 + ((S >= best[:, None]) & ~R).sum(axis=1)


def recall_at_k(ranks, k: int) -> Metric:
    """Share of queries whose truth ranks within the first ``k``; NaN (with the reason) for no queries."""
    if k < 1:
        raise ValueError(f"recall@K needs K >= 1, got {k}")
    r = np.asarray(ranks, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return undefined("no queries")
    return Metric(float(np.mean(r <= k)))


def metric_name(k: int, direction: str) -> str:
    return f"recall@{k}_{direction}"


def parse_metric(name: str) -> tuple[int, str]:
    """``recall@5_v2r`` -> (5, "v2r")."""
    head, _, direction = name.partition("_")
    if not head.startswith("recall@") or direction not in DIRECTIONS or not head[7:].isdigit():
        raise ValueError(f"not a retrieval metric: {name!r} (expected recall@<K>_v2r or recall@<K>_r2v)")
    return int(head[7:]), direction


def score_units(units: dict[str, Any], metrics: Sequence[str]) -> dict[str, Metric]:
    """Recall@K metrics from stored per-query units (``direction`` and ``rank`` aligned with ``ids``)."""
    directions = list(units["direction"])
    ranks = np.array([math.nan if r is None else r for r in units["rank"]], dtype=float)
    if len(directions) != len(ranks):
        raise ValueError(f"units hold {len(directions)} directions but {len(ranks)} ranks")
    out = {}
    for name in metrics:
        k, direction = parse_metric(name)
        mine = np.array([d == direction for d in directions], dtype=bool)
        out[name] = recall_at_k(ranks[mine], k)
    return out


def per_query_hits(ranks, directions: Sequence[str], metrics: Sequence[str]) -> dict[str, list[float | None]]:
    """Per query and metric: 1.0 hit, 0.0 miss, None for a query of the other direction (paired-test units)."""
    r = np.asarray(ranks, dtype=float)
    out = {}
    for name in metrics:
        k, direction = parse_metric(name)
        out[name] = [float(rank <= k) if d == direction else None for rank, d in zip(r, directions)]
    return out
