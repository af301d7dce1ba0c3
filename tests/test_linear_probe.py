"""Linear-probe classification: metric wrappers, C selection, standardisation, transfer, demo sanity."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from asap_bench.data.cards import load_card
from asap_bench.data.manifest import label_matrix, load_manifest
from asap_bench.metrics.classification import (
    accuracy, balanced_accuracy, binary_auc, f1_macro, macro_auc, multiclass_auc, score_outputs,
)
from asap_bench.protocol import Protocol, get_protocol
from asap_bench.splits import make_split
from asap_bench.tasks.base import FeatureLookup, TaskInputs, get_family
from asap_bench.tasks.linear_probe import LinearProbe

from conftest import ctrate_rows, write_table

CT_LABELS = load_card("ct-rate").table("volumes").labels["abnormality"].columns


class TableFeatures(FeatureLookup):
    """Features from an in-memory table keyed by case id."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def global_features(self, case_ids: list[str]) -> np.ndarray:
        return np.stack([self.table[c] for c in case_ids]).astype(np.float32)


def with_params(protocol_id: str, **params) -> Protocol:
    raw = get_protocol(protocol_id).model_dump()
    raw["head"]["params"].update(params)
    return Protocol.model_validate(raw)


FAST_GRID = [0.001, 0.1, 10.0]  # tests that are not about the shipped grid fit three C, not seven


def random_table(ids, dim: int = 16, seed: int = 99) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.normal(size=dim) for c in ids}


def inputs_for(root: Path, dataset: str, protocol: Protocol, table: dict[str, np.ndarray],
               ratio: float = 1.0, seed: int = 0) -> TaskInputs:
    manifest = load_manifest(root, dataset)
    split = make_split(manifest, protocol, seed)
    return TaskInputs(protocol, manifest, split, ratio, seed, features=TableFeatures(table))


# ---------------------------------------------------------------------------
# synthetic cohorts: labels are a noisy linear function of per-patient features
# ---------------------------------------------------------------------------

def ctrate_cohort(n_patients: int = 200, dim: int = 16, seed: int = 0):
    """CT-RATE rows whose 18 labels are thresholded noisy projections of the patient's features."""
    rng = np.random.default_rng(seed)
    rows = ctrate_rows(n_patients, seed=seed)
    W = rng.normal(size=(dim, len(CT_LABELS)))
    cut = rng.uniform(0.6, 1.2, size=len(CT_LABELS))  # prevalence about 12-27 %
    latent, table = {}, {}
    for row in rows:
        pid = row["patient_id"]
        if pid not in latent:
            z = rng.normal(size=dim)
            score = (z @ W) / np.sqrt(dim) + 0.35 * rng.normal(size=len(CT_LABELS))
            latent[pid] = (z, (score > cut).astype(int))
        z, labels = latent[pid]
        row.update(dict(zip(CT_LABELS, labels.tolist())))
        table[row["case_id"]] = z + 0.1 * rng.normal(size=dim)
    return rows, table


def stoic_cohort(n: int = 300, dim: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    rows, table = [], {}
    for i in range(n):
        x = rng.normal(size=dim)
        covid = int(x @ w / np.sqrt(dim) + 0.4 * rng.normal() > 0.2)
        case = f"stoic_{i:04d}"
        rows.append({"case_id": case, "patient_id": case, "image": f"images/{case}.nii.gz",
                     "covid": covid, "severe": 0})
        table[case] = x
    return rows, table


def ccii_cohort(n_patients: int = 200, dim: int = 16, seed: int = 2):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(dim, 3))
    rows, table = [], {}
    for p in range(n_patients):
        z = rng.normal(size=dim)
        diagnosis = int(np.argmax(z @ W / np.sqrt(dim) + 0.3 * rng.gumbel(size=3)))
        for s in range(int(rng.integers(1, 4))):
            case = f"ccii_p{p:04d}_s{s}"
            rows.append({"case_id": case, "patient_id": f"ccii_p{p:04d}", "image": f"images/{case}.nii.gz",
                         "diagnosis": diagnosis})
            table[case] = z + 0.1 * rng.normal(size=dim)
    return rows, table


