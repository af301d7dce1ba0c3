"""Caches know the files they were made from.

Each test starts from one real run (``cls/stoic``, one seed, ratio 1) on a small
prepared root, changes what the outside world can change (an image replaced,
truncated, filled with NaNs or deleted; a cache file truncated or garbled; a
full disk; an interrupt), runs again, and checks what the user needs: a changed
file gives new numbers, a broken one fails its jobs naming it, a damaged cache
entry is named and rebuilt, and nothing is served stale.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.data.cache import VolumeCache
from asap_bench.data.manifest import load_manifest
from asap_bench.data.seg_volumes import SegVolumeCache
from asap_bench.encoders.registry import get_card
from asap_bench.protocol import get_protocol
from asap_bench.runner import local
from asap_bench.runner.jobs import expand
from asap_bench.tasks import base
from conftest import write_table

TESTS = Path(__file__).parent
N_CASES = 16
KINDS = ("volumes", "seg-volumes", "features", "text")  # what a user can pass to `cache clear --kind`


def _image(seed: int, label: int) -> nib.Nifti1Image:
    """A small CT-like volume in HU whose mean follows the label (uncompressed: a rewrite keeps its size)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(-700 + 60 * label, 120, size=(16, 16, 8)).astype(np.float32)
    return nib.Nifti1Image(values, np.diag([2.0, 2.0, 3.0, 1.0]))


def _write_root(root: Path) -> None:
    rows = [{"case_id": f"p{i:02d}", "patient_id": f"p{i:02d}", "image": f"images/p{i:02d}.nii",
             "covid": i % 2, "severe": 0} for i in range(N_CASES)]
    write_table(root, "stoic", "volumes", rows)
    for i, row in enumerate(rows):
        path = root / "stoic" / row["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(_image(i, row["covid"]), path)


def _run(root: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["run", "--encoder", "random", "--task", "cls/stoic", "--seed-list", "0",
                                     "--ratios", "1", "--data-root", str(root), "--out", str(out),
                                     "--variant", "demo", "--quiet", *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.rglob("r*_s*.json")) if not p.name.endswith(".units.json")]


def _log(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "logs").glob("*.log")))


def _rows(world: Path, record: dict) -> dict[str, np.ndarray]:
    """The global features a record was computed from, by image."""
    folder = world / "cache" / "features" / record["provenance"]["feature_key"]
    images = json.loads((folder / "index.json").read_text())["images"]
    return dict(zip(images, np.load(folder / "global.npy")))


def _volume_files(world: Path) -> list[Path]:
    return [p for p in (world / "cache" / "volumes").rglob("*") if p.is_file() and p.name != "meta.json"]


def _temp_folders(world: Path) -> list[Path]:
    return list((world / "cache" / "features").glob(".*.tmp-*"))


def _setenv(mp: pytest.MonkeyPatch, cache: Path) -> None:
    mp.setenv("ASAP_BENCH_CACHE", str(cache))
    mp.delenv("ASAP_BENCH_HASH_CONTENT", raising=False)
    mp.setitem(base.FAMILIES, "cls", "families_for_tests:MeanDifference")
    mp.syspath_prepend(str(TESTS))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """One finished run: its data root, cache and records."""
    folder = tmp_path_factory.mktemp("integrity")
    with pytest.MonkeyPatch.context() as mp:
        _setenv(mp, folder / "cache")
        _write_root(folder / "data")
        result = _run(folder / "data", folder / "first")
        assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def world(baseline, tmp_path, monkeypatch) -> Path:
    """A private copy of the baseline (copies keep every file's size and mtime) and its environment."""
    for name in ("data", "cache", "first"):
        shutil.copytree(baseline / name, tmp_path / name)
    _setenv(monkeypatch, tmp_path / "cache")
    return tmp_path


def _victim(world: Path, index: int = 5) -> Path:
    manifest = load_manifest(world / "data", "stoic")
    return world / "data" / "stoic" / manifest.frame["image"].iloc[index]


# ---------------------------------------------------------------- inputs that change after caching

def test_unchanged_files_are_served_from_the_cache(world, monkeypatch):
    monkeypatch.setattr(local.Session, "module", lambda *a: pytest.fail("features were extracted again"))
    result = _run(world / "data", world / "second")
    assert result.exit_code == 0, result.output
    assert [r["metrics"] for r in _records(world / "second")] == [r["metrics"] for r in _records(world / "first")]


