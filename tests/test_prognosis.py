"""Prognosis: C-index and horizon AUC against second implementations, the Cox and horizon heads,
selection on validation, degenerate inputs, and ground-truth features beating random ones on the demo."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from asap_bench.data.cards import load_card
from asap_bench.data.manifest import label_matrix, load_manifest
from asap_bench.metrics.survival import c_index, horizon_auc, score_survival
from asap_bench.protocol import Protocol, get_protocol
from asap_bench.splits import make_split
from asap_bench.tasks.base import FeatureLookup, TaskInputs
from asap_bench.tasks.linear_probe import LinearProbe
from asap_bench.tasks.prognosis import Prognosis

from conftest import write_table

HORIZONS = load_card("inspect").table("volumes").survival.horizons  # column -> days
FAST_PENALIZERS = [0.001, 0.1, 10.0]
FAST_C = [0.01, 1.0]


class TableFeatures(FeatureLookup):
    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def global_features(self, case_ids: list[str]) -> np.ndarray:
        return np.stack([self.table[c] for c in case_ids]).astype(np.float32)


def with_params(protocol_id: str, cox: dict | None = None, logistic: dict | None = None, **params) -> Protocol:
    raw = get_protocol(protocol_id).model_dump()
    head = raw["head"]["params"]
    head.update(params)
    if cox:
        head["cox"] = {**head["cox"], **cox}
    if logistic:
        head["logistic"] = {**head["logistic"], **logistic}
    return Protocol.model_validate(raw)


def fast(**cox) -> Protocol:
    return with_params("prog/inspect-mortality", cox={"penalizer_grid": FAST_PENALIZERS, **cox},
                       logistic={"C_grid": FAST_C})


def inputs_for(root: Path, dataset: str, protocol: Protocol, table: dict, ratio: float = 1.0,
               seed: int = 0) -> TaskInputs:
    manifest = load_manifest(root, dataset)
    return TaskInputs(protocol, manifest, make_split(manifest, protocol, seed), ratio, seed,
                      features=TableFeatures(table))


def random_table(ids, dim: int = 8, seed: int = 99) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.normal(size=dim) for c in ids}


# ---------------------------------------------------------------------------
# a second implementation: every pair, by the definition
# ---------------------------------------------------------------------------

def brute_force_c(time, risk, event) -> float:
    """Harrell's C by counting pairs: i fails first (or at j's censoring time), higher risk is right."""
    concordant, pairs = 0.0, 0
    n = len(time)
    for i in range(n):
        if not event[i]:
            continue
        for j in range(n):
            if i == j:
                continue
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                pairs += 1
                concordant += 1.0 if risk[i] > risk[j] else (0.5 if risk[i] == risk[j] else 0.0)
    return concordant / pairs if pairs else float("nan")


def survival_sample(seed: int, n: int):
    rng = np.random.default_rng(seed)
    time = rng.integers(1, max(2, n // 3), size=n).astype(float)  # few distinct times: many ties
    event = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(float)
    risk = np.round(rng.normal(size=n) - 0.02 * time, int(rng.integers(0, 3)))  # rounding ties risks
    return time, risk, event


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 60))
def test_c_index_matches_brute_force_and_lifelines(seed, n):
    time, risk, event = survival_sample(seed, n)
    expected = brute_force_c(time, risk, event)
    got = c_index(time, risk, event)
    if math.isnan(expected):
        assert not got.defined and got.reason
        return
    assert got.defined and abs(got.value - expected) <= 1e-9
    assert abs(got.value - concordance_index(time, -risk, event)) <= 1e-9


def test_c_index_sign_convention():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.ones(4)
    assert c_index(time, -time, event).value == 1.0  # higher risk = shorter survival
    assert c_index(time, time, event).value == 0.0
    assert c_index(time, np.zeros(4), event).value == 0.5  # all risks tied


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(4, 200))
def test_horizon_auc_matches_sklearn_on_the_known_cases(seed, n):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n).astype(float)
    labels[:2] = [0, 1]
    labels[2:][rng.random(n - 2) < 0.3] = np.nan  # censored before the horizon
    scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))
    known = ~np.isnan(labels)
    got = horizon_auc(labels, scores)
    assert got.defined and abs(got.value - roc_auc_score(labels[known], scores[known])) <= 1e-9


def test_degenerate_survival_inputs_give_nan_with_a_reason():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cases = {
            "all censored": (c_index([1, 2, 3], [0.1, 0.2, 0.3], [0, 0, 0]), "censored"),
            "no pair": (c_index([1, 3], [0.5, 0.1], [0, 1]), "no comparable pair"),
            "tied events": (c_index([2, 2], [0.5, 0.1], [1, 1]), "no comparable pair"),
            "one case": (c_index([5], [0.3], [1]), "no comparable pair"),
            "empty": (c_index([], [], []), "no cases"),
            "unscored": (c_index([1, 2], [np.nan, 0.2], [1, 1]), "no risk score"),
            "one class": (horizon_auc([0, 0, np.nan, 0], [0.1, 0.2, 0.3, 0.4], "auc_1m"), "only class 0"),
            "all censored at horizon": (horizon_auc([np.nan, np.nan], [0.1, 0.2], "auc_12m"), "censored before"),
            "no horizon cases": (horizon_auc([], []), "no cases"),
        }
        for name, (metric, words) in cases.items():
            assert math.isnan(metric.value), name
            assert words in metric.reason, (name, metric.reason)
    assert "auc_1m" in cases["one class"][0].reason
    with pytest.raises(ValueError, match="non-negative"):
        c_index([-1, 2], [0, 1], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        c_index([1, 2], [0, 1], [2, 1])


# ---------------------------------------------------------------------------
# synthetic INSPECT-like cohorts: hazard = exp(x . w)
# ---------------------------------------------------------------------------

def horizon_labels(time: float, event: int) -> dict:
    return {c: 1 if event and time <= h else (0 if time > h else None) for c, h in HORIZONS.items()}


def inspect_cohort(n: int = 320, dim: int = 8, seed: int = 0, signal: float = 2.0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    w *= signal / np.linalg.norm(w)
    rows, table = [], {}
    for i in range(n):
        x = rng.normal(size=dim)
        event_time = rng.exponential(1 / (math.exp(-5.8 + x @ w)))
        follow_up = rng.uniform(30, 700)
        time, event = float(min(event_time, follow_up)), int(event_time <= follow_up)
        case = f"PE{i:05d}"
        rows.append({"case_id": case, "patient_id": f"person_{i:05d}", "image": f"CTPA/{case}.nii.gz",
                     "split": "test" if rng.random() < 0.25 else "train", "pe": int(rng.random() < 0.3),
                     "time": round(time, 3), "event": event, **horizon_labels(time, event)})
        table[case] = x
    return rows, table


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    rows, table = inspect_cohort()
    write_table(root, "inspect", "volumes", rows)
    return root, rows, table


def test_cox_beats_random_features(cohort):
    root, rows, table = cohort
    protocol = fast()
    good = Prognosis().run(inputs_for(root, "inspect", protocol, table))
    bad = Prognosis().run(inputs_for(root, "inspect", protocol, random_table(table)))
    assert set(good.metrics) == set(protocol.metrics)
    assert good.metrics["c_index"] > 0.72, good
    assert 0.38 < bad.metrics["c_index"] < 0.62, bad
    assert good.metrics["c_index"] - bad.metrics["c_index"] > 0.15
    for metric in ("auc_6m", "auc_12m"):
        assert good.metrics[metric] > 0.65 and good.metrics[metric] - bad.metrics[metric] > 0.1, (good, bad)
    assert good.selected["penalizer"] in FAST_PENALIZERS
    assert set(good.selected["C"]) == {"auc_1m", "auc_6m", "auc_12m"}
    assert all(c in FAST_C for c in good.selected["C"].values())
    assert good.selected["cox_pca_components"] is None  # 8 features: nothing to reduce

    units = good.units
    split = inputs_for(root, "inspect", protocol, table).split
    assert units["ids"] == split.test and len(units["risk"]) == len(units["time"]) == good.sizes["test"]
    for metric, column in protocol.head.params["logistic"]["horizons"].items():
        horizon = units["horizons"][metric]
        assert horizon["column"] == column and horizon["days"] == HORIZONS[column]
        known = [y is not None for y in horizon["labels"]]
        assert sum(known) == good.sizes[f"test_{metric}"]
    assert good.sizes["test_auc_12m"] < good.sizes["test"]  # cases censored before 12 months are dropped
    assert set(units["val_curve"]) == {"penalizer", "auc_1m", "auc_6m", "auc_12m"}


def test_metrics_recompute_from_units(cohort):
    root, rows, table = cohort
    result = Prognosis().run(inputs_for(root, "inspect", fast(), table))
    u = result.units

    def array(values):
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    labels = {m: array(h["labels"]) for m, h in u["horizons"].items()}
    scores = {m: array(h["scores"]) for m, h in u["horizons"].items()}
    again = score_survival(array(u["time"]), array(u["event"]), array(u["risk"]), labels, scores,
                           list(result.metrics))
    expected = {m: (math.nan if v is None else v) for m, v in result.metrics.items()}
    assert {m: v.value for m, v in again.items()} == pytest.approx(expected, abs=1e-12, nan_ok=True)


def test_high_dimensional_features_are_reduced_on_train(cohort):
    root, rows, table = cohort
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(8, 400)) / math.sqrt(8)
    wide = {c: x @ mix + 0.3 * rng.normal(size=400) for c, x in table.items()}
    result = Prognosis().run(inputs_for(root, "inspect", fast(pca_components=16), wide))
    assert result.selected["cox_pca_components"] == 16 and result.sizes["cox_dim"] == 16
    assert result.metrics["c_index"] > 0.65, result
    small = Prognosis().run(inputs_for(root, "inspect", fast(pca_components=16), wide, ratio=0.1))
    assert small.selected["cox_pca_components"] == min(16, small.sizes["train"] - 1)


def test_same_seed_same_result(cohort):
    root, rows, table = cohort
    first = Prognosis().run(inputs_for(root, "inspect", fast(), table, ratio=0.1, seed=3))
    second = Prognosis().run(inputs_for(root, "inspect", fast(), table, ratio=0.1, seed=3))
    assert first.metrics == second.metrics and first.selected == second.selected and first.notes == second.notes
    assert first.units == second.units
    other = Prognosis().run(inputs_for(root, "inspect", fast(), table, ratio=0.1, seed=4))
    assert other.units["risk"] != first.units["risk"]  # another seed draws another regime subset


def _adversarial_selection(tmp_path: Path, val_prefers_small: bool) -> TaskInputs:
    """Val and test built so that penaliser 1e-4 and 100 rank them in opposite orders."""
    rng = np.random.default_rng(5)
    rows, table = [], {}
    for i in range(300):
        z = rng.normal()
        x = np.array([z + 0.4 * rng.normal(), z + 0.4 * rng.normal()])
        event_time = rng.exponential(1 / math.exp(-5.5 + 1.5 * (x[0] - 0.6 * x[1])))
        follow_up = rng.uniform(30, 700)
        time, event = float(min(event_time, follow_up)), int(event_time <= follow_up)
        case = f"PE{i:05d}"
        rows.append({"case_id": case, "patient_id": case, "image": "x.nii.gz", "pe": 0,
                     "split": "test" if i % 4 == 0 else "train", "time": round(time, 4), "event": event,
                     **horizon_labels(time, event)})
        table[case] = x
    write_table(tmp_path, "inspect", "volumes", rows)
    protocol = with_params("prog/inspect-mortality", cox={"penalizer_grid": [0.0001, 100.0]},
                           logistic={"C_grid": FAST_C})
    inputs = inputs_for(tmp_path, "inspect", protocol, table)

    frame = inputs.manifest.frame.loc[inputs.train]
    scaler = StandardScaler().fit(np.stack([table[c] for c in inputs.train]))
    data = frame[["time", "event"]].astype(float).reset_index(drop=True)
    Z = scaler.transform(np.stack([table[c] for c in inputs.train]))
    data["f0"], data["f1"] = Z[:, 0], Z[:, 1]

    def direction(penalizer: float) -> np.ndarray:
        w = CoxPHFitter(penalizer=penalizer).fit(data, "time", "event").params_[["f0", "f1"]].to_numpy()
        return w / np.linalg.norm(w)

    u_small, u_large = direction(1e-4), direction(100.0)
    d = u_small - u_large
    assert u_small @ d > 0.1 and u_large @ d < -0.1  # the two penalisers rank cases along d in opposite orders

    sign = 1.0 if val_prefers_small else -1.0
    times = inputs.manifest.frame["time"].astype(float)
    for part, flip in ((inputs.split.val, sign), (inputs.split.test, -sign)):
        order = times.loc[part].rank().to_numpy()
        for case, rank in zip(part, order):  # earlier exit -> further along +d (for flip = +1)
            table[case] = scaler.mean_ + flip * (len(part) - rank) / len(part) * d * scaler.scale_
    return inputs


@pytest.mark.parametrize("val_prefers_small", [True, False])
def test_penalizer_is_chosen_on_val_never_test(tmp_path, val_prefers_small):
    inputs = _adversarial_selection(tmp_path, val_prefers_small)
    result = Prognosis().run(inputs)
    assert result.selected["penalizer"] == (1e-4 if val_prefers_small else 100.0)
    assert result.units["val_curve"]["penalizer"][repr(result.selected["penalizer"])] == 1.0
    assert result.metrics["c_index"] == 0.0  # test preferred the other penaliser; the model did not look


def test_unfittable_training_subsets_give_nan_with_a_reason(tmp_path):
    rows, table = inspect_cohort(n=120, seed=4)
    for row in rows:  # nobody dies in training
        if row["split"] == "train":
            row.update(event=0, time=max(row["time"], 400.0), **horizon_labels(max(row["time"], 400.0), 0))
    write_table(tmp_path, "inspect", "volumes", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = Prognosis().run(inputs_for(tmp_path, "inspect", fast(), table))
    assert result.metrics["c_index"] is None and "no observed event" in result.notes["c_index"]
    assert result.selected["penalizer"] is None
    for metric in ("auc_1m", "auc_6m", "auc_12m"):
        assert result.metrics[metric] is None and "only class 0" in result.notes[metric]
        assert result.selected["C"][metric] is None
    assert all(r is None for r in result.units["risk"])


def test_head_params_are_checked(cohort):
    root, rows, table = cohort

    def run(protocol):
        return Prognosis().run(inputs_for(root, "inspect", protocol, table))

    with pytest.raises(ValueError, match="unknown head param"):
        run(with_params("prog/inspect-mortality", penalty=1.0))
    with pytest.raises(ValueError, match="unknown cox param"):
        run(with_params("prog/inspect-mortality", cox={"alpha": 1.0}))
    with pytest.raises(ValueError, match="select_on"):
        run(with_params("prog/inspect-mortality", cox={"select_on": "test"}))
    with pytest.raises(ValueError, match="select_on"):
        run(with_params("prog/inspect-mortality", logistic={"select_on": "test"}))
    with pytest.raises(ValueError, match="drop_censored"):
        run(with_params("prog/inspect-mortality", logistic={"drop_censored": False}))
    with pytest.raises(ValueError, match="not a horizon column"):
        run(with_params("prog/inspect-mortality", logistic={"horizons": {"auc_1m": "mortality_2m"}}))
    with pytest.raises(ValueError, match="pca_components"):
        run(with_params("prog/inspect-mortality", cox={"pca_components": 0}))


def test_shipped_protocol_params_are_honoured(cohort):
    root, rows, table = cohort
    protocol = get_protocol("prog/inspect-mortality")
    result = Prognosis().run(inputs_for(root, "inspect", protocol, table))
    cox = protocol.head.params["cox"]
    assert result.selected["penalizer"] in cox["penalizer_grid"]
    assert set(result.units["val_curve"]["penalizer"]) == {repr(float(p)) for p in cox["penalizer_grid"]}
    assert result.metrics["c_index"] > 0.68


# ---------------------------------------------------------------------------
# the demo cohort: features made from the ground truth beat random ones
# ---------------------------------------------------------------------------

def test_demo_mortality_ground_truth_beats_random(demo_root):
    protocol = get_protocol("prog/inspect-mortality")
    manifest = load_manifest(demo_root, "inspect")
    split = make_split(manifest, protocol, 0)
    frame = manifest.frame
    rng = np.random.default_rng(11)
    # burden as the outcome reveals it: early deaths high, long survivors low, plus noise
    burden = (frame["event"].astype(float) - np.log(frame["time"].astype(float)) / 3).to_numpy()
    dim = 32
    oracle = np.outer(burden, rng.normal(size=dim)) + 0.3 * rng.normal(size=(len(frame), dim))

    def run(table, ratio=1.0):
        return Prognosis().run(TaskInputs(protocol, manifest, split, ratio, 0, features=TableFeatures(table)))

    good = run(dict(zip(frame.index, oracle)))
    # the demo test set has few deaths, so one random draw can land far from 0.5: average three
    bad = [run(random_table(frame.index, dim, seed=s)).metrics for s in (99, 100, 101)]

    def chance(metric):
        return float(np.mean([b[metric] for b in bad]))

    assert good.metrics["c_index"] > 0.8, good
    assert 0.3 < chance("c_index") < 0.7, bad
    assert good.metrics["c_index"] - chance("c_index") > 0.2, (good.metrics, bad)
    for metric, column in protocol.head.params["logistic"]["horizons"].items():
        test = frame.loc[split.test, column].astype(float).dropna()
        if test.nunique() < 2:  # too few deaths in the small demo test set: a gap with a reason
            assert good.metrics[metric] is None and "only class" in good.notes[metric]
        else:
            assert good.metrics[metric] - chance(metric) > 0.1, (good.metrics, bad)

    ratio = min(protocol.regimes)
    smallest = run(dict(zip(frame.index, oracle)), ratio=ratio)
    subset = TaskInputs(protocol, manifest, split, ratio, 0).train
    if len(subset) < 2 or frame.loc[subset, "event"].astype(int).sum() == 0:  # a Cox model cannot be fit: a reason
        assert smallest.metrics["c_index"] is None and smallest.notes["c_index"]
    else:
        assert smallest.metrics["c_index"] is not None and np.isfinite(smallest.metrics["c_index"])


def test_demo_severity_ground_truth_beats_random(demo_root):
    protocol = get_protocol("prog/stoic-severity")
    manifest = load_manifest(demo_root, "stoic")
    split = make_split(manifest, protocol, 0)
    assert set(manifest.frame.loc[split.train + split.val + split.test, "covid"].astype(int)) == {1}
    labels = label_matrix(manifest, "severe").fillna(0).to_numpy(dtype=float)
    rng = np.random.default_rng(11)
    dim = 32
    oracle = labels @ rng.normal(size=(1, dim)) + 0.5 * rng.normal(size=(len(labels), dim))

    def run(family, table):
        return family.run(TaskInputs(protocol, manifest, split, 1.0, 0, features=TableFeatures(table)))

    good = run(Prognosis(), dict(zip(manifest.frame.index, oracle)))
    bad = run(Prognosis(), random_table(manifest.frame.index, dim))
    assert set(good.metrics) == {"auc"}
    assert good.metrics["auc"] > 0.85
    assert good.metrics["auc"] - bad.metrics["auc"] > 0.2, (good.metrics, bad.metrics)
    probe = run(LinearProbe(), dict(zip(manifest.frame.index, oracle)))  # delegated, unchanged
    assert good.metrics == probe.metrics and good.selected == probe.selected and good.units == probe.units