COHORTS = {
    "multilabel": ("ct-rate", "cls/ct-rate", ctrate_cohort),
    "binary": ("stoic", "cls/stoic", stoic_cohort),
    "multiclass": ("cc-ccii", "cls/cc-ccii", ccii_cohort),
}


def build(tmp_path: Path, kind: str):
    dataset, protocol_id, make = COHORTS[kind]
    rows, table = make()
    write_table(tmp_path, dataset, "volumes", rows)
    return dataset, get_protocol(protocol_id), rows, table


# ---------------------------------------------------------------------------
# metrics agree with scikit-learn
# ---------------------------------------------------------------------------

def _two_class(draw_seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(draw_seed)
    y = rng.integers(0, 2, size=n)
    y[:2] = [0, 1]
    scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # rounding makes ties
    return y, scores


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 200))
def test_binary_metrics_match_sklearn(seed, n):
    y, s = _two_class(seed, n)
    assert abs(binary_auc(y, s).value - roc_auc_score(y, s)) <= 1e-9
    pred = (s > 0).astype(int)
    assert abs(accuracy(y, pred).value - accuracy_score(y, pred)) <= 1e-9
    assert abs(balanced_accuracy(y, pred).value - balanced_accuracy_score(y, pred)) <= 1e-9
    expected = f1_score(y, pred, labels=[0, 1], average="macro", zero_division=np.nan)
    assert abs(f1_macro(y, pred).value - expected) <= 1e-9


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(4, 150), labels=st.integers(1, 18))
def test_macro_auc_matches_sklearn(seed, n, labels):
    rng = np.random.default_rng(seed)
    Y = rng.integers(0, 2, size=(n, labels))
    Y[0], Y[1] = 0, 1
    S = rng.random(size=(n, labels))
    got = macro_auc(Y, S)
    assert abs(got.value - roc_auc_score(Y, S, average="macro")) <= 1e-9
    per_label = roc_auc_score(Y, S, average=None)
    assert np.allclose(list(got.per_label.values()), np.atleast_1d(per_label), atol=1e-9, rtol=0)
    assert got.reason == "" and got.skipped == {}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(6, 150), k=st.integers(3, 5))
def test_multiclass_metrics_match_sklearn(seed, n, k):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    y[:k] = np.arange(k)
    logits = rng.normal(size=(n, k))
    P = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert abs(multiclass_auc(y, P).value - roc_auc_score(y, P, multi_class="ovr", average="macro")) <= 1e-9
    pred = P.argmax(axis=1)
    assert abs(balanced_accuracy(y, pred).value - balanced_accuracy_score(y, pred)) <= 1e-9
    out = score_outputs("multiclass", y[:, None], P, ["acc", "balanced_acc", "f1_macro"], [str(c) for c in range(k)])
    assert abs(out["acc"].value - accuracy_score(y, pred)) <= 1e-9
    expected_f1 = f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=np.nan)
    assert abs(out["f1_macro"].value - expected_f1) <= 1e-9