def test_replaced_image_gives_new_features_for_that_volume_only(world):
    victim = _victim(world)
    size = victim.stat().st_size
    nib.save(_image(1000, label=0), victim)  # another valid volume of the same size
    assert victim.stat().st_size == size
    volumes = len(_volume_files(world))
    result = _run(world / "data", world / "second")
    assert result.exit_code == 0, result.output
    (first,), (second,) = _records(world / "first"), _records(world / "second")
    assert second["status"] == "ok"
    assert second["provenance"]["feature_key"] != first["provenance"]["feature_key"]
    old, new = _rows(world, first), _rows(world, second)
    changed = [image for image in old if not np.array_equal(old[image], new[image])]
    assert changed == [str(victim.relative_to(victim.parents[1]))]
    assert len(_volume_files(world)) == volumes + 1  # only the changed volume was preprocessed again


def test_a_finished_job_reruns_when_an_input_file_is_rewritten_with_the_same_size(world):
    """Not only the caches: the record in the same --out is stale too, so the job is run again."""
    victim = _victim(world)
    size = victim.stat().st_size
    (first,) = _records(world / "first")
    nib.save(_image(1000, label=0), victim)
    assert victim.stat().st_size == size
    result = _run(world / "data", world / "first")
    assert result.exit_code == 0, result.output
    assert "1 ok" in result.output and "cached" not in result.output.split("\n\n")[-1], result.output
    (second,) = _records(world / "first")
    assert second["job_key"] != first["job_key"]
    assert second["provenance"]["feature_key"] != first["provenance"]["feature_key"]


def test_content_hashing_catches_a_replacement_that_kept_the_mtime(world, monkeypatch):
    monkeypatch.setenv("ASAP_BENCH_HASH_CONTENT", "1")
    assert _run(world / "data", world / "hashed").exit_code == 0
    victim = _victim(world)
    before = victim.stat()
    nib.save(_image(1000, label=0), victim)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    result = _run(world / "data", world / "second")
    assert result.exit_code == 0, result.output
    (first,), (second,) = _records(world / "hashed"), _records(world / "second")
    image = str(victim.relative_to(victim.parents[1]))
    assert not np.array_equal(_rows(world, first)[image], _rows(world, second)[image])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def _nans(path: Path) -> None:
    image = nib.load(path)
    values = np.asarray(image.dataobj, dtype=np.float32).copy()
    values[4:8, 4:8, 2:4] = np.nan
    nib.save(nib.Nifti1Image(values, image.affine, image.header), path)


@pytest.mark.parametrize("damage", [_truncate, _nans, Path.unlink], ids=["truncated", "nan", "deleted"])
def test_broken_or_missing_image_fails_its_jobs_naming_the_file(world, damage):
    victim = _victim(world)
    damage(victim)
    result = _run(world / "data", world / "second")
    assert result.exit_code == 1, result.output
    records = _records(world / "second")
    assert records and all(r["status"] == "failed" for r in records), [r["status"] for r in records]
    assert all(str(victim) in r["error"] for r in records), [r["error"] for r in records]


# ---------------------------------------------------------------- cache entries damaged on disk

def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40, len(data) - 8):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_text('{"images": [')


@pytest.mark.parametrize("name, damage", [("global.npy", _truncate), ("global.npy", _flip),
                                          ("index.json", _garbage), ("meta.json", _garbage)],
                         ids=["global-truncated", "global-garbled", "index-torn", "meta-torn"])
def test_damaged_feature_entry_is_named_rebuilt_and_gives_the_same_metrics(world, name, damage):
    (first,) = _records(world / "first")
    folder = world / "cache" / "features" / first["provenance"]["feature_key"]
    damage(folder / name)
    result = _run(world / "data", world / "second")
    assert result.exit_code == 0, result.output
    (second,) = _records(world / "second")
    assert second["status"] == "ok" and second["metrics"] == first["metrics"]
    warning = [line for line in _log(world / "second").splitlines() if "WARNING" in line]
    assert any(str(folder / name) in line and "rebuilding" in line for line in warning), warning
    # the rebuilt entry is whole: a third run is served from it
    third = _run(world / "data", world / "third")
    assert third.exit_code == 0 and "WARNING" not in _log(world / "third")


def _spec(protocol: str):
    return local.effective_input(get_protocol(protocol), get_card("random"), "demo").spec


