"""The synthetic demo cohort: complete, in the card format, deterministic, and learnable."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from asap_bench.data import demo
from asap_bench.data.cards import dataset_names, load_card
from asap_bench.data.manifest import load_manifest

TABLES = [(name, table) for name in dataset_names() for table in load_card(name).tables]


@pytest.fixture(scope="module")
def root(demo_root) -> Path:
    return demo_root


def frame(root: Path, dataset: str, table: str = "volumes") -> pd.DataFrame:
    return pd.read_csv(root / dataset / f"{table}.csv", dtype={"case_id": str, "patient_id": str, "split": str})


def tree_hashes(root: Path) -> dict[str, str]:
    """What the generator wrote; split files (``_splits/``) are written by runs on the shared cohort."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] != "_splits"}


# --------------------------------------------------------------------------- format

def test_marker_lists_every_dataset(root):
    marker = json.loads((root / "demo.json").read_text())
    assert marker["synthetic"] is True
    assert marker["generator_version"] == demo.GENERATOR_VERSION
    assert marker["seed"] == demo.SEED
    assert sorted(marker["datasets"]) == dataset_names() and len(marker["datasets"]) == 18
    for name, tables in marker["datasets"].items():
        assert set(tables) == set(load_card(name).tables)
        for table, n in tables.items():
            assert len(frame(root, name, table)) == n
    assert demo.is_demo_root(root)


@pytest.mark.parametrize("dataset,table", TABLES)
def test_table_matches_card(root, dataset, table):
    spec = load_card(dataset).table(table)
    f = frame(root, dataset, table)
    assert list(f.columns) == spec.columns()
    assert f["case_id"].is_unique and f["case_id"].notna().all() and f["patient_id"].notna().all()
    load_manifest(root, dataset, table)  # the reader every task uses accepts it
    if spec.official_split:
        assert set(f["split"]) <= {"train", "val", "test"} and {"train", "test"} <= set(f["split"])
        assert f.groupby("patient_id")["split"].nunique().max() == 1, "a patient spans two splits"
    for labels in spec.labels.values():
        allowed = set(range(len(labels.classes))) if labels.kind == "multiclass" else {0, 1}
        for column in labels.columns:
            assert set(f[column]) <= allowed, column
            assert f[column].nunique() == len(allowed), f"{column} lacks a class"
    if spec.survival is not None:
        for column, horizon in spec.survival.horizons.items():
            values = f[column]
            assert set(values.dropna()) <= {0, 1}
            expected = np.where(f["event"].eq(1) & f["time"].le(horizon), 1, np.where(f["time"].gt(horizon), 0, -1))
            assert (values.fillna(-1).to_numpy() == expected).all(), column


@pytest.mark.parametrize("dataset,table", TABLES)
def test_files_load_with_the_right_shape(root, dataset, table):
    spec = load_card(dataset).table(table)
    f = frame(root, dataset, table)
    shape = demo.PATCH if (dataset, table) == ("luna16", "candidates") else (64, 64, 32)
    allowed = set(spec.mask) | {0} if spec.mask else set()
    for _, row in f.iterrows():
        image = nib.load(root / dataset / row["image"])
        assert image.shape == shape and nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert image.get_data_dtype() == np.int16
        if spec.mask is not None:
            mask = nib.load(root / dataset / row["mask"])
            assert mask.shape == shape and np.allclose(mask.affine, image.affine)
            assert mask.get_data_dtype() == np.uint8
            values = set(np.unique(np.asarray(mask.dataobj)).tolist())
            assert values <= allowed and len(values) > 1, f"{row['case_id']}: mask values {values}"


def test_hu_ranges_are_ct_like(root):
    image = np.asarray(nib.load(root / "ct-rate" / frame(root, "ct-rate")["image"][0]).dataobj)
    assert image.min() <= -990 and 300 <= image.max() <= 3071  # air outside, bone inside
    acdc = np.asarray(nib.load(root / "acdc" / frame(root, "acdc", "frames")["image"][0]).dataobj)
    assert acdc.min() >= 0  # MRI magnitude, no HU


# --------------------------------------------------------------------------- build behaviour

def test_second_call_does_not_rebuild(root):
    marker, csv = root / "demo.json", root / "ct-rate" / "volumes.csv"
    before = (marker.stat().st_mtime_ns, csv.stat().st_mtime_ns)
    assert demo.build_demo(root) == root
    assert demo.ensure_demo(root) == root
    assert (marker.stat().st_mtime_ns, csv.stat().st_mtime_ns) == before


def test_two_builds_are_byte_identical(root, tmp_path):
    other = demo.build_demo(tmp_path / "again")
    assert tree_hashes(other) == tree_hashes(root)


