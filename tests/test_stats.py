"""Statistics layer: the record frame, mean ± std, completeness, and paired tests that agree with scipy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from asap_bench import stats
from asap_bench.metrics.classification import score_outputs
from asap_bench.metrics.survival import score_survival
from asap_bench.protocol import Protocol, get_protocol
from asap_bench.results.record import Provenance, ResultRecord, Timing, write_record
from asap_bench.results.recompute import recompute
from asap_bench.results.store import COLUMNS, load_records

from conftest import ctrate_rows, write_table

# ---------------------------------------------------------------------------
# records in tmp dirs, written with the real schema
# ---------------------------------------------------------------------------

FAMILY = {"cls/ct-rate": "cls", "cls/stoic": "cls", "cls/cc-ccii": "cls", "prog/inspect-mortality": "prog",
          "seg/btcv": "seg"}


def write(root: Path, encoder: str, protocol: str, seed: int, metrics: dict, units: dict | None = None, *,
          regime: float = 1.0, status: str = "ok", error: str | None = None, protocol_fp: str = "pfp",
          encoder_fp: str | None = None, synthetic: bool = True) -> Path:
    family = FAMILY.get(protocol, protocol.split("/")[0])
    prov = Provenance(protocol_id=protocol, protocol_version=1, protocol_fingerprint=protocol_fp, encoder=encoder,
                      encoder_variant="demo", encoder_fingerprint=encoder_fp or f"efp-{encoder}", dataset="d",
                      table="volumes", synthetic=synthetic, software={"asap_bench": "test"}, device="cpu")
    record = ResultRecord(job_key=f"{encoder}-{protocol}-{regime}-{seed}", encoder=encoder, protocol=protocol,
                          family=family, regime=regime, seed=seed, status=status, error=error,
                          metrics=metrics if status == "ok" else {}, provenance=prov,
                          timing=Timing(started="t0", finished="t1", seconds=1.0))
    path = root / encoder / protocol.replace("/", "__") / f"r{regime!r}_s{seed}.json"
    write_record(path, record, units)
    return path


def cls_units(kind: str, ids, Y, S, names, metrics, thresholds=None):
    """Metrics and units in the linear probe's format, scored by the project's own metric functions."""
    result = score_outputs(kind, Y, S, metrics, names, thresholds)
    auc = result.get("auc") or score_outputs(kind, Y, S, ["auc"], names)["auc"]
    jsonable = lambda A: [[None if math.isnan(v) else float(v) for v in row] for row in np.asarray(A, dtype=float)]
    units = {"kind": "case", "task": kind, "ids": list(ids), "label_names": list(names), "score_names": list(names),
             "labels": jsonable(Y), "scores": jsonable(S), "thresholds": thresholds,
             "per_label": {n: (None if math.isnan(v) else v) for n, v in auc.per_label.items()}}
    return {m: (v.value if v.defined else None) for m, v in result.items()}, units


def survival_units(ids, time, event, risk, horizon_labels, horizon_scores, metrics):
    result = score_survival(time, event, risk, horizon_labels, horizon_scores, metrics)
    none = lambda a: [None if math.isnan(v) else float(v) for v in a]
    units = {"kind": "case", "task": "survival", "ids": list(ids), "time": none(time), "event": none(event),
             "risk": none(risk),
             "horizons": {m: {"column": m, "days": 30, "labels": none(horizon_labels[m]),
                              "scores": none(horizon_scores[m])} for m in horizon_labels}}
    return {m: (v.value if v.defined else None) for m, v in result.items()}, units


def multilabel_data(rng, n=80, labels=5, signal=1.0):
    Y = (rng.random((n, labels)) < 0.35).astype(float)
    S = signal * Y + rng.normal(size=(n, labels))
    return Y, 1 / (1 + np.exp(-S))


def survival_data(rng, n=60, signal=1.0):
    latent = rng.normal(size=n)
    time = np.round(rng.exponential(np.exp(-latent)) * 100, 0) + 1  # rounded: tied times occur
    event = (rng.random(n) < 0.7).astype(float)
    risk = signal * latent + rng.normal(size=n)
    h = np.where(time <= 60, 1.0, np.where(event == 1, 0.0, 0.0))
    h[(time <= 60) & (event == 0)] = np.nan  # censored before the horizon: unknown
    return time, event, np.round(risk, 1), h, 1 / (1 + np.exp(-np.round(risk, 1)))


# ---------------------------------------------------------------------------
# the record frame
# ---------------------------------------------------------------------------

def test_load_records_rows_failed_and_problems(tmp_path):
    write(tmp_path, "a", "cls/stoic", 0, {"auc": 0.8, "balanced_acc": None})
    write(tmp_path, "a", "cls/stoic", 1, {}, status="failed", error="FloatingPointError: loss became NaN")
    (tmp_path / "a" / "cls__stoic" / "broken.json").write_text("{not json")
    (tmp_path / "a" / "cls__stoic" / "other.json").write_text(json.dumps({"hello": 1}))
    frame = load_records([tmp_path, tmp_path])  # a folder given twice is read once
    assert list(frame.columns) == COLUMNS
    ok = frame[frame["status"] == "ok"].set_index("metric")
    assert ok.loc["auc", "value"] == 0.8 and math.isnan(ok.loc["balanced_acc", "value"])
    assert (ok["source"] == "run").all() and ok["synthetic"].all() and (ok["regime"] == 1.0).all()
    failed = frame[frame["status"] == "failed"]
    assert len(failed) == 1 and failed["metric"].iloc[0] is None and failed["seed"].iloc[0] == 1
    assert "loss became NaN" in failed["error"].iloc[0]
    problems = dict(frame.attrs["problems"])
    assert set(Path(p).name for p in problems) == {"broken.json", "other.json"}
    assert frame["seed"].dtype.kind == "i" and frame["value"].dtype == float
    with pytest.raises(ValueError, match="broken.json|other.json"):
        load_records(tmp_path, strict=True)


# ---------------------------------------------------------------------------
# aggregate and completeness
# ---------------------------------------------------------------------------

def test_aggregate_mean_std_over_seeds(tmp_path):
    values = [0.71, 0.74, 0.69, 0.77, 0.73]
    for seed, v in enumerate(values):
        write(tmp_path, "a", "cls/stoic", seed, {"auc": v}, regime=0.1)
    write(tmp_path, "a", "cls/stoic", 0, {"auc": 0.8}, regime=1.0)
    agg = stats.aggregate(load_records(tmp_path)).set_index("regime")
    assert agg.loc[0.1, "mean"] == pytest.approx(np.mean(values))
    assert agg.loc[0.1, "std"] == pytest.approx(np.std(values, ddof=1))
    assert agg.loc[0.1, "n_seeds"] == 5 and agg.loc[0.1, "seeds"] == (0, 1, 2, 3, 4)
    assert agg.loc[1.0, "std"] == 0.0 and agg.loc[1.0, "n_seeds"] == 1


def test_aggregate_refuses_to_mix(tmp_path):
    write(tmp_path, "a", "cls/stoic", 0, {"auc": 0.7}, protocol_fp="old")
    write(tmp_path, "a", "cls/stoic", 1, {"auc": 0.8}, protocol_fp="new")
    frame = load_records(tmp_path)
    with pytest.raises(ValueError, match="protocol fingerprint"):
        stats.aggregate(frame)
    assert stats.aggregate(frame, keep={"protocol_fingerprint": "new"})["mean"].tolist() == [0.8]

    demo = tmp_path / "mixed"
    write(demo, "a", "cls/stoic", 0, {"auc": 0.7}, synthetic=True)
    write(demo, "a", "cls/stoic", 1, {"auc": 0.8}, synthetic=False)
    frame = load_records(demo)
    with pytest.raises(ValueError, match="demo"):
        stats.aggregate(frame)
    assert stats.aggregate(frame, keep={"synthetic": False})["mean"].tolist() == [0.8]

    ckpt = tmp_path / "ckpt"
    write(ckpt, "a", "cls/stoic", 0, {"auc": 0.7}, encoder_fp="one")
    write(ckpt, "a", "cls/stoic", 1, {"auc": 0.8}, encoder_fp="two")
    with pytest.raises(ValueError, match="encoder fingerprint"):
        stats.aggregate(load_records(ckpt))

    twice = tmp_path / "twice"
    write(twice / "x", "a", "cls/stoic", 0, {"auc": 0.7})
    write(twice / "y", "a", "cls/stoic", 0, {"auc": 0.7})
    with pytest.raises(ValueError, match="2 records"):
        stats.aggregate(load_records(twice))


def test_completeness_finds_missing_failed_and_mixed(tmp_path):
    for seed in range(5):
        write(tmp_path, "good", "cls/stoic", seed, {"auc": 0.8})
    for seed in (0, 1, 3):
        write(tmp_path, "gaps", "cls/stoic", seed, {"auc": 0.7})
    write(tmp_path, "gaps", "cls/stoic", 4, {}, status="failed", error="RuntimeError: CUDA out of memory")
    for seed in range(5):
        write(tmp_path, "mixed", "cls/stoic", seed, {"auc": 0.7}, protocol_fp="old" if seed < 2 else "new",
              synthetic=seed != 4)
    write(tmp_path, "good", "cls/ct-rate", 0, {"auc": 0.8}, regime=0.01)  # the others lack this cell
    table = stats.completeness(load_records(tmp_path), expected_seeds=5).set_index(["encoder", "protocol"])
    good = table.loc[("good", "cls/stoic")]
    assert good["complete"] and good["problems"] == ""
    gaps = table.loc[("gaps", "cls/stoic")]
    assert not gaps["complete"] and gaps["missing_seeds"] == (2,) and gaps["failed_seeds"] == (4,)
    assert "out of memory" in gaps["problems"]
    mixed = table.loc[("mixed", "cls/stoic")]
    assert set(mixed["mixed"]) == {"protocol_fingerprint", "synthetic"} and not mixed["complete"]
    assert "demo and real" in mixed["problems"]
    absent = table.loc[("gaps", "cls/ct-rate")]
    assert absent["problems"] == "no records" and absent["missing_seeds"] == (0, 1, 2, 3, 4)
    assert table.loc[("good", "cls/ct-rate"), "missing_seeds"] == (1, 2, 3, 4)
    assert stats.completeness(load_records(tmp_path), expected_seeds=[0]).set_index(
        ["encoder", "protocol"]).loc[("good", "cls/ct-rate"), "complete"]


# ---------------------------------------------------------------------------
# per case, per label, per seed: p-values are scipy's
# ---------------------------------------------------------------------------

def _seg_records(root, rng, seeds=(0, 1, 2), n=40, gap=0.03):
    """Dice per case for two encoders; B lists its cases in another order and lacks one."""
    ids = [f"case{i:03d}" for i in range(n)]
    hardness = rng.uniform(0.5, 0.9, size=n)
    dice = {}
    for seed in seeds:
        a = np.clip(hardness + gap + 0.05 * rng.normal(size=n), 0, 1)
        b = np.clip(hardness + 0.05 * rng.normal(size=n), 0, 1)
        a[5] = np.nan  # a case whose Dice is undefined for A in every seed
        order = rng.permutation(n)[1:]
        for enc, values, keep in (("a", a, np.arange(n)), ("b", b, order)):
            units = {"kind": "case", "task": "segmentation", "ids": [ids[i] for i in keep],
                     "per_case": {"dice": [None if np.isnan(values[i]) else float(values[i]) for i in keep]}}
            write(root, enc, "seg/btcv", seed, {"dice": float(np.nanmean(values[keep]))}, units)
            dice[(enc, seed)] = {ids[i]: values[i] for i in keep}
    return ids, dice


def test_case_wilcoxon_matches_scipy(tmp_path):
    rng = np.random.default_rng(0)
    ids, dice = _seg_records(tmp_path, rng)
    frame = load_records(tmp_path)
    got = stats.compare(frame, "a", "b", protocol="seg/btcv", regime=1.0, metric="dice")
    assert got.unit == "case" and got.test.startswith("Wilcoxon")
    # the same inputs, built independently: per case, the mean over the seeds both encoders score it in
    x, y = [], []
    for case in ids:
        pairs = [(dice[("a", s)][case], dice[("b", s)][case]) for s in (0, 1, 2)
                 if case in dice[("b", s)] and np.isfinite(dice[("a", s)][case])]
        if pairs:
            x.append(np.mean([p[0] for p in pairs]))
            y.append(np.mean([p[1] for p in pairs]))
    expected = sps.wilcoxon(x, y)
    assert got.n == len(x) and got.p == expected.pvalue and got.statistic == expected.statistic
    assert got.effect == pytest.approx(np.mean(np.subtract(x, y)))
    assert got.significant() and got.seeds == (0, 1, 2)

    stacked = stats.compare(frame, "a", "b", protocol="seg/btcv", regime=1.0, metric="dice", pool_seeds="stack")
    xs = [dice[("a", s)][c] for s in (0, 1, 2) for c in ids if c in dice[("b", s)] and np.isfinite(dice[("a", s)][c])]
    ys = [dice[("b", s)][c] for s in (0, 1, 2) for c in ids if c in dice[("b", s)] and np.isfinite(dice[("a", s)][c])]
    assert stacked.unit == "case x seed" and stacked.n == len(xs)
    assert stacked.p == sps.wilcoxon(xs, ys).pvalue


def test_correctness_per_case_matches_scipy(tmp_path):
    rng = np.random.default_rng(1)
    n, ids = 120, [f"c{i}" for i in range(120)]
    y = rng.integers(0, 3, size=n).astype(float)
    correct = {}
    for seed in range(3):
        for enc, noise in (("a", 0.6), ("b", 1.5)):
            P = np.eye(3)[y.astype(int)] + noise * rng.random((n, 3))
            P /= P.sum(axis=1, keepdims=True)
            metrics, units = cls_units("multiclass", ids, y[:, None], P, ["N", "CP", "NCP"], ["acc", "auc"])
            write(tmp_path, enc, "cls/cc-ccii", seed, metrics, units)
            correct[(enc, seed)] = (P.argmax(axis=1) == y).astype(float)
    got = stats.compare(load_records(tmp_path), "a", "b", protocol="cls/cc-ccii", regime=1.0, metric="acc")
    x = np.mean([correct[("a", s)] for s in range(3)], axis=0)
    z = np.mean([correct[("b", s)] for s in range(3)], axis=0)
    assert got.unit == "case" and got.p == sps.wilcoxon(x, z).pvalue and got.effect > 0


def test_label_wilcoxon_matches_scipy(tmp_path):
    rng = np.random.default_rng(2)
    ids, labels = [f"c{i}" for i in range(90)], [f"L{j}" for j in range(8)]
    per_label = {"a": [], "b": []}
    for seed in range(3):
        Y = (rng.random((90, 8)) < 0.3).astype(float)
        Y[:, 7] = 0.0  # a label with no positive case: undefined, left out
        for enc, signal in (("a", 1.2), ("b", 0.6)):
            S = 1 / (1 + np.exp(-(signal * Y + rng.normal(size=Y.shape))))
            metrics, units = cls_units("multilabel", ids, Y, S, labels, ["auc", "balanced_acc"], [0.5] * 8)
            write(tmp_path, enc, "cls/ct-rate", seed, metrics, units)
            per_label[enc].append([roc_auc_score(Y[:, j], S[:, j]) for j in range(7)])
    got = stats.compare(load_records(tmp_path), "a", "b", protocol="cls/ct-rate", regime=1.0, metric="auc")
    x, y = np.mean(per_label["a"], axis=0), np.mean(per_label["b"], axis=0)
    expected = sps.wilcoxon(x, y)
    assert got.unit == "label" and got.n == 7 and "7 of 8" in got.note
    assert got.p == pytest.approx(expected.pvalue, rel=1e-12) and got.statistic == expected.statistic
    assert got.effect == pytest.approx(np.mean(x - y))
    # per-label values that do not average to the record's AUC are refused
    units = json.loads(next((tmp_path / "a").rglob("*.units.json")).read_text())
    units["per_label"]["L0"] = 0.0
    metrics = {"auc": 0.9, "balanced_acc": 0.5}
    write(tmp_path / "bad", "a", "cls/ct-rate", 0, metrics, units)
    write(tmp_path / "bad", "b", "cls/ct-rate", 0, metrics, units)
    with pytest.raises(ValueError, match="per-label AUC"):
        stats.compare(load_records(tmp_path / "bad"), "a", "b", protocol="cls/ct-rate", regime=1.0, metric="auc")


def test_seed_wilcoxon_with_five_seeds_marks_nothing(tmp_path):
    for seed in range(5):
        write(tmp_path, "a", "cls/stoic", seed, {"auc": 0.80 + 0.01 * seed})
        write(tmp_path, "b", "cls/stoic", seed, {"auc": 0.70 + 0.013 * seed})
    frame = load_records(tmp_path)
    got = stats.seed_wilcoxon(frame, "a", "b", protocol="cls/stoic", regime=1.0, metric="auc")
    expected = sps.wilcoxon([0.80 + 0.01 * s for s in range(5)], [0.70 + 0.013 * s for s in range(5)])
    assert got.unit == "seed" and got.n == 5 and got.p == expected.pvalue == 0.0625
    assert got.min_p == 0.0625 and not got.can_be_significant and not got.significant(alpha=0.1)
    assert "cannot reach p < 0.05" in got.note and "0.0625" in got.note
    # records without units fall back to seeds under 'auto', and best_other marks nothing on them
    table = stats.best_other(frame, unit="auto")
    assert (table["unit"] == "seed").all() and not table["significant"].any()
    # tied differences make scipy use its normal approximation (p < 0.05): still never marked
    tied = stats.wilcoxon_paired([1, 1, 1, 1, 1], [0, 0, 0, 0, 0], "seed")
    assert tied.p == sps.wilcoxon([1] * 5, [0] * 5).pvalue and not tied.significant()


# ---------------------------------------------------------------------------
# the paired bootstrap
# ---------------------------------------------------------------------------

def test_bootstrap_p_definition():
    d = np.array([0.3, 0.2, -0.1, 0.0, 0.5, 0.1, 0.2, np.nan])
    assert stats.bootstrap_p(0.2, d) == pytest.approx(2 * (1 + 2) / (7 + 1))
    assert stats.bootstrap_p(-0.2, -d) == pytest.approx(2 * (1 + 2) / (7 + 1))
    assert stats.bootstrap_p(0.0, d) == 1.0
    assert stats.bootstrap_p(0.1, np.full(3, -1.0)) == 1.0  # capped
    assert stats.bootstrap_p(0.1, np.full(999, 1.0)) == pytest.approx(2 / 1000)


def _resample_cases():
    rng = np.random.default_rng(3)
    ids = [f"c{i}" for i in range(50)]
    Y, S = multilabel_data(rng, n=50, labels=4)
    Y[3, 1] = np.nan  # unlabelled for one finding only
    yield "multilabel", cls_units("multilabel", ids, Y, S, list("abcd"), ["auc", "acc", "balanced_acc", "f1_macro"],
                                  [0.45, 0.5, 0.55, 0.6])[1], ["auc", "acc", "balanced_acc", "f1_macro"]
    y = rng.integers(0, 2, size=50).astype(float)[:, None]
    yield "binary", cls_units("binary", ids, y, np.round(rng.random((50, 1)), 1), ["x"],
                              ["auc", "acc", "balanced_acc", "f1_macro"], [0.5])[1], ["auc", "acc", "balanced_acc",
                                                                                      "f1_macro"]
    y = rng.integers(0, 3, size=50).astype(float)[:, None]
    P = rng.random((50, 3))
    yield "multiclass", cls_units("multiclass", ids, y, P / P.sum(1, keepdims=True), ["p", "q", "r"],
                                  ["auc", "acc", "balanced_acc", "f1_macro"])[1], ["auc", "acc", "balanced_acc",
                                                                                  "f1_macro"]
    t, e, r, h, hs = survival_data(rng, n=50)
    yield "survival", survival_units(ids, t, e, r, {"auc_2m": h}, {"auc_2m": hs}, ["c_index", "auc_2m"])[1], \
        ["c_index", "auc_2m"]


@pytest.mark.parametrize("kind, units, metrics", list(_resample_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_bootstrap_recomputation_equals_the_metric_functions(kind, units, metrics):
    """A resample is integer case weights; the weighted metric equals recompute() on the resampled units."""
    rng = np.random.default_rng(4)
    n = len(units["ids"])
    draws = [np.arange(n)] + [rng.integers(0, n, size=n) for _ in range(12)] + [rng.integers(0, 4, size=n)]
    W = np.array([np.bincount(d, minlength=n) for d in draws], dtype=float)
    for metric in metrics:
        fast = stats.set_metric(units, metric, W)
        for row, index in enumerate(draws):
            slow = recompute(stats.resample_units(units, index), [metric])[metric]
            if slow is None:
                assert math.isnan(fast[row]), (metric, row)
            else:
                assert fast[row] == pytest.approx(slow, abs=1e-12), (metric, row)


def _auc_records(root, signal_b, seeds=(0, 1, 2), n=150, rng_seed=5):
    rng = np.random.default_rng(rng_seed)
    ids = [f"c{i}" for i in range(n)]
    y = (rng.random(n) < 0.4).astype(float)
    for seed in seeds:
        for enc, signal in (("a", 1.5), ("b", signal_b)):
            s = 1 / (1 + np.exp(-(signal * y + rng.normal(size=n))))
            metrics, units = cls_units("binary", ids, y[:, None], s[:, None], ["covid"], ["auc", "balanced_acc"],
                                       [0.5])
            write(root, enc, "cls/stoic", seed, metrics, units)
    return load_records(root)


def test_bootstrap_small_p_for_a_clear_difference_large_for_none(tmp_path):
    clear = _auc_records(tmp_path / "clear", signal_b=0.0)
    got = stats.compare(clear, "a", "b", protocol="cls/stoic", regime=1.0, metric="auc", n_boot=500, seed=0)
    assert got.unit == "case (bootstrap)" and got.n == 150 and got.seeds == (0, 1, 2)
    assert got.p == pytest.approx(2 / 501) and got.significant() and got.effect > 0.2
    agg = stats.aggregate(clear).set_index(["encoder", "metric"])
    assert got.effect == pytest.approx(agg.loc[("a", "auc"), "mean"] - agg.loc[("b", "auc"), "mean"])
    assert got.ci[0] < got.effect < got.ci[1]
    same = _auc_records(tmp_path / "same", signal_b=1.5)
    none = stats.compare(same, "a", "b", protocol="cls/stoic", regime=1.0, metric="auc", n_boot=500, seed=0)
    assert none.p > 0.3 and not none.significant()
    # seeded: the same seed gives the same answer, n_boot is honoured
    again = stats.compare(same, "a", "b", protocol="cls/stoic", regime=1.0, metric="auc", n_boot=500, seed=0)
    other = stats.compare(same, "a", "b", protocol="cls/stoic", regime=1.0, metric="auc", n_boot=500, seed=1)
    assert (again.p, again.ci) == (none.p, none.ci) and other.ci != none.ci
    assert "B=500" in none.test and none.min_p == pytest.approx(2 / 501)
    # balanced accuracy is set-level too
    assert stats.compare(clear, "a", "b", protocol="cls/stoic", regime=1.0, metric="balanced_acc",
                         n_boot=200).unit == "case (bootstrap)"


def test_bootstrap_survival_and_refusal_of_inconsistent_records(tmp_path):
    rng = np.random.default_rng(6)
    ids = [f"p{i}" for i in range(70)]
    t, e, r, h, hs = survival_data(rng, n=70, signal=2.0)
    for seed in range(2):
        for enc, risk in (("a", r), ("b", rng.normal(size=70))):
            metrics, units = survival_units(ids, t, e, risk, {"auc_2m": h}, {"auc_2m": 1 / (1 + np.exp(-risk))},
                                            ["c_index", "auc_2m"])
            write(tmp_path, enc, "prog/inspect-mortality", seed, metrics, units)
    frame = load_records(tmp_path)
    got = stats.compare(frame, "a", "b", protocol="prog/inspect-mortality", regime=1.0, metric="c_index", n_boot=300)
    assert got.unit == "case (bootstrap)" and got.effect > 0.1 and got.p < 0.05
    # a record whose metric does not follow from its units is refused
    bad = tmp_path / "bad"
    metrics, units = survival_units(ids, t, e, r, {"auc_2m": h}, {"auc_2m": hs}, ["c_index"])
    write(bad, "a", "prog/inspect-mortality", 0, {"c_index": metrics["c_index"] - 0.1}, units)
    write(bad, "b", "prog/inspect-mortality", 0, metrics, units)
    with pytest.raises(ValueError, match="the record says"):
        stats.compare(load_records(bad), "a", "b", protocol="prog/inspect-mortality", regime=1.0,
                      metric="c_index", n_boot=50)


def test_comparisons_refuse_demo_with_real(tmp_path):
    write(tmp_path, "a", "cls/stoic", 0, {"auc": 0.8}, synthetic=True)
    write(tmp_path, "b", "cls/stoic", 0, {"auc": 0.7}, synthetic=False)
    with pytest.raises(ValueError, match="demo"):
        stats.compare(load_records(tmp_path), "a", "b", protocol="cls/stoic", regime=1.0, metric="auc")


# ---------------------------------------------------------------------------
# Holm and best-other
# ---------------------------------------------------------------------------

def holm_reference(p):
    """Holm (1979) as written: step down, multiply the i-th smallest by (m - i + 1), keep monotone."""
    p = list(p)
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_holm_by_hand_and_reference():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, np.nan, 0.01]) == pytest.approx([0.5, np.nan, 0.02], nan_ok=True)
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        multipletests = None
    p = [0.001, 0.2, 0.013, 0.04, 0.04, 0.9]
    assert stats.holm(p) == pytest.approx(holm_reference(p))
    if multipletests is not None:
        assert stats.holm(p) == pytest.approx(multipletests(p, method="holm")[1])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_holm_matches_reference(p):
    assert stats.holm(p) == pytest.approx(holm_reference(p), abs=1e-12)


def test_best_other_compares_with_the_best_other_and_applies_holm(tmp_path):
    rng = np.random.default_rng(7)
    n = 60
    ids = [f"c{i}" for i in range(n)]
    base = rng.uniform(0.4, 0.8, size=n)
    for regime in (0.1, 1.0):
        for seed in range(2):
            for enc, gap in (("a", 0.08), ("b", 0.02), ("c", 0.0)):
                v = base + gap + 0.03 * rng.normal(size=n)
                write(tmp_path, enc, "seg/btcv", seed, {"dice": float(v.mean()), "hd95": float(10 - v.mean())},
                      {"kind": "case", "task": "segmentation", "ids": ids,
                       "per_case": {"dice": v.tolist(), "hd95": (10 - v).tolist()}}, regime=regime)
    frame = load_records(tmp_path)
    table = stats.best_other(frame, metrics=["dice", "hd95"])
    assert len(table) == 2 * 2 * 3
    by = table.set_index(["regime", "metric", "encoder"])
    assert by.loc[(1.0, "dice", "a"), "other"] == "b" and by.loc[(1.0, "dice", "b"), "other"] == "a"
    assert by.loc[(1.0, "hd95", "a"), "other"] == "b"  # lower is better: b has the lower mean after a
    assert by.loc[(1.0, "dice", "a"), "better"] and not by.loc[(1.0, "dice", "c"), "better"]
    assert by.loc[(1.0, "hd95", "a"), "better"]
    assert (table["unit"] == "case").all()
    assert table["p_adjusted"].to_numpy() == pytest.approx(stats.holm(table["p"].to_numpy()))
    assert (table["p_adjusted"] >= table["p"]).all()
    raw = stats.best_other(frame, metrics=["dice"], holm_correction=False)
    assert (raw["p_adjusted"] == raw["p"]).all()
    best = stats.best_other(frame, metrics=["dice"], only_best=True)
    assert list(best["encoder"]) == ["a", "a"] and best["significant"].all()
    one = stats.compare(frame, "a", "b", protocol="seg/btcv", regime=0.1, metric="dice")
    assert one.p == pytest.approx(by.loc[(0.1, "dice", "a"), "p"])


# ---------------------------------------------------------------------------
# across tasks
# ---------------------------------------------------------------------------

def settings_frame(means: dict[str, list[float]], metric_of=lambda i: "auc") -> pd.DataFrame:
    """One-seed records for many settings, as a frame (no files needed for seed means)."""
    rows = []
    for encoder, values in means.items():
        for i, v in enumerate(values):
            rows.append({"source": "run", "encoder": encoder, "protocol": f"cls/task{i // 3}", "family": "cls",
                         "regime": [0.01, 0.1, 1.0][i % 3], "seed": 0, "metric": metric_of(i), "value": v,
                         "status": "ok", "protocol_fingerprint": f"fp{i // 3}", "encoder_fingerprint": encoder,
                         "synthetic": True, "path": f"{encoder}/{i}.json", "units_path": None})
    return pd.DataFrame(rows)


def test_across_settings_ranks_and_critical_difference():
    rng = np.random.default_rng(8)
    n = 24
    base = rng.uniform(0.6, 0.9, size=n)
    means = {"asap": base + 0.03 + 0.01 * rng.normal(size=n), "ctclip": base + 0.01 * rng.normal(size=n),
             "merlin": base - 0.01 + 0.01 * rng.normal(size=n), "random": base - 0.15 + 0.01 * rng.normal(size=n),
             "m3d": base - 0.02 + 0.01 * rng.normal(size=n)}
    frame = settings_frame(means)
    got = stats.across_settings(frame, "asap", "ctclip")
    expected = sps.wilcoxon(means["asap"], means["ctclip"])
    assert got.unit == "setting" and got.n == n
    assert got.p == pytest.approx(expected.pvalue, rel=1e-12) and got.statistic == expected.statistic

    M = np.column_stack([means[e] for e in means])
    ranks = pd.Series(sps.rankdata(-M, axis=1).mean(axis=0), index=list(means)).sort_values()
    assert stats.mean_ranks(frame).to_dict() == pytest.approx(ranks.to_dict())

    cd = stats.critical_difference(frame)
    friedman = sps.friedmanchisquare(*M.T)
    assert cd.statistic == pytest.approx(friedman.statistic) and cd.p == pytest.approx(friedman.pvalue)
    q = sps.studentized_range.ppf(0.95, 5, np.inf) / np.sqrt(2)
    assert cd.q_alpha == pytest.approx(q) and round(q, 3) == 2.728  # Demšar (2006), Table 5
    assert cd.cd == pytest.approx(q * np.sqrt(5 * 6 / (6 * n)))
    assert cd.mean_ranks.index[0] == "asap" and cd.mean_ranks.index[-1] == "random"
    assert cd.different("asap", "random")
    for clique in cd.cliques:
        r = [cd.mean_ranks[e] for e in clique]
        assert max(r) - min(r) < cd.cd
    assert "random" not in {e for c in cd.cliques for e in c}


def test_across_settings_orients_lower_is_better():
    a = [1.0, 2.0, 3.0, 4.5, 5.0, 6.5]
    b = [1.5, 2.6, 3.2, 5.0, 5.9, 6.6]
    frame = settings_frame({"a": a, "b": b}, metric_of=lambda i: "hd95")
    got = stats.across_settings(frame, "a", "b")
    assert got.effect > 0  # a has the lower (better) hd95
    assert got.p == sps.wilcoxon(-np.array(a), -np.array(b)).pvalue
    a, b = np.array(a), np.array(b)
    assert got.effect == pytest.approx(np.mean((b - a) / ((a + b) / 2)))
    assert stats.across_settings(frame, "a", "b", scale="raw").effect == pytest.approx(np.mean(b - a))
    assert stats.mean_ranks(frame).to_dict() == {"a": 1.0, "b": 2.0}


MIXED_METRICS = ["auc", "dice", "hd95", "c_index"]


def mixed_units_means() -> dict[str, np.ndarray]:
    """a wins the fraction metrics by a little and loses HD95 by a few mm, over 24 settings."""
    rng = np.random.default_rng(16)
    base = rng.uniform(0.55, 0.9, size=24)
    hd95 = np.array([i % 4 == 2 for i in range(24)])
    base[hd95] = rng.uniform(8.0, 40.0, size=hd95.sum())
    gap = np.where(hd95, rng.uniform(1.0, 6.0, size=24), rng.uniform(0.004, 0.03, size=24))
    a = base + gap  # hd95 is lower-is-better: there a higher value loses
    return {"a": a, "b": base}


def rescaled(frame: pd.DataFrame, metric: str, factor: float) -> pd.DataFrame:
    out = frame.copy()
    out.loc[out["metric"] == metric, "value"] *= factor
    return out


def test_across_settings_does_not_depend_on_units():
    frame = settings_frame(mixed_units_means(), metric_of=lambda i: MIXED_METRICS[i % 4])
    in_mm = stats.across_settings(frame, "a", "b")
    in_m = stats.across_settings(rescaled(frame, "hd95", 1e-3), "a", "b")
    assert in_mm.n == in_m.n == 24 and in_mm.unit == "setting"
    assert in_m.p == pytest.approx(in_mm.p, rel=1e-12)
    assert in_m.effect == pytest.approx(in_mm.effect, rel=1e-12)
    raw_mm = stats.across_settings(frame, "a", "b", scale="raw")
    raw_m = stats.across_settings(rescaled(frame, "hd95", 1e-3), "a", "b", scale="raw")
    assert raw_m.p < 0.01 < 0.1 < raw_mm.p  # the raw scale moves with the unit: why it is not the default


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(MIXED_METRICS), st.floats(1e-6, 1e6), st.booleans())
def test_across_settings_rescaling_any_metric_or_flipping_a_sign_convention(metric, factor, flip):
    frame = settings_frame(mixed_units_means(), metric_of=lambda i: MIXED_METRICS[i % 4])
    frame.loc[frame["metric"] == "dice", "value"] = frame.loc[frame["metric"] == "dice", "value"].where(
        frame.loc[frame["metric"] == "dice", "protocol"] != "cls/task0", 0.0)  # a Dice of 0 on both sides
    frame.loc[(frame["metric"] == "auc") & (frame["encoder"] == "b") & (frame["protocol"] == "cls/task1"),
              "value"] = 0.0  # a value of 0 on one side only
    reference = stats.across_settings(frame, "a", "b")
    changed = rescaled(frame, metric, factor)
    if flip:  # the same distances given as negated values, higher is better
        hd = changed["metric"] == "hd95"
        changed.loc[hd, "value"] *= -1
        changed.loc[hd, "metric"] = "neg_hd95"
    got = stats.across_settings(changed, "a", "b")
    assert np.isfinite(reference.p) and reference.n == 24
    assert got.n == reference.n and got.statistic == pytest.approx(reference.statistic, rel=1e-9)
    assert got.p == pytest.approx(reference.p, rel=1e-9)
    assert got.effect == pytest.approx(reference.effect, rel=1e-9)


def test_cliques_by_hand():
    ranks = pd.Series({"a": 1.0, "b": 1.5, "c": 2.4, "d": 3.8, "e": 4.0})
    assert stats.cliques(ranks, 1.5) == [("a", "b", "c"), ("c", "d"), ("d", "e")]
    assert stats.cliques(ranks, 2.9) == [("a", "b", "c", "d"), ("b", "c", "d", "e")]
    assert stats.cliques(ranks, 0.3) == [("d", "e")]


# ---------------------------------------------------------------------------
# on the real linear probe's units
# ---------------------------------------------------------------------------

class _Features:
    def __init__(self, table):
        self.table = table

    def global_features(self, case_ids):
        return np.stack([self.table[c] for c in case_ids]).astype(np.float32)


def test_on_linear_probe_units(tmp_path):
    from asap_bench.data.manifest import load_manifest
    from asap_bench.splits import make_split
    from asap_bench.tasks.base import TaskInputs
    from asap_bench.tasks.linear_probe import LinearProbe

    rng = np.random.default_rng(9)
    rows = ctrate_rows(120, seed=3)
    labels = [c for c in rows[0] if c not in ("case_id", "patient_id", "image", "split")]
    good = {}
    for row in rows:
        y = np.array([row[c] for c in labels], dtype=float)
        good[row["case_id"]] = np.concatenate([y, np.zeros(4)]) + 0.6 * rng.normal(size=len(labels) + 4)
    noise = {c: rng.normal(size=len(labels) + 4) for c in good}
    write_table(tmp_path, "ct-rate", "volumes", rows)
    raw = get_protocol("cls/ct-rate").model_dump()
    raw["head"]["params"].update(C_grid=[1.0])
    protocol = Protocol.model_validate(raw)
    manifest = load_manifest(tmp_path, "ct-rate")
    for seed in range(2):
        split = make_split(manifest, protocol, seed)
        for enc, table in (("good", good), ("noise", noise)):
            result = LinearProbe().run(TaskInputs(protocol, manifest, split, 1.0, seed, features=_Features(table)))
            write(tmp_path / "runs", enc, "cls/ct-rate", seed, result.metrics, result.units)
    frame = load_records(tmp_path / "runs")
    auc = stats.compare(frame, "good", "noise", protocol="cls/ct-rate", regime=1.0, metric="auc")
    assert auc.unit == "label" and auc.effect > 0.1 and auc.significant()
    bacc = stats.compare(frame, "good", "noise", protocol="cls/ct-rate", regime=1.0, metric="balanced_acc",
                         n_boot=300)
    agg = stats.aggregate(frame).set_index(["encoder", "metric"])
    assert bacc.unit == "case (bootstrap)"
    assert bacc.effect == pytest.approx(agg.loc[("good", "balanced_acc"), "mean"]
                                        - agg.loc[("noise", "balanced_acc"), "mean"])
    assert bacc.significant()


def test_set_level_metrics_from_per_case_values_and_registered_ones(tmp_path):
    """recall@K is a mean of per-query hits; corpus BLEU is not, and must be registered to be bootstrapped."""
    rng = np.random.default_rng(10)
    ids = [f"q{i}" for i in range(200)]
    for seed in range(2):
        for enc, rate in (("a", 0.6), ("b", 0.3)):
            hits = (rng.random(200) < rate).astype(float)
            matches, total = rng.integers(0, 10, size=200), np.full(200, 10)
            units = {"kind": "case", "task": "report_test", "ids": ids,
                     "per_case": {"recall@5_v2r": hits.tolist(), "bleu1": (matches / total).tolist()},
                     "matches": matches.tolist(), "total": total.tolist()}
            write(tmp_path, enc, "ret/ct-rate", seed, {"recall@5_v2r": float(hits.mean()),
                                                       "bleu1": float(matches.sum() / total.sum()) + 0.01}, units)
    frame = load_records(tmp_path)
    got = stats.compare(frame, "a", "b", protocol="ret/ct-rate", regime=1.0, metric="recall@5_v2r", n_boot=300)
    assert got.unit == "case (bootstrap)" and got.significant() and got.effect > 0.2
    with pytest.raises(ValueError, match="register_set_metric"):
        stats.compare(frame, "a", "b", protocol="ret/ct-rate", regime=1.0, metric="bleu1", n_boot=50)

    def corpus(units, metric, W):
        if metric != "bleu1":
            return None
        m, t = np.asarray(units["matches"], float), np.asarray(units["total"], float)
        return (W @ m) / (W @ t) + 0.01

    stats.register_set_metric("report_test", corpus)
    try:
        ok = stats.compare(frame, "a", "b", protocol="ret/ct-rate", regime=1.0, metric="bleu1", n_boot=100)
        assert ok.unit == "case (bootstrap)" and math.isfinite(ok.p)
    finally:
        stats._SET_METRICS.pop("report_test")