def _stoic_volumes(world: Path) -> tuple[VolumeCache, str]:
    manifest = load_manifest(world / "data", "stoic")
    return VolumeCache(manifest, _spec("cls/stoic"), world / "cache"), manifest.frame["image"].iloc[0]


@pytest.fixture
def cache_log(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("asap_bench"), "propagate", True)  # a CLI run may have turned it off
    caplog.set_level(logging.WARNING)
    return caplog


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "garbled"])
def test_damaged_volume_file_is_named_and_rebuilt(world, cache_log, damage):
    cache, image = _stoic_volumes(world)
    path = cache.path(image)
    assert path.is_file()  # written by the first run
    good = cache.get(image)
    damage(path)
    again = cache.get(image)
    assert np.array_equal(again, good)
    assert str(path) in cache_log.text and "rebuilding" in cache_log.text
    cache_log.clear()
    assert np.array_equal(cache.get(image), good) and not cache_log.text  # the rebuilt file is whole


def _seg_root(root: Path, n: int = 2) -> Path:
    rows = [{"case_id": f"lung_{i}", "patient_id": f"lung_{i}", "image": f"images/lung_{i}.nii",
             "mask": f"masks/lung_{i}.nii"} for i in range(n)]
    write_table(root, "msd-lung", "volumes", rows)
    for i, row in enumerate(rows):
        image = _image(i, 1)
        for column, data in (("image", image.get_fdata(dtype=np.float32)),
                             ("mask", (image.get_fdata() > -300).astype(np.uint8))):
            path = root / "msd-lung" / row[column]
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, image.affine), path)
    return root


def test_segmentation_volumes_key_on_image_and_mask_and_check_their_files(tmp_path, cache_log):
    root = _seg_root(tmp_path / "data")
    spec = _spec("seg/msd-lung")
    manifest = load_manifest(root, "msd-lung")
    cache = SegVolumeCache(manifest, spec, tmp_path / "cache")
    assert cache.get("lung_0").mask.sum() > 0
    path = cache.path("lung_0")
    # a changed mask is a new entry: the cached one is never served for it
    mask = manifest.mask_path("lung_0")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.uint8), nib.load(mask).affine), mask)
    assert cache.path("lung_0") != path and cache.get("lung_0").mask.sum() == 0
    # a garbled entry is named and rebuilt
    again = cache.get("lung_1")
    _flip(cache.path("lung_1"))
    rebuilt = SegVolumeCache(manifest, spec, tmp_path / "cache").get("lung_1")
    assert str(cache.path("lung_1")) in cache_log.text and "rebuilding" in cache_log.text
    assert np.array_equal(again.image, rebuilt.image) and np.array_equal(again.mask, rebuilt.mask)


def test_text_embeddings_are_checked_and_rebuilt(tmp_path, cache_log, one_thread):
    from asap_bench.data.text_cache import embed_texts
    from asap_bench.encoders.text import OFFLINE_MINILM

    texts = ["No effusion.", "Cardiomegaly."]
    first, _ = embed_texts(OFFLINE_MINILM, texts, pooling="mean", max_length=32, root=tmp_path)
    (array,) = (tmp_path / "text").glob("*/embeddings.npy")
    _flip(array)
    again, _ = embed_texts(OFFLINE_MINILM, texts, pooling="mean", max_length=32, root=tmp_path)
    assert np.array_equal(first, again)
    assert str(array) in cache_log.text and "rebuilding" in cache_log.text


# ---------------------------------------------------------------- listing, clearing, atomic meta