def test_rendering_does_not_depend_on_the_worker_pool(root, tmp_path):
    """A scan rendered alone in this process gives the bytes the pooled build wrote."""
    scans = demo.PLANNERS["msd-lung"]()[:2] + demo.PLANNERS["acdc"]()[:1] + demo.PLANNERS["luna16"]()[:1]
    for scan in scans:
        rows, _ = demo.render_scan(scan, str(tmp_path))
        for _, row in rows:
            for column in ("image", "mask"):
                if column in row:
                    a = (tmp_path / scan.dataset / row[column]).read_bytes()
                    assert a == (root / scan.dataset / row[column]).read_bytes()


def test_gzip_headers_carry_no_time(root):
    path = root / "ct-rate" / frame(root, "ct-rate")["image"][0]
    header = path.read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\x00\x00\x00\x00"


def test_concurrent_builds_generate_once(tmp_path, monkeypatch):
    calls = []

    def fake_generate(folder: Path, workers: int = 1):
        calls.append(folder)
        time.sleep(0.3)
        (folder / "x").mkdir()
        return {"x": {"volumes": 0}}

    monkeypatch.setattr(demo, "generate", fake_generate)
    out = tmp_path / "cohort"
    threads = [threading.Thread(target=demo.build_demo, args=(out,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and demo.is_demo_root(out)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(folder: Path, workers: int = 1):
        (folder / "half").mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "generate", broken)
    with pytest.raises(RuntimeError):
        demo.build_demo(tmp_path / "cohort")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.lock"]


def test_refuses_to_overwrite_other_data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.csv").write_text("a\n")
    with pytest.raises(FileExistsError):
        demo.build_demo(tmp_path / "data", force=True)
    assert not demo.is_demo_root(tmp_path / "data")


def test_default_root(monkeypatch, tmp_path):
    version = f"demo-v{demo.GENERATOR_VERSION}"
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "c"))
    assert demo.default_demo_root() == tmp_path / "c" / version
    monkeypatch.delenv("ASAP_BENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.default_demo_root() == tmp_path / "x" / "asap-bench" / version
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.default_demo_root() == Path.home() / ".cache" / "asap-bench" / version


# --------------------------------------------------------------------------- content

def test_ct_rate_naming_and_reconstructions(root):
    f = frame(root, "ct-rate")
    parts = f["case_id"].str.extract(r"^(train|valid)_(\d+)_([ab])_([12])$")
    assert parts.notna().all().all()
    assert (f["patient_id"] == parts[0] + "_" + parts[1]).all()
    assert (f["split"] == parts[0].map({"train": "train", "valid": "test"})).all()
    assert 100 <= f["patient_id"].nunique() and f.groupby("patient_id").size().max() == 3
    labels = list(load_card("ct-rate").table("volumes").labels["abnormality"].columns)
    scan = f["case_id"].str[:-2]
    same = f.groupby(scan)[labels + ["findings"]].nunique().max()
    assert (same == 1).all(), "reconstructions of one scan must share labels and report"


def test_reports_describe_the_labels(root):
    """Report sentences follow the drawn findings; labels differ only by the label noise."""
    f = frame(root, "ct-rate")
    for label, positive in [("Pleural effusion", r"pleural effusion (?:measuring|up to)"),
                            ("Lung nodule", r"\d+ mm solid|solid pulmonary nodule"),
                            ("Cardiomegaly", r"heart is enlarged|Cardiomegaly is present")]:
        said = f["findings"].str.contains(positive, regex=True)
        agreement = (said.astype(int) == f[label]).mean()
        assert agreement > 0.95, (label, agreement)


def _body(volume: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(volume[:, :, z] > -500) for z in range(volume.shape[2])], axis=2)


def test_ct_rate_labels_are_learnable(root):
    f = frame(root, "ct-rate")
    metal, lucent = [], []
    for path in f["image"]:
        v = np.asarray(nib.load(root / "ct-rate" / path).dataobj)
        body = _body(v)
        metal.append(float((v > 2000).mean()))
        lucent.append(float(((v < -940) & body).sum() / body.sum()))
    assert roc_auc_score(f["Medical material"], metal) > 0.8
    assert roc_auc_score(f["Emphysema"], lucent) > 0.8


def test_covid_and_nodule_patterns_are_visible(root):
    stoic = frame(root, "stoic")
    ggo = []
    for path in stoic["image"]:
        v = np.asarray(nib.load(root / "stoic" / path).dataobj)
        ggo.append(float(((v > -650) & (v < -250)).mean()))
    assert roc_auc_score(stoic["covid"], ggo) > 0.8
    assert stoic.loc[stoic["covid"] == 1, "severe"].mean() > stoic.loc[stoic["covid"] == 0, "severe"].mean()