def test_degenerate_inputs_give_nan_with_a_reason():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warning escapes either
        one_class = binary_auc([0, 0, 0], [0.1, 0.5, 0.9])
        assert math.isnan(one_class.value) and "only class 0" in one_class.reason
        empty = binary_auc([], [])
        assert math.isnan(empty.value) and "no cases" in empty.reason
        unscored = binary_auc([0, 1], [0.2, np.nan])
        assert math.isnan(unscored.value) and "no score" in unscored.reason
        for fn in (accuracy, balanced_accuracy, f1_macro):
            assert math.isnan(fn([], []).value) and fn([], []).reason
        assert math.isnan(balanced_accuracy([1, 1], [1, 0]).value)

        # macro AUC averages the defined labels and names the skipped one
        Y = np.array([[0, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=float)
        S = np.array([[0.1, 0.3, 0.9], [0.8, 0.2, 0.1], [0.3, 0.4, 0.7], [0.6, 0.1, 0.2]])
        got = macro_auc(Y, S, ["a", "b", "c"])
        assert got.value == pytest.approx(np.mean([roc_auc_score(Y[:, 0], S[:, 0]), roc_auc_score(Y[:, 2], S[:, 2])]))
        assert list(got.skipped) == ["b"] and "b" in got.reason and "2 of 3" in got.reason
        assert math.isnan(got.per_label["b"])
        none = macro_auc(Y[:, [1]], S[:, [1]], ["b"])
        assert math.isnan(none.value) and "b" in none.reason

        # missing labels are dropped per label, not per case
        Y_missing = Y.copy()
        Y_missing[0, 0] = np.nan
        assert macro_auc(Y_missing, S).per_label["0"] == pytest.approx(roc_auc_score(Y[1:, 0], S[1:, 0]))

        # multi-class: an absent class is skipped, one class only is undefined
        P = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
        partial = multiclass_auc([0, 1, 0, 1], P, ["N", "CP", "NCP"])
        assert list(partial.skipped) == ["NCP"] and not math.isnan(partial.value)
        single = multiclass_auc([1, 1, 1, 1], P)
        assert math.isnan(single.value) and "only class 1" in single.reason


# ---------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["multilabel", "binary", "multiclass"])
def test_probe_beats_random_features(tmp_path, kind):
    dataset, protocol, rows, table = build(tmp_path, kind)
    probe = LinearProbe()
    good = probe.run(inputs_for(tmp_path, dataset, protocol, table))
    bad = probe.run(inputs_for(tmp_path, dataset, protocol, random_table(table)))
    assert good.metrics["auc"] > 0.8, good
    assert 0.3 < bad.metrics["auc"] < 0.7, bad
    assert good.metrics["auc"] - bad.metrics["auc"] > 0.2
    assert set(good.metrics) == set(protocol.metrics)
    if kind == "multiclass":
        assert good.metrics["acc"] > bad.metrics["acc"]
    assert good.selected["C"] in protocol.head.params["C_grid"]
    units = good.units
    assert units["ids"] == inputs_for(tmp_path, dataset, protocol, table).split.test
    assert len(units["scores"]) == len(units["labels"]) == len(units["ids"]) == good.sizes["test"]
    assert set(units["per_label"]) == set(units["score_names"])


def test_registered_as_the_cls_family():
    assert isinstance(get_family(get_protocol("cls/ct-rate")), LinearProbe)
    assert isinstance(get_family(get_protocol("ext/inspect-rspect")), LinearProbe)


def test_metrics_recompute_from_units(tmp_path):
    for kind in ("multilabel", "multiclass"):
        root = tmp_path / kind
        dataset, protocol, rows, table = build(root, kind)
        result = LinearProbe().run(inputs_for(root, dataset, protocol, table))
        u = result.units
        labels = np.array([[np.nan if v is None else v for v in row] for row in u["labels"]])
        scores = np.array([[np.nan if v is None else v for v in row] for row in u["scores"]])
        again = score_outputs(u["task"], labels, scores, protocol.metrics, u["score_names"], u["thresholds"])
        assert {m: v.value for m, v in again.items()} == pytest.approx(result.metrics, abs=1e-12)


def _adversarial_selection(tmp_path: Path, val_prefers_small: bool):
    """Val and test built so that C=1e-4 and C=100 rank them in opposite ways."""
    rng = np.random.default_rng(5)
    rows, table = [], {}
    for i in range(300):
        z = rng.normal()
        x = np.array([z + 0.4 * rng.normal(), z + 0.4 * rng.normal()])
        covid = int(x[0] - 0.5 * x[1] + 0.1 * rng.normal() > 0.25)
        case = f"stoic_{i:04d}"
        rows.append({"case_id": case, "patient_id": case, "image": "x.nii.gz", "covid": covid, "severe": 0})
        table[case] = x
    write_table(tmp_path, "stoic", "volumes", rows)
    protocol = with_params("cls/stoic", C_grid=[0.0001, 100.0])
    inputs = inputs_for(tmp_path, "stoic", protocol, table)

    X = np.stack([table[c] for c in inputs.train])
    y = label_matrix(inputs.manifest, "covid").loc[inputs.train, "covid"].to_numpy()
    scaler = StandardScaler().fit(X)
    w_small = LogisticRegression(C=1e-4).fit(scaler.transform(X), y).coef_[0]
    w_large = LogisticRegression(C=100.0, max_iter=1000).fit(scaler.transform(X), y).coef_[0]
    u_small, u_large = w_small / np.linalg.norm(w_small), w_large / np.linalg.norm(w_large)
    d = u_small - u_large
    assert u_small @ d > 0.1 and u_large @ d < -0.1  # the two C rank cases along d in opposite orders

    labels = label_matrix(inputs.manifest, "covid")["covid"]
    sign = 1.0 if val_prefers_small else -1.0
    for part, flip in ((inputs.split.val, sign), (inputs.split.test, -sign)):
        for case in part:
            side = (1.0 if labels[case] == 1 else -1.0) * flip * (1.0 + rng.random())
            table[case] = scaler.mean_ + side * d * scaler.scale_
    return inputs


@pytest.mark.parametrize("val_prefers_small", [True, False])
def test_c_is_chosen_on_val_never_test(tmp_path, val_prefers_small):
    inputs = _adversarial_selection(tmp_path, val_prefers_small)
    result = LinearProbe().run(inputs)
    assert result.selected["C"] == (1e-4 if val_prefers_small else 100.0)
    curve = result.units["val_curve"]
    assert curve[repr(result.selected["C"])] == 1.0
    assert result.metrics["auc"] == 0.0  # test preferred the other C; the probe did not look


def test_same_seed_same_result(tmp_path):
    dataset, _, rows, table = build(tmp_path, "multilabel")
    protocol = with_params("cls/ct-rate", C_grid=FAST_GRID)
    first = LinearProbe().run(inputs_for(tmp_path, dataset, protocol, table, ratio=0.1, seed=3))
    second = LinearProbe().run(inputs_for(tmp_path, dataset, protocol, table, ratio=0.1, seed=3))
    assert first.metrics == second.metrics
    assert first.units == second.units and first.selected == second.selected and first.notes == second.notes
    other = LinearProbe().run(inputs_for(tmp_path, dataset, protocol, table, ratio=0.1, seed=4))
    assert other.units["scores"] != first.units["scores"]  # another seed draws another regime subset


def test_standardisation_uses_train_statistics_only(tmp_path):
    rows, table = ctrate_cohort()
    for row in rows[::7]:  # some labels missing: those rows are dropped for that label only
        row[CT_LABELS[0]] = None
    write_table(tmp_path, "ct-rate", "volumes", rows)
    protocol = with_params("cls/ct-rate", C_grid=[0.01], tol=1e-10)
    inputs = inputs_for(tmp_path, "ct-rate", protocol, table)
    split = inputs.split
    for case in split.val + split.test:  # held-out data from a shifted scanner
        table[case] = 3.0 + 2.0 * table[case]
    result = LinearProbe().run(inputs)

    X = {part: np.stack([table[c] for c in ids]) for part, ids in
         (("train", inputs.train), ("val", split.val), ("test", split.test))}
    Y = label_matrix(inputs.manifest, "abnormality").loc[inputs.train].to_numpy(dtype=float)
    got = np.array(result.units["scores"], dtype=float)

    def reference(scaler):
        out = np.empty_like(got)
        for j in range(Y.shape[1]):
            keep = ~np.isnan(Y[:, j])
            model = LogisticRegression(C=0.01, tol=1e-10, max_iter=1000).fit(scaler.transform(X["train"][keep]),
                                                                            Y[keep, j])
            out[:, j] = model.predict_proba(scaler.transform(X["test"]))[:, 1]
        return out

    assert np.abs(got - reference(StandardScaler().fit(X["train"]))).max() < 1e-5
    leaky = StandardScaler().fit(np.concatenate(list(X.values())))
    assert np.abs(got - reference(leaky)).max() > 1e-2
    assert result.sizes["train"] == len(inputs.train)
    missing = label_matrix(inputs.manifest, "abnormality").loc[split.test, CT_LABELS[0]].isna()
    assert [row[0] is None for row in result.units["labels"]] == missing.tolist()


def test_label_with_one_class_in_test_is_skipped_with_a_note(tmp_path):
    rows, table = ctrate_cohort()
    label = CT_LABELS[3]
    for row in rows:
        if row["split"] == "test":
            row[label] = 0
    write_table(tmp_path, "ct-rate", "volumes", rows)
    result = LinearProbe().run(inputs_for(tmp_path, "ct-rate", with_params("cls/ct-rate", C_grid=FAST_GRID), table))
    assert result.units["per_label"][label] is None
    assert result.metrics["auc"] is not None and result.metrics["auc"] > 0.8
    assert label in result.notes["auc"] and "17 of 18" in result.notes["auc"]


def test_head_params_are_checked(tmp_path):
    rows, table = stoic_cohort()
    write_table(tmp_path, "stoic", "volumes", rows)
    with pytest.raises(ValueError, match="unknown head param"):
        LinearProbe().run(inputs_for(tmp_path, "stoic", with_params("cls/stoic", C_gird=[1.0]), table))
    with pytest.raises(ValueError, match="select_on"):
        LinearProbe().run(inputs_for(tmp_path, "stoic", with_params("cls/stoic", select_on="test"), table))
    with pytest.raises(ValueError, match="multi_label"):
        LinearProbe().run(inputs_for(tmp_path, "stoic", with_params("cls/stoic", multi_label="one_vs_rest"), table))
    weighted = LinearProbe().run(inputs_for(tmp_path, "stoic", with_params("cls/stoic", class_weight="balanced"), table))
    assert weighted.metrics["auc"] > 0.8


def test_external_validation_scores_the_unchanged_source_model(tmp_path):
    source_rows, table = ctrate_cohort(seed=0)
    write_table(tmp_path, "ct-rate", "volumes", source_rows)
    target_rows, target_table = ctrate_cohort(n_patients=60, seed=0)  # same label model, new cases
    rng = np.random.default_rng(7)
    target_rows = [dict(r, case_id="ahph_" + r["case_id"], patient_id="ahph_" + r["patient_id"]) for r in target_rows]
    target_table = {"ahph_" + c: v + 0.05 * rng.normal(size=v.shape) for c, v in target_table.items()}
    write_table(tmp_path, "ahph", "volumes", target_rows)

    ext = with_params("ext/ct-rate-ahph", C_grid=FAST_GRID)
    source_inputs = inputs_for(tmp_path, "ct-rate", with_params("cls/ct-rate", C_grid=FAST_GRID), table)
    inputs = inputs_for(tmp_path, "ct-rate", ext, table)
    inputs.target = load_manifest(tmp_path, "ahph")
    inputs.target_features = TableFeatures(target_table)
    result = LinearProbe().run(inputs)
    plain = LinearProbe().run(source_inputs)

    assert result.selected == plain.selected  # fitted and selected exactly as on the source
    assert result.units["ids"] == sorted(inputs.target.frame.index)  # every target case is test
    assert result.sizes["target"] == len(target_rows)
    assert set(result.metrics) == {"auc"} and result.metrics["auc"] > 0.8
    source = result.units["source"]["metrics"]
    assert source["source_auc"] == pytest.approx(plain.metrics["auc"], abs=1e-12)
    assert source["source_balanced_acc"] == pytest.approx(plain.metrics["balanced_acc"], abs=1e-12)
    assert result.units["thresholds"] == plain.units["thresholds"]

    inputs.target = None
    missing = LinearProbe().run(inputs)
    assert missing.metrics == {"auc": None} and "unavailable" in missing.notes["auc"]


# ---------------------------------------------------------------------------
# the demo cohort: features made from the ground truth beat random ones
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("protocol_id", ["cls/ct-rate", "cls/stoic"])
def test_demo_label_features_beat_random(demo_root, protocol_id):
    protocol = get_protocol(protocol_id)
    manifest = load_manifest(demo_root, protocol.data.dataset, protocol.data.table)
    split = make_split(manifest, protocol, 0)
    labels = label_matrix(manifest, protocol.data.target).fillna(0).to_numpy(dtype=float)
    rng = np.random.default_rng(11)
    dim = 32
    informative = labels @ rng.normal(size=(labels.shape[1], dim)) + 0.5 * rng.normal(size=(len(labels), dim))
    oracle = dict(zip(manifest.frame.index, informative))
    noise = random_table(manifest.frame.index, dim)

    def run(table):
        return LinearProbe().run(TaskInputs(protocol, manifest, split, 1.0, 0, features=TableFeatures(table)))

    good, bad = run(oracle), run(noise)
    assert good.metrics["auc"] > 0.85
    assert good.metrics["auc"] - bad.metrics["auc"] > 0.2
    assert good.metrics["balanced_acc"] > bad.metrics["balanced_acc"]