def test_cache_ls_and_clear_cover_every_kind_and_survive_torn_entries(world):
    seg = load_manifest(_seg_root(world / "seg"), "msd-lung")
    SegVolumeCache(seg, _spec("seg/msd-lung"), world / "cache").get("lung_0")
    cache = world / "cache"
    (cache / "text" / "torn").mkdir(parents=True)
    (cache / "text" / "torn" / "meta.json").write_text('{"kind": "te')
    (cache / "features" / "empty").mkdir()
    (cache / "features" / "empty" / "meta.json").write_text("")
    (cache / "volumes" / "nometa").mkdir()
    (cache / "volumes" / "nometa" / "x.npz").write_bytes(b"123")
    (first,) = _records(world / "first")
    (cache / "features" / first["provenance"]["feature_key"] / "global.npy").unlink()
    listed = CliRunner().invoke(main, ["cache", "ls"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert sum("seg-volumes" in line for line in lines) == 1
    assert sum("damaged:" in line for line in lines) == 4, listed.output
    assert "6 entries" in listed.output
    for kind in KINDS:
        cleared = CliRunner().invoke(main, ["cache", "clear", "--kind", kind])
        assert cleared.exit_code == 0, cleared.output
        assert not [p for p in (cache / kind).iterdir() if not p.name.startswith(".")], kind
    assert "0 entries" in CliRunner().invoke(main, ["cache", "ls"]).output


class _DiskFull:
    """A file whose writes fail with ENOSPC, after half the bytes of a write that ``matches``, as a full disk does."""

    def __init__(self, handle, matches):
        self._handle, self._matches = handle, matches

    def write(self, data):
        if self._matches(data):
            self._handle.write(data[:len(data) // 2])
            self._handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _fill_disk(monkeypatch, matches=lambda data: True) -> None:
    real = io.open

    def opener(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        return _DiskFull(handle, matches) if any(c in mode for c in "wax+") else handle

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr("builtins.open", opener)


def test_meta_is_written_whole_or_not_at_all(world, monkeypatch):
    cache, image = _stoic_volumes(world)
    shutil.rmtree(cache.folder)
    _fill_disk(monkeypatch, lambda data: (b'"kind"' if isinstance(data, bytes) else '"kind"') in data)
    with pytest.raises(OSError):
        cache.get(image)
    monkeypatch.undo()
    meta = cache.folder / "meta.json"
    assert not meta.exists() or json.loads(meta.read_text())["kind"] == "volumes"
    assert not [p for p in cache.folder.iterdir() if p.name.startswith(".")]


def test_full_disk_on_a_volume_names_the_file_and_leaves_nothing(world, monkeypatch):
    cache, image = _stoic_volumes(world)
    path = cache.path(image)
    path.unlink()
    _fill_disk(monkeypatch)
    with pytest.raises(OSError) as error:
        cache.get(image)
    monkeypatch.undo()
    assert str(path) in str(error.value) and "no space left on device" in str(error.value)
    assert not path.exists() and not [p for p in cache.folder.iterdir() if p.name.startswith(".")]


def test_full_disk_for_features_fails_the_job_clearly_and_the_run_goes_on(world, monkeypatch):
    (first,) = _records(world / "first")
    shutil.rmtree(world / "cache" / "features" / first["provenance"]["feature_key"])

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    result = _run(world / "data", world / "second")
    assert result.exit_code == 1, result.output
    assert "1 failed" in result.output  # the run finished and summed up
    (record,) = _records(world / "second")
    assert record["status"] == "failed"
    error = record["error"].splitlines()[0]
    assert "global.npy: no space left on device to store" in error and "bytes of features" in error, error
    assert not _temp_folders(world)


# ---------------------------------------------------------------- temp folders of failed extractions

def test_failed_extraction_removes_its_temp_folder_and_names_the_file(world):
    victim = _victim(world, index=2)  # batches of 2: the second batch
    _truncate(victim)
    result = _run(world / "data", world / "second")
    assert result.exit_code == 1
    (record,) = _records(world / "second")
    assert record["status"] == "failed" and str(victim) in record["error"]
    assert not _temp_folders(world)


@pytest.mark.parametrize("error", [RuntimeError("forward failed on batch 2"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_extraction_stopped_in_the_forward_removes_its_temp_folder(world, monkeypatch, error):
    (first,) = _records(world / "first")
    shutil.rmtree(world / "cache" / "features" / first["provenance"]["feature_key"])
    calls = []
    real = local.frozen_forward

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "frozen_forward", forward)
    options = local.RunOptions(data_root=world / "data", out=world / "second", variant="demo",
                               cache_dir=world / "cache", progress=False)
    jobs = expand(["random"], [get_protocol("cls/stoic")], seeds=[0], ratios=[1.0])
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):  # an interrupt stops the run, after the clean-up
            local.run_jobs(jobs, options, logging.getLogger("test.interrupt"))
    else:
        (outcome,) = local.run_jobs(jobs, options, logging.getLogger("test.interrupt"))
        assert outcome.status == "failed" and "forward failed on batch 2" in outcome.message
    assert len(calls) == 2 and not _temp_folders(world)
