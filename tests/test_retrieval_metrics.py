"""Retrieval metrics: ranks and recall@K against a brute-force ranking, ties counted against the query."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from asap_bench.metrics.retrieval import (
    chance_recall, chance_units, parse_metric, per_query_hits, recall_at_k, score_units, truth_ranks,
)
from asap_bench import stats
from asap_bench.results.recompute import recompute


def brute_force_rank(scores: list[float], relevant: list[bool]) -> int:
    """Sort candidates by score, best first, placing relevant ones after irrelevant ones of equal score
    (the pessimistic order); the rank is the 1-based position of the first relevant candidate."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], relevant[j]))
    return next(position + 1 for position, j in enumerate(order) if relevant[j])


def brute_force_recall(S: np.ndarray, R: np.ndarray, k: int) -> float:
    return float(np.mean([brute_force_rank(list(S[i]), list(R[i])) <= k for i in range(len(S))]))


@st.composite
def retrieval_problem(draw):
    queries = draw(st.integers(1, 8))
    candidates = draw(st.integers(1, 9))
    # few distinct integer scores, so ties are common
    S = np.array(draw(st.lists(st.lists(st.integers(-2, 2), min_size=candidates, max_size=candidates),
                               min_size=queries, max_size=queries)), dtype=float)
    R = np.array(draw(st.lists(st.lists(st.booleans(), min_size=candidates, max_size=candidates),
                               min_size=queries, max_size=queries)), dtype=bool)
    for i in range(queries):  # every query has at least one relevant candidate
        if not R[i].any():
            R[i, draw(st.integers(0, candidates - 1))] = True
    return S, R


@settings(max_examples=300, deadline=None)
@given(retrieval_problem(), st.integers(1, 10))
def test_ranks_and_recall_match_brute_force_with_ties(problem, k):
    S, R = problem
    ranks = truth_ranks(S, R)
    assert ranks.tolist() == [brute_force_rank(list(S[i]), list(R[i])) for i in range(len(S))]
    assert recall_at_k(ranks, k).value == pytest.approx(brute_force_recall(S, R, k))


def test_a_tie_counts_against_the_query():
    S = np.array([[0.5, 0.5, 0.5, 0.1]])
    R = np.array([[False, True, False, False]])
    assert truth_ranks(S, R).tolist() == [3]  # both tied irrelevant candidates count as ahead
    assert recall_at_k([3], 2).value == 0.0 and recall_at_k([3], 3).value == 1.0


def test_a_constant_scorer_never_gets_a_lucky_hit():
    S = np.zeros((4, 6))
    R = np.eye(4, 6, dtype=bool)
    assert truth_ranks(S, R).tolist() == [6, 6, 6, 6]
    assert recall_at_k(truth_ranks(S, R), 5).value == 0.0


def test_several_relevant_candidates_only_the_best_placed_counts():
    S = np.array([[0.9, 0.8, 0.7, 0.1]])
    R = np.array([[False, False, True, True]])  # e.g. two volumes carrying the query report
    assert truth_ranks(S, R).tolist() == [3]


