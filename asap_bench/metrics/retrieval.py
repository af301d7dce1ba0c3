"""Retrieval metrics: the rank of each query's true candidate and recall@K over queries.

A query may have several relevant candidates (report -> volume: every volume that
carries the report's text); it is a hit at K when its best-placed relevant candidate
is within the first K. Ties are broken against the query: the rank of the truth is
1 + the number of irrelevant candidates scoring at least as high as the best relevant
one. A constant scorer therefore gets rank = pool size (never a lucky hit), and the
result does not depend on candidate order.

Per-query ranks are what a record keeps: recall@K is the mean of ``rank <= K``, so it
recomputes from the ranks and pairs across encoders query by query.

A query with m relevant among N candidates ranks its truth at worst N - m + 1. Where K
reaches that for every query, recall@K is 1 whatever the scores: it is recorded as
undefined (None, with the reason), its per-query hits as None, so it recomputes to None.

Chance level is recall@K of a uniformly random ranking: a query is a hit unless all K
top places go to irrelevant candidates, P = 1 - C(N - m, K) / C(N, K) (hypergeometric),
averaged over queries. Volume -> report: one relevant report among the P pooled ones,
so chance = K / P. Report -> volume: m_j volumes carry report j among V test volumes,
chance = mean_j [1 - C(V - m_j, K) / C(V, K)].
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.stats import hypergeom

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


def trivial_reason(k: int, candidates: int | None, relevant=None) -> str:
    """Why recall@``k`` is 1 whatever the scores ("" when it is not): ``k`` reaches every query's worst rank.

    ``relevant`` holds each query's number of relevant candidates (one each when None).
    """
    if candidates is None:
        return ""
    m = np.ones(1) if relevant is None or len(relevant) == 0 else np.asarray(relevant, dtype=float)
    worst = int(candidates - m.min() + 1)
    if k < worst:
        return ""
    if worst == candidates:
        return f"K={k} >= the {candidates} candidates of the pool: every query is a hit whatever the scores"
    return (f"K={k} >= {worst}, the worst rank a truth can take among the {candidates} candidates: "
            "every query is a hit whatever the scores")


def recall_at_k(ranks, k: int, candidates: int | None = None, relevant=None) -> Metric:
    """Share of queries whose truth ranks within the first ``k``; NaN with the reason for no queries, or where
    ``k`` makes every query a hit whatever the scores (``candidates`` and ``relevant`` per query given)."""
    if k < 1:
        raise ValueError(f"recall@K needs K >= 1, got {k}")
    r = np.asarray(ranks, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return undefined("no queries")
    reason = trivial_reason(k, candidates, relevant)
    if reason:
        return undefined(reason)
    return Metric(float(np.mean(r <= k)))


def chance_recall(k: int, candidates: int, relevant) -> float:
    """Recall@``k`` of a uniformly random ranking: mean over queries of 1 - C(N - m, K) / C(N, K)."""
    m = np.asarray(relevant, dtype=int)
    if m.size == 0:
        return math.nan
    return float(np.mean(hypergeom.sf(0, candidates, m, min(k, candidates))))


def metric_name(k: int, direction: str) -> str:
    return f"recall@{k}_{direction}"


def parse_metric(name: str) -> tuple[int, str]:
    """``recall@5_v2r`` -> (5, "v2r")."""
    head, _, direction = name.partition("_")
    if not head.startswith("recall@") or direction not in DIRECTIONS or not head[7:].isdigit():
        raise ValueError(f"not a retrieval metric: {name!r} (expected recall@<K>_v2r or recall@<K>_r2v)")
    return int(head[7:]), direction


def _relevant(units: dict[str, Any], mine: np.ndarray) -> np.ndarray:
    """Relevant candidates per query of one direction; one each in units that do not say."""
    counts = units.get("relevant")
    return np.ones(int(mine.sum())) if counts is None else np.asarray(counts, dtype=float)[mine]


def _pool(units: dict[str, Any], direction: str) -> int | None:
    pool = units.get("pool") or {}
    return int(pool[direction]) if direction in pool else None


def score_units(units: dict[str, Any], metrics: Sequence[str]) -> dict[str, Metric]:
    """Recall@K metrics from stored per-query units (``direction``, ``rank`` and, where given, ``relevant``
    aligned with ``ids``; ``pool``: candidates per direction)."""
    directions = list(units["direction"])
    ranks = np.array([math.nan if r is None else r for r in units["rank"]], dtype=float)
    if len(directions) != len(ranks):
        raise ValueError(f"units hold {len(directions)} directions but {len(ranks)} ranks")
    out = {}
    for name in metrics:
        k, direction = parse_metric(name)
        mine = np.array([d == direction for d in directions], dtype=bool)
        out[name] = recall_at_k(ranks[mine], k, _pool(units, direction), _relevant(units, mine))
    return out


def chance_units(units: dict[str, Any], metrics: Sequence[str]) -> dict[str, float]:
    """Chance level of each recall@K metric for the pool the units describe (see the module doc)."""
    directions = np.array(list(units["direction"]))
    out = {}
    for name in metrics:
        k, direction = parse_metric(name)
        mine = directions == direction
        candidates = _pool(units, direction)
        if candidates is not None and mine.any():
            out[name] = chance_recall(k, candidates, _relevant(units, mine))
    return out


def per_query_hits(ranks, directions: Sequence[str], metrics: Sequence[str], *, pool: dict[str, int] | None = None,
                   relevant: Sequence[int] | None = None) -> dict[str, list[float | None]]:
    """Per query and metric: 1.0 hit, 0.0 miss, None for a query of the other direction (paired-test units),
    and None throughout for a metric that is 1 whatever the scores (``pool`` and ``relevant`` given)."""
    r = np.asarray(ranks, dtype=float)
    units = {"direction": list(directions), "pool": pool or {}, "relevant": relevant}
    out = {}
    for name in metrics:
        k, direction = parse_metric(name)
        mine = np.array([d == direction for d in directions], dtype=bool)
        trivial = bool(trivial_reason(k, _pool(units, direction), _relevant(units, mine)))
        out[name] = [float(rank <= k) if d == direction and not trivial else None for rank, d in zip(r, directions)]
    return out
