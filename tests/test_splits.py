"""Split and regime properties: grouping, nesting, coverage, determinism, reuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from asap_bench.data.manifest import load_manifest, label_matrix
from asap_bench.protocol import Protocol, get_protocol
from asap_bench.splits import SplitError, ensure_split, make_split, read_split, split_path

from conftest import ctrate_rows, write_table


def _protocol(**changes) -> Protocol:
    base = get_protocol("cls/ct-rate").model_dump()
    base.update(changes)
    return Protocol.model_validate(base)


def _patients(manifest, cases):
    return set(manifest.frame.loc[list(cases), "patient_id"])


def _check_invariants(manifest, protocol, split):
    parts = {"train": split.train, "val": split.val, "test": split.test}
    patients = {name: _patients(manifest, cases) for name, cases in parts.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    # every volume of a patient goes where the patient goes
    for name, cases in parts.items():
        whole = manifest.frame.index[manifest.frame["patient_id"].isin(patients[name])]
        assert set(whole) == set(cases), name
    # regimes are nested subsets of train, grouped by patient, and cover every label the pool has
    names = [repr(float(r)) for r in protocol.regimes]
    for small, large in zip(names, names[1:]):
        assert set(split.regimes[small]) <= set(split.regimes[large])
    assert set(split.regimes[names[-1]]) <= set(split.train)
    labels = label_matrix(manifest, protocol.data.target)
    pool_has = labels.loc[split.train].eq(1).any()
    for name in names:
        subset = split.regimes[name]
        whole = manifest.frame.index[manifest.frame["patient_id"].isin(_patients(manifest, subset))]
        assert set(whole) == set(subset)
        has = labels.loc[subset].eq(1).any()
        assert bool(has[pool_has].all()), f"regime {name} misses a label the pool has"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_patients=st.integers(20, 150), data_seed=st.integers(0, 10_000), run_seed=st.integers(0, 4),
       source=st.sampled_from(["official", "random"]))
def test_split_properties(tmp_path_factory, n_patients, data_seed, run_seed, source):
    root = tmp_path_factory.mktemp("m")
    write_table(root, "ct-rate", "volumes", ctrate_rows(n_patients, seed=data_seed, test_share=0.3))
    manifest = load_manifest(root, "ct-rate")
    split_rule = {"source": source, "val_fraction": 0.15, "seed": 3}
    if source == "random":
        split_rule["test_fraction"] = 0.25
    protocol = _protocol(split=split_rule)
    if source == "official" and not (manifest.frame["split"] == "test").any():
        with pytest.raises(SplitError, match="no test rows"):
            make_split(manifest, protocol, run_seed)
        return
    split = make_split(manifest, protocol, run_seed)
    _check_invariants(manifest, protocol, split)
    # same seed -> identical; test and val do not depend on the run seed
    again = make_split(manifest, protocol, run_seed)
    assert again == split
    other = make_split(manifest, protocol, run_seed + 1)
    assert (other.test, other.val, other.train) == (split.test, split.val, split.train)


def test_different_seeds_give_different_regimes(ctrate_root):
    manifest = load_manifest(ctrate_root, "ct-rate")
    protocol = get_protocol("cls/ct-rate")
    subsets = [tuple(make_split(manifest, protocol, seed).regimes["0.1"]) for seed in range(5)]
    assert len(set(subsets)) == 5


def test_regime_sizes_follow_ratios(tmp_path):
    write_table(tmp_path, "ct-rate", "volumes", ctrate_rows(600, seed=1))
    manifest = load_manifest(tmp_path, "ct-rate")
    split = make_split(manifest, get_protocol("cls/ct-rate"), 0)
    n_train = len(split.train)
    assert len(split.regimes["1.0"]) == n_train
    # 10 % holds about a tenth of the cases (whole patients, so allow a patient's worth)
    assert abs(len(split.regimes["0.1"]) - 0.1 * n_train) <= 3
    # 1 % is at least the coverage set, and small
    assert len(split.regimes["0.01"]) < 0.1 * n_train


def test_stratified_test_set_keeps_prevalence(tmp_path):
    write_table(tmp_path, "stoic", "volumes", [
        {"case_id": f"p{i}", "patient_id": f"p{i}", "image": f"images/p{i}.mha", "covid": int(i % 5 == 0),
         "severe": 0} for i in range(500)])
    manifest = load_manifest(tmp_path, "stoic")
    split = make_split(manifest, get_protocol("cls/stoic"), 0)
    test_rate = manifest.frame.loc[split.test, "covid"].astype(int).mean()
    assert abs(test_rate - 0.2) < 0.02
    assert len(split.test) == 100


def test_where_filter_and_unlabelled_rows_are_excluded(tmp_path):
    rows = [{"case_id": f"p{i}", "patient_id": f"p{i}", "image": "x.mha", "covid": i % 2,
             "severe": (i // 2) % 3 == 0 if i % 7 else None} for i in range(200)]
    write_table(tmp_path, "stoic", "volumes", rows)
    manifest = load_manifest(tmp_path, "stoic")
    protocol = get_protocol("prog/stoic-severity")
    split = make_split(manifest, protocol, 0)
    used = split.train + split.val + split.test
    assert (manifest.frame.loc[used, "covid"].astype(int) == 1).all()
    assert manifest.frame.loc[used, "severe"].notna().all()
    assert set(used) | set(split.excluded) == set(manifest.frame.index)


def test_official_split_with_patient_in_two_parts_is_refused(tmp_path):
    rows = ctrate_rows(30)
    rows[0]["split"], rows[0]["patient_id"] = "test", rows[-1]["patient_id"]
    rows[-1]["split"] = "train"
    write_table(tmp_path, "ct-rate", "volumes", rows)
    with pytest.raises(SplitError, match="more than one part"):
        make_split(load_manifest(tmp_path, "ct-rate"), get_protocol("cls/ct-rate"), 0)


def test_split_files_are_written_reused_and_checked(ctrate_root, tmp_path):
    manifest = load_manifest(ctrate_root, "ct-rate")
    protocol = get_protocol("cls/ct-rate")
    directory = tmp_path / "splits"
    split = ensure_split(manifest, protocol, 2, directory)
    path = split_path(directory, protocol, 2)
    assert path.name == "seed2.json" and path.parent.name == "cls__ct-rate"
    assert read_split(path) == split
    mtime = path.stat().st_mtime_ns
    assert ensure_split(manifest, protocol, 2, directory) == split
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert json.loads(path.read_text())["sha256"] == split.sha256

    # a hand-edited file is refused, naming the file
    payload = json.loads(path.read_text())
    payload["test"] = payload["test"][1:]
    path.write_text(json.dumps(payload))
    with pytest.raises(SplitError, match="seed2.json.*edited"):
        ensure_split(manifest, protocol, 2, directory)

    # a split made from another manifest is not silently reused
    ensure_split(manifest, protocol, 2, directory, force=True)
    write_table(ctrate_root, "ct-rate", "volumes", ctrate_rows(121))
    changed = load_manifest(ctrate_root, "ct-rate")
    with pytest.raises(SplitError, match="other inputs"):
        ensure_split(changed, protocol, 2, directory)


def test_external_target_is_all_test(tmp_path):
    write_table(tmp_path, "rspect", "volumes", [
        {"case_id": f"s{i}", "patient_id": f"s{i // 2}", "image": "x", "pe": i % 2} for i in range(40)])
    manifest = load_manifest(tmp_path, "rspect")
    protocol = _protocol(data={"dataset": "rspect", "table": "volumes", "target": "pe"},
                         split={"source": "none"})
    split = make_split(manifest, protocol, 0)
    assert len(split.test) == 40 and not split.train and not split.val and split.regimes == {}


def test_large_manifest_is_fast(tmp_path):
    import time

    write_table(tmp_path, "ct-rate", "volumes", ctrate_rows(20_000, max_volumes=3))
    manifest = load_manifest(tmp_path, "ct-rate")
    start = time.perf_counter()
    split = make_split(manifest, get_protocol("cls/ct-rate"), 0)
    assert time.perf_counter() - start < 20
    assert len(np.unique(split.regimes["0.01"])) > 0


def test_ext_protocol_uses_its_source_split_files(tmp_path):
    write_table(tmp_path, "msd-lung", "volumes", [
        {"case_id": f"lung_{i:03d}", "patient_id": f"lung_{i:03d}", "image": "x", "mask": "y"} for i in range(40)])
    manifest = load_manifest(tmp_path, "msd-lung")
    source, ext = get_protocol("seg/msd-lung"), get_protocol("ext/msd-rider")
    directory = tmp_path / "splits"
    assert ensure_split(manifest, ext, 1, directory) == ensure_split(manifest, source, 1, directory)
    assert split_path(directory, ext, 1) == split_path(directory, source, 1)
    assert len(list(directory.rglob("*.json"))) == 1
