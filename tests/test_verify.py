"""``datasets verify`` and data fingerprints on a prepared fixture root."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.data.adapters import prepare
from asap_bench.data.manifest import data_fingerprint, fingerprint_details, load_manifest
from asap_bench.data.verify import verify_root

from test_adapters import ct, nii, seg


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """MSD Task06 in its official layout, prepared into ``<tmp>/root``."""
    task = tmp_path / "raw" / "Task06_Lung"
    pairs = []
    for i in (1, 2, 3):
        nii(task / f"imagesTr/lung_{i:03d}.nii.gz", ct(i))
        nii(task / f"labelsTr/lung_{i:03d}.nii.gz", seg(seed=i))
        pairs.append({"image": f"./imagesTr/lung_{i:03d}.nii.gz", "label": f"./labelsTr/lung_{i:03d}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({"training": pairs}))
    root = tmp_path / "root"
    prepare("msd-lung", tmp_path / "raw", root)
    return root


def _problems(root: Path) -> list[str]:
    return [str(p) for p in verify_root(root).problems]


def test_clean_root_passes(prepared: Path):
    report = verify_root(prepared)
    assert report.ok and report.files == 6 and report.checked == {"msd-lung": {"volumes": 3}}
    result = CliRunner().invoke(main, ["datasets", "verify", str(prepared)])
    assert result.exit_code == 0, result.output
    assert "6 files read, 0 problem(s)" in result.output


def test_truncated_file_is_reported_by_path(prepared: Path):
    victim = prepared / "msd-lung" / "source" / "Task06_Lung" / "imagesTr" / "lung_002.nii.gz"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(main, ["datasets", "verify", str(prepared)])
    assert result.exit_code == 1
    assert f"problem: {victim}: image file cannot be read" in result.output
    assert "lung_001" not in result.output and "lung_003" not in result.output  # only the damaged file


def test_garbage_file_and_missing_file(prepared: Path):
    folder = prepared / "msd-lung" / "source" / "Task06_Lung"
    (folder / "labelsTr" / "lung_001.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 10))
    (folder / "imagesTr" / "lung_003.nii.gz").unlink()
    problems = _problems(prepared)
    assert any("labelsTr/lung_001.nii.gz: mask file cannot be read" in p for p in problems)
    assert any("imagesTr/lung_003.nii.gz: image file does not exist" in p for p in problems)


def test_mask_must_match_its_image(prepared: Path):
    labels = prepared / "msd-lung" / "source" / "Task06_Lung" / "labelsTr"
    nii(labels / "lung_001.nii.gz", seg(shape=(8, 7, 5)))  # one slice too many
    nii(labels / "lung_002.nii.gz", seg(seed=2), spacing=(1.0, 0.9, 2.5))  # different spacing
    nii(labels / "lung_003.nii.gz", seg(values=(1, 7), seed=3))  # a value the card does not declare
    problems = _problems(prepared)
    assert any("lung_001.nii.gz: mask shape (8, 7, 5) differs from its image (8, 7, 4)" in p for p in problems)
    assert any("lung_002.nii.gz: mask affine" in p for p in problems)
    assert any("lung_003.nii.gz: mask values [7] are not declared" in p for p in problems)


def test_bad_geometry_and_labels(prepared: Path, tmp_path: Path):
    images = prepared / "msd-lung" / "source" / "Task06_Lung" / "imagesTr"
    nii(images / "lung_001.nii.gz", ct(1), spacing=(0.8, 0.9, 0.0001))
    nii(images / "lung_002.nii.gz", np.zeros((8, 7), np.int16))
    problems = _problems(prepared)
    assert any("lung_001.nii.gz: voxel spacing" in p for p in problems)
    assert any("lung_002.nii.gz: shape" in p for p in problems)

    # labels out of range are reported with the table's path
    root = tmp_path / "stoic-root"
    (root / "stoic" / "images").mkdir(parents=True)
    nii(root / "stoic" / "images" / "a.nii.gz", ct(1))
    pd.DataFrame({"case_id": ["a"], "patient_id": ["a"], "image": ["images/a.nii.gz"], "covid": [2],
                  "severe": [0]}).to_csv(root / "stoic" / "volumes.csv", index=False)
    problems = _problems(root)
    assert any(p.startswith(str(root / "stoic" / "volumes.csv")) and "'covid'" in p for p in problems)


def test_fingerprint_is_location_independent_and_sensitive(prepared: Path, tmp_path: Path):
    manifest = load_manifest(prepared, "msd-lung")
    first = data_fingerprint(manifest)
    # the same data prepared elsewhere from a copy of the download gives the same fingerprint
    shutil.copytree(tmp_path / "raw", tmp_path / "elsewhere" / "raw")
    prepare("msd-lung", tmp_path / "elsewhere" / "raw", tmp_path / "elsewhere" / "root")
    assert data_fingerprint(load_manifest(tmp_path / "elsewhere" / "root", "msd-lung")) == first

    details = fingerprint_details(manifest)
    assert details["label_table_sha256"] == manifest.sha256 and len(details["files"]) == 6
    assert all(f["size"] > 0 and "sha256" not in f for f in details["files"])

    # same size, different bytes: only content hashing tells them apart
    victim = prepared / "msd-lung" / "source" / "Task06_Lung" / "imagesTr" / "lung_001.nii.gz"
    content = data_fingerprint(manifest, content=True)
    assert content != first
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert data_fingerprint(manifest) == first
    assert data_fingerprint(manifest, content=True) != content


def test_content_hashing_by_environment(prepared: Path, monkeypatch):
    manifest = load_manifest(prepared, "msd-lung")
    plain = data_fingerprint(manifest)
    monkeypatch.setenv("ASAP_BENCH_HASH_CONTENT", "1")
    assert data_fingerprint(manifest) == data_fingerprint(manifest, content=True) != plain
    assert all(len(f["sha256"]) == 64 for f in fingerprint_details(manifest)["files"])


def test_verify_json_and_unknown_root(tmp_path: Path, prepared: Path):
    result = CliRunner().invoke(main, ["datasets", "verify", str(prepared), "--json", "--content"])
    report = json.loads(result.output)
    assert report["ok"] and report["fingerprints"]["msd-lung"]["volumes"] == data_fingerprint(
        load_manifest(prepared, "msd-lung"), content=True)
    result = CliRunner().invoke(main, ["datasets", "verify", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "data root does not exist" in result.output


def test_prepare_command(tmp_path: Path):
    task = tmp_path / "raw" / "Task06_Lung"
    nii(task / "imagesTr/lung_001.nii.gz", ct(1))
    nii(task / "labelsTr/lung_001.nii.gz", seg())
    (task / "dataset.json").write_text(json.dumps({"training": [
        {"image": "./imagesTr/lung_001.nii.gz", "label": "./labelsTr/lung_001.nii.gz"}]}))
    result = CliRunner().invoke(main, ["datasets", "prepare", "msd-lung", "--source", str(tmp_path / "raw"),
                                       "--out", str(tmp_path / "root")])
    assert result.exit_code == 0, result.output
    assert "msd-lung/volumes.csv: 1 rows" in result.output
    result = CliRunner().invoke(main, ["datasets", "prepare", "ahph"])
    assert result.exit_code == 1 and "ahph/volumes.csv" in result.output
    result = CliRunner().invoke(main, ["datasets", "prepare", "luna16", "--source", str(tmp_path / "raw"),
                                       "--out", str(tmp_path / "root"), "--set", "oops"])
    assert result.exit_code == 1 and "KEY=VALUE" in result.output


def test_damaged_file_fails_only_its_own_volume_at_run_time(prepared: Path, tmp_path: Path):
    from asap_bench.data.cache import VolumeCache, VolumeError
    from asap_bench.encoders.card import InputSpec

    victim = prepared / "msd-lung" / "source" / "Task06_Lung" / "imagesTr" / "lung_002.nii.gz"
    victim.write_bytes(victim.read_bytes()[:200])
    manifest = load_manifest(prepared, "msd-lung")
    spec = InputSpec(spacing=None, intensity="hu_window", hu_window=(-1000, 1000), value_range=(-1, 1), size=(8, 8, 4))
    cache = VolumeCache(manifest, spec, root=tmp_path / "cache")
    assert cache.get(manifest.frame.loc["lung_001", "image"]).shape == (1, 8, 8, 4)
    with pytest.raises(VolumeError, match="lung_002.nii.gz: cannot be read"):
        cache.get(manifest.frame.loc["lung_002", "image"])
    assert cache.get(manifest.frame.loc["lung_003", "image"]).shape == (1, 8, 8, 4)


def test_prepared_root_runs_a_protocol_and_records_its_fingerprint(tmp_path: Path, monkeypatch):
    """A prepared (non-demo) root goes through the runner unchanged; the record carries its fingerprint."""
    from test_adapters import mha

    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "stoic2021-training"
    for pid in range(1, 25):
        mha(src / f"data/mha/{pid}.mha", ct(pid, (16, 16, 8)))
    (src / "metadata").mkdir()
    pd.DataFrame({"PatientID": range(1, 25), "probCOVID": [i % 2 for i in range(24)],
                  "probSevere": [int(i % 4 == 0) for i in range(24)]}).to_csv(src / "metadata/reference.csv", index=False)
    root, out = tmp_path / "root", tmp_path / "runs"
    prepare("stoic", src, root)
    result = CliRunner().invoke(main, ["run", "--encoder", "random", "--task", "cls/stoic", "--seeds", "1",
                                       "--ratios", "1", "--data-root", str(root), "--out", str(out),
                                       "--variant", "demo", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads(next(out.rglob("r1.0_s0.json")).read_text())
    assert record["status"] == "ok" and record["provenance"]["synthetic"] is False
    assert record["provenance"]["data_fingerprint"] == data_fingerprint(load_manifest(root, "stoic"))