def test_inspect_events_follow_burden(root):
    f = frame(root, "inspect")
    assert 0.1 <= f["event"].mean() <= 0.25
    assert f.loc[f["pe"] == 1, "event"].mean() > 1.5 * f.loc[f["pe"] == 0, "event"].mean()
    assert f["case_id"].str.fullmatch(r"PE[0-9a-f]{8}").all()
    assert ((f["time"] >= 1) & (f["time"] <= 700)).all()


def test_luna_candidates(root):
    f = frame(root, "luna16", "candidates")
    assert 0.2 <= f["nodule"].mean() <= 0.4
    assert f["patient_id"].str.startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.").all()
    volumes = frame(root, "luna16", "volumes")
    assert set(volumes["patient_id"]) <= set(f["patient_id"])


def test_vqa_answers_and_paths(root):
    f = frame(root, "radgenome", "vqa")
    assert set(f["qa_type"]) == {"abnormality", "location", "size", "presence", "disorder"}
    assert all((root / "radgenome" / p).is_file() for p in f["image"].unique())
    ct = frame(root, "ct-rate").set_index("case_id")
    for _, row in f[f["qa_type"] == "presence"].iterrows():
        volume = re.sub(r"_q\d+$", "", row["case_id"])
        assert ct.loc[volume, "split"] == row["split"]
    sizes = f.loc[f["qa_type"] == "size", "answer"]
    assert sizes.str.fullmatch(r"\d+ mm").all()


def test_protocol_splits_hold_both_classes(root):
    """Every labelled protocol's test set and every regime subset can be scored on the demo."""
    from asap_bench.data.manifest import label_matrix, load_manifest
    from asap_bench.protocol import shipped_protocols
    from asap_bench.splits import make_split

    for protocol in shipped_protocols().values():
        if protocol.data.target is None:
            continue
        manifest = load_manifest(root, protocol.data.dataset, protocol.data.table)
        split = make_split(manifest, protocol, 0)
        labels = label_matrix(manifest, protocol.data.target)
        spec = manifest.table.labels[protocol.data.target]
        for part, cases in {"test": split.test, **split.regimes}.items():
            expected = spec.n_outputs if spec.kind == "multiclass" else 2
            for column in labels.columns:
                assert labels.loc[cases, column].nunique() == expected, (protocol.id, part, column)


def test_domain_shift_between_sites(root):
    """AHPH is read by another scanner: other voxel size and calibration (air is not -1000)."""
    def air_and_zooms(dataset: str):
        img = nib.load(root / dataset / frame(root, dataset)["image"][0])
        return float(np.asarray(img.dataobj)[:4, :4, :].mean()), img.header.get_zooms()

    (air_a, zoom_a), (air_b, zoom_b) = air_and_zooms("ct-rate"), air_and_zooms("ahph")
    assert zoom_a != zoom_b
    assert air_b > air_a + 15


def test_force_rebuild_replaces_in_place(tmp_path, monkeypatch):
    calls = []

    def fake_generate(folder: Path, workers: int = 1):
        calls.append(folder)
        (folder / "x.csv").write_text(str(len(calls)))
        return {"x": {"volumes": 0}}

    monkeypatch.setattr(demo, "generate", fake_generate)
    out = demo.build_demo(tmp_path / "cohort")
    demo.build_demo(out, force=True)
    assert len(calls) == 2 and (out / "x.csv").read_text() == "2" and demo.is_demo_root(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "cohort.lock"]


def _mask_counts(root: Path, dataset: str, table: str = "volumes") -> pd.DataFrame:
    f = frame(root, dataset, table)
    counts = [np.bincount(np.asarray(nib.load(root / dataset / m).dataobj).ravel(), minlength=4)
              for m in f["mask"]]
    return pd.DataFrame(counts, index=f["case_id"])


def test_rescans_and_cardiac_phases_are_consistent(root):
    """RIDER rescans show the same tumour; ACDC end-systole has the smaller LV cavity."""
    rider = _mask_counts(root, "rider")[1]
    first, second = rider.iloc[0::2].to_numpy(), rider.iloc[1::2].to_numpy()
    assert (np.abs(first - second) <= 0.35 * np.maximum(first, second)).all()
    acdc = _mask_counts(root, "acdc", "frames")[3]
    ed, es = acdc.iloc[0::2].to_numpy(), acdc.iloc[1::2].to_numpy()
    assert (es < ed).all()