def test_a_perfect_scorer_ranks_every_truth_first():
    S = np.eye(5) + 0.01 * np.arange(5)[None, :]
    assert truth_ranks(S, np.eye(5, dtype=bool)).tolist() == [1] * 5


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no relevant candidate"):
        truth_ranks(np.zeros((2, 3)), np.array([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="not finite"):
        truth_ranks(np.array([[np.nan, 1.0]]), np.array([[True, False]]))
    with pytest.raises(ValueError, match="one shape"):
        truth_ranks(np.zeros((2, 3)), np.zeros((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="K >= 1"):
        recall_at_k([1, 2], 0)
    with pytest.raises(ValueError, match="not a retrieval metric"):
        parse_metric("recall5_v2r")
    assert math.isnan(recall_at_k([], 5).value) and recall_at_k([], 5).reason == "no queries"


def test_units_recompute_and_pair_by_query():
    directions = ["v2r", "v2r", "v2r", "r2v", "r2v"]
    ranks = [1, 4, 7, 2, 9]
    metrics = ["recall@1_v2r", "recall@5_v2r", "recall@5_r2v"]
    hits = per_query_hits(ranks, directions, metrics)
    assert hits["recall@5_v2r"] == [1.0, 1.0, 0.0, None, None]
    assert hits["recall@5_r2v"] == [None, None, None, 1.0, 0.0]
    units = {"task": "retrieval", "ids": ["a", "b", "c", "report:1", "report:2"], "direction": directions,
             "rank": ranks, "per_case": hits}
    values = score_units(units, metrics)
    assert values["recall@1_v2r"].value == pytest.approx(1 / 3)
    assert values["recall@5_v2r"].value == pytest.approx(2 / 3)
    assert values["recall@5_r2v"].value == pytest.approx(1 / 2)
    # the statistics layer reads recall@K as the mean of the per-query hits of its own direction
    for metric in metrics:
        assert stats.set_metric(units, metric, np.ones((1, 5)))[0] == pytest.approx(values[metric].value)


# --------------------------------------------------------------------------- recall@K that cannot move, chance


def test_recall_at_or_above_the_worst_rank_is_undefined_with_its_reason():
    # 4 candidates, one relevant each: the truth ranks 4 at worst, so K >= 4 is a hit whatever the scores
    assert recall_at_k([4, 4, 4], 3, candidates=4).value == 0.0
    trivial = recall_at_k([4, 4, 4], 4, candidates=4)
    assert not trivial.defined and "K=4 >= the 4 candidates of the pool" in trivial.reason
    # two relevant volumes of six: the best of them ranks 5 at worst
    assert not recall_at_k([5, 1], 5, candidates=6, relevant=[2, 2]).defined
    # one query with a single relevant candidate can still miss at K = 5
    assert recall_at_k([6, 1], 5, candidates=6, relevant=[1, 2]).value == 0.5
    assert recall_at_k([4, 4], 10).value == 1.0  # without the pool nothing is known


def test_trivial_metrics_have_no_per_query_hits_and_recompute_to_none():
    directions = ["v2r", "v2r", "v2r", "r2v", "r2v"]
    ranks = [1, 2, 3, 2, 1]
    metrics = ["recall@1_v2r", "recall@3_v2r", "recall@2_r2v"]
    pool, relevant = {"v2r": 3, "r2v": 3}, [1, 1, 1, 1, 2]
    hits = per_query_hits(ranks, directions, metrics, pool=pool, relevant=relevant)
    assert hits["recall@1_v2r"] == [1.0, 0.0, 0.0, None, None]
    assert hits["recall@3_v2r"] == [None] * 5  # 3 reports in the pool: every volume finds its own in the top 3
    assert hits["recall@2_r2v"] == [None, None, None, 1.0, 1.0]  # the report with one volume can still miss
    units = {"task": "retrieval", "ids": list("abcde"), "direction": directions, "rank": ranks, "pool": pool,
             "relevant": relevant, "per_case": hits}
    values = score_units(units, metrics)
    assert not values["recall@3_v2r"].defined and "every query is a hit" in values["recall@3_v2r"].reason
    assert values["recall@1_v2r"].value == pytest.approx(1 / 3)
    assert recompute(units, metrics) == {"recall@1_v2r": pytest.approx(1 / 3), "recall@3_v2r": None,
                                         "recall@2_r2v": 1.0}


@pytest.mark.parametrize("candidates,relevant,k", [(5, 1, 1), (5, 1, 3), (6, 2, 2), (6, 3, 1), (4, 2, 3)])
def test_chance_level_is_recall_of_a_uniformly_random_ranking(candidates, relevant, k):
    """Against every ordering of the candidates: the share in which a relevant one lands in the top K."""
    orders = list(itertools.permutations(range(candidates)))
    hits = sum(min(order.index(j) for j in range(relevant)) < k for order in orders)
    assert chance_recall(k, candidates, [relevant]) == pytest.approx(hits / len(orders))
    if relevant == 1:
        assert chance_recall(k, candidates, [1]) == pytest.approx(k / candidates)  # V2R: K / P
    units = {"direction": ["r2v", "r2v"], "pool": {"r2v": candidates}, "relevant": [relevant, 1]}
    expected = (1 - math.comb(candidates - relevant, k) / math.comb(candidates, k) + k / candidates) / 2
    assert chance_units(units, [f"recall@{k}_r2v"]) == {f"recall@{k}_r2v": pytest.approx(expected)}
