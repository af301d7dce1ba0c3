"""Segmentation family: whole-volume cache, UNETR around the encoder's ViT, training, resume, transfer."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from asap_bench.data.manifest import load_manifest
from asap_bench.data.seg_volumes import MaskMismatch, SegVolumeCache
from asap_bench.encoders.registry import family_class, get_card
from asap_bench.protocol import get_protocol
from asap_bench.results.recompute import recompute
from asap_bench.runner.local import effective_input, seed_everything
from asap_bench.splits import make_split, ratio_name
from asap_bench.tasks import segmentation as seg
from asap_bench.tasks.base import EncoderHandle, TaskInputs
from asap_bench.tasks.unetr import EncoderUNETR, scale_blocks, upsample_factors

FAST = {"demo_max_steps": 3, "demo_val_every": 3, "demo_checkpoint_every": 1, "demo_feature_size": 8}


def sized_card(name: str, spec):
    card = get_card(name)
    arch = card.architecture_for("demo")
    if "img_size" in arch:
        arch["img_size"] = list(spec.tensor_size())
    return card.model_copy(update={"architecture": arch})


def make_inputs(root: Path, work: Path, protocol_id: str, params: dict | None = None, encoder: str = "random",
                seed: int = 0, sizes: tuple[int, int, int] = (6, 1, 2), target_cases: int | None = None) -> TaskInputs:
    protocol = get_protocol(protocol_id)
    if params:
        head = protocol.head.model_copy(update={"params": {**protocol.head.params, **params}})
        protocol = protocol.model_copy(update={"head": head})
    manifest = load_manifest(root, protocol.data.dataset, protocol.data.table)
    split = make_split(manifest, protocol, seed)
    n_train, n_val, n_test = sizes
    train = split.train[:n_train]
    split = dataclasses.replace(split, train=train, val=split.val[:n_val], test=split.test[:n_test],
                                regimes={ratio_name(1.0): train})
    spec = effective_input(protocol, get_card(encoder), "demo").spec
    card = sized_card(encoder, spec)

    def build():
        seed_everything(seed)
        return family_class(card.family)(card, "native").train()

    target = None
    if protocol.transfer is not None:
        ref = protocol.transfer.target
        target = load_manifest(root, ref.dataset, ref.table)
        if target_cases is not None:
            target = dataclasses.replace(target, frame=target.frame.iloc[:target_cases])
    seed_everything(seed)
    return TaskInputs(protocol, manifest, split, 1.0, seed, target=target, log=logging.getLogger("test.seg"),
                      encoder=EncoderHandle(card, build), spec=spec, cache_dir=work / "cache",
                      work_dir=work / "job")


# ---------------------------------------------------------------- data

def test_whole_volumes_are_cached_unresized(demo_root, tmp_path):
    protocol = get_protocol("seg/segthor")
    manifest = load_manifest(demo_root, "segthor")
    native = effective_input(protocol, get_card("random"), "native").spec  # 1.5 x 1.5 x 3 mm, size 96 x 96 x 48
    cache = SegVolumeCache(manifest, native, tmp_path)
    case = manifest.frame.index[0]
    volume = cache.get(case)
    raw = nib.load(manifest.image_path(case))
    expected = [(n - 1) * z / s + 1 for n, z, s in zip(raw.shape, raw.header.get_zooms(), native.spacing)]
    assert list(volume.image.shape[1:]) == pytest.approx(expected, abs=1)  # resampled, not resized to 96x96x48
    assert volume.image.shape == volume.mask.shape
    assert volume.spacing == pytest.approx(native.spacing)
    assert set(np.unique(volume.mask)) <= {0, 1, 2, 3, 4}
    assert cache.path(case).is_file()
    again = SegVolumeCache(manifest, native, tmp_path).get(case)
    assert np.array_equal(again.image, volume.image)
    other = SegVolumeCache(manifest, native, tmp_path, label_map={2: 1})
    assert other.key != cache.key
    assert set(np.unique(other.get(case).mask)) <= {0, 1}


def _write(path: Path, shape, zooms) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.int16), np.diag([*zooms, 1.0])), path)
    return path


@pytest.mark.parametrize("mask_shape, mask_zooms, problem", [((16, 16, 9), (2.0, 2.0, 3.0), "shape"),
                                                             ((16, 16, 8), (2.0, 2.0, 2.5), "spacing")])
def test_mask_grid_mismatch_names_both_files(demo_root, tmp_path, mask_shape, mask_zooms, problem):
    manifest = load_manifest(demo_root, "msd-lung")
    case = manifest.frame.index[0]
    folder = tmp_path / "msd-lung"
    image = _write(folder / "images/x.nii.gz", (16, 16, 8), (2.0, 2.0, 3.0))
    mask = _write(folder / "masks/x.nii.gz", mask_shape, mask_zooms)
    frame = manifest.frame.iloc[:1].copy()
    frame.loc[case, "image"], frame.loc[case, "mask"] = "images/x.nii.gz", "masks/x.nii.gz"
    broken = dataclasses.replace(manifest, path=folder / "volumes.csv", frame=frame)
    spec = effective_input(get_protocol("seg/msd-lung"), get_card("random"), "demo").spec
    with pytest.raises(MaskMismatch, match=problem) as err:
        SegVolumeCache(broken, spec, tmp_path / "cache").get(case)
    assert str(image) in str(err.value) and str(mask) in str(err.value)


# ---------------------------------------------------------------- model

def test_upsampling_and_block_choice():
    assert upsample_factors((16, 16, 8)) == ((2, 2, 2), (2, 2, 1))
    assert upsample_factors((4, 16, 16)) == ((1, 2, 2), (4, 2, 2))
    assert upsample_factors((12, 12, 12)) == ((1, 1, 1), (12, 12, 12))
    assert scale_blocks([3, 6, 9, 12], 12) == [3, 6, 9, 12]
    assert scale_blocks([3, 6, 9, 12], 2) == [1, 1, 2, 2]
    assert scale_blocks([3, 6, 9, 12], 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="4 block numbers"):
        scale_blocks([1, 2], 12)


@pytest.mark.parametrize("name", ["random", "m3d-clip"])
def test_unetr_wraps_the_encoder(name):
    card = get_card(name)
    arch = card.architecture_for("demo")
    card = card.model_copy(update={"architecture": arch})
    torch.manual_seed(0)
    encoder = family_class(card.family)(card, "native")
    model = EncoderUNETR(encoder, 3, feature_size=4)
    assert model.encoder is encoder  # the encoder's own ViT and weights, not a copy
    x = torch.randn(1, 1, *arch["img_size"])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 3, *arch["img_size"])


def test_gradient_checkpointing_keeps_gradients():
    card = get_card("random")
    card = card.model_copy(update={"architecture": {**card.architecture_for("demo"), "img_size": [32, 32, 16]}})
    torch.manual_seed(0)
    plain = EncoderUNETR(family_class("vit3d")(card, "native"), 2, feature_size=4)
    checked = EncoderUNETR(family_class("vit3d")(card, "native"), 2, feature_size=4)
    checked.load_state_dict(plain.state_dict())
    assert checked.enable_gradient_checkpointing() == 2
    assert set(checked.state_dict()) == set(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 16)
    for model in (plain, checked):
        model(x).square().mean().backward()
    compared = 0
    for (name, a), b in zip(plain.named_parameters(), checked.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name
            compared += 1
    assert compared > 20


# ---------------------------------------------------------------- family

def test_cnn_encoder_is_not_applicable(demo_root, tmp_path):
    inputs = make_inputs(demo_root, tmp_path, "seg/msd-lung", encoder="merlin")
    result = seg.Segmentation().run(inputs)
    assert result.metrics == {"dice": None, "hd95": None, "nsd": None}
    assert "CNN" in result.notes["not_applicable"]


def test_unknown_head_param_is_an_error(demo_root, tmp_path):
    inputs = make_inputs(demo_root, tmp_path, "seg/msd-lung", params={"demo_max_stpes": 3})
    with pytest.raises(ValueError, match="max_stpes"):
        seg.Segmentation().run(inputs)


def test_a_zero_budget_scores_the_model_as_built_and_a_negative_one_is_refused(demo_root, tmp_path):
    built = seg.Segmentation().run(make_inputs(demo_root, tmp_path / "zero", "seg/luna16-lung",
                                               {"demo_max_steps": 0}, sizes=(2, 1, 1)))
    assert built.selected["steps"] == 0 and built.units["training"]["history"] == []
    assert built.metrics["dice"] is not None
    with pytest.raises(ValueError, match="max_steps must be a non-negative integer, got -1"):
        seg.Segmentation().run(make_inputs(demo_root, tmp_path / "neg", "seg/luna16-lung", {"demo_max_steps": -1}))


def inputs_test_ids(root: Path) -> list[str]:
    return make_inputs(root, Path("unused"), "seg/luna16-lung", FAST).split.test


class Killed(RuntimeError):
    pass


def test_masks_are_learnt_and_a_killed_job_resumes(demo_root, tmp_path, monkeypatch):
    full = seg.Segmentation().run(make_inputs(demo_root, tmp_path / "a", "seg/luna16-lung", FAST))
    # learnt: an empty prediction scores Dice 0 on every test case (each has lungs)
    assert full.metrics["dice"] > 0.3, full.metrics
    assert full.selected["steps"] == 3 and full.selected["best_step"] == 3
    assert "demo" in full.notes
    per_case = full.units["per_case"]
    assert full.units["ids"] == sorted(inputs_test_ids(demo_root))
    assert len(per_case["dice"]) == 2 and all(v is not None for v in per_case["hd95"])
    assert recompute(full.units, ["dice", "hd95", "nsd"]) == pytest.approx(full.metrics)

    original = seg.Trainer.save

    def save_then_die(self):
        original(self)
        if self.step == 2:
            raise Killed("killed after the step-2 checkpoint")

    inputs = make_inputs(demo_root, tmp_path / "b", "seg/luna16-lung", FAST)
    monkeypatch.setattr(seg.Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        seg.Segmentation().run(inputs)
    monkeypatch.setattr(seg.Trainer, "save", original)
    steps = []
    monkeypatch.setattr(seg.Trainer, "train_step", lambda self, step, _f=seg.Trainer.train_step: steps.append(step)
                        or _f(self, step))
    resumed = seg.Segmentation().run(make_inputs(demo_root, tmp_path / "b", "seg/luna16-lung", FAST))
    assert steps == [2]  # started at the last checkpoint, not from scratch
    assert "step 2" in resumed.notes["resumed"]
    for metric, value in full.metrics.items():
        assert resumed.metrics[metric] == pytest.approx(value, abs=1e-6), metric
    history, expected = resumed.units["training"]["history"], full.units["training"]["history"]
    assert len(history) == len(expected)
    for got, want in zip(history, expected):  # flat {step, loss, val_dice} entries
        assert got == pytest.approx(want)


def test_external_validation_scores_every_target_case(demo_root, tmp_path):
    inputs = make_inputs(demo_root, tmp_path, "ext/luna16-c19", {"demo_max_steps": 1, "demo_val_every": 1},
                         sizes=(3, 1, 1), target_cases=2)
    result = seg.Segmentation().run(inputs)
    assert result.units["ids"] == sorted(inputs.target.frame.index)
    assert result.sizes["scored"] == 2
    assert set(result.metrics) == {"dice", "hd95", "nsd"}
    # the target's lungs and infection (1, 2, 3) are all source lung (1)
    cache = SegVolumeCache(inputs.target, inputs.spec, inputs.cache_dir, label_map={1: 1, 2: 1, 3: 1})
    mask = cache.get(inputs.target.frame.index[0]).mask
    raw = nib.load(inputs.target.mask_path(inputs.target.frame.index[0])).get_fdata()
    assert mask.sum() == (raw > 0).sum()


# ---------------------------------------------------------------- one fit for a protocol and its external validation

def _budget(protocol_id: str, params: dict):
    from asap_bench.protocol import Protocol

    data = get_protocol(protocol_id).model_dump(mode="json")
    data["head"]["params"].update(params)
    return Protocol.model_validate(data)


def _run(root: Path, out: Path, protocols, cache: Path):
    from asap_bench.results.record import read_record, read_units
    from asap_bench.runner.jobs import expand
    from asap_bench.runner.local import RunOptions, run_jobs

    jobs = expand(["random"], protocols, [0], [1.0])
    outcomes = run_jobs(jobs, RunOptions(data_root=root, out=out, variant="demo", progress=False, cache_dir=cache),
                        logging.getLogger("test.seg"))
    assert [o.status for o in outcomes] == ["ok"] * len(jobs), [o.message for o in outcomes]
    records = {}
    for job in jobs:
        record = read_record(job.record_path(out))
        records[job.protocol.id] = (record, read_units(job.record_path(out), record))
    return records


TINY = {"demo_max_steps": 2, "demo_val_every": 2, "demo_feature_size": 8}


def test_an_external_validation_reuses_its_source_fit(demo_root, tmp_path, monkeypatch):
    fits = []
    monkeypatch.setattr(seg.Trainer, "fit", lambda self, _f=seg.Trainer.fit: fits.append(self.seed) or _f(self))
    source, ext = _budget("seg/luna16-lung", TINY), _budget("ext/luna16-c19", TINY)
    both = _run(demo_root, tmp_path / "both", [source, ext], tmp_path / "cache")
    assert len(fits) == 1, "one training for the protocol and its external validation"
    assert not (tmp_path / "both" / ".shared-fits").exists(), "the kept model is removed with the run"
    (s_record, s_units), (e_record, e_units) = both[source.id], both[ext.id]
    assert "reused" in e_record.notes["fit"] and "fit" not in s_record.notes
    assert e_units["training"] == s_units["training"] and e_record.selected == s_record.selected

    alone = _run(demo_root, tmp_path / "alone", [ext], tmp_path / "cache")[ext.id]  # trains its own, identically
    assert len(fits) == 2 and "fit" not in alone[0].notes
    for metric, value in alone[0].metrics.items():
        assert e_record.metrics[metric] == pytest.approx(value, abs=1e-6), metric


def test_a_planted_shared_fit_is_never_unpickled(demo_root, tmp_path, monkeypatch, caplog):
    import os
    import pickle

    from asap_bench.runner import local

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    monkeypatch.setattr(local, "fit_key", lambda *a, **k: "f" * 64)
    planted = tmp_path / "out" / local.SHARED_FITS / f"{'f' * 64}.pt"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(pickle.dumps(Payload()))
    fits = []
    monkeypatch.setattr(seg.Trainer, "fit", lambda self, _f=seg.Trainer.fit: fits.append(self.seed) or _f(self))
    with caplog.at_level(logging.WARNING):
        _run(demo_root, tmp_path / "out", [_budget("ext/luna16-c19", TINY), _budget("seg/luna16-lung", TINY)],
             tmp_path / "cache")
    assert not marker.exists()
    assert "ignoring kept model" in caplog.text and "training instead" in caplog.text
    assert len(fits) == 1, "the first job trains (the planted file is refused), the second reuses its fit"


@pytest.mark.parametrize("precision", ["bf16", "float32"])
def test_precision_sets_the_autocast_of_training_and_inference(demo_root, tmp_path, monkeypatch, precision):
    seen = []
    forward = EncoderUNETR.forward

    def spy(self, x):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, x)

    monkeypatch.setattr(EncoderUNETR, "forward", spy)
    params = {"demo_max_steps": 1, "demo_val_every": 1, "demo_feature_size": 8, "precision": precision}
    result = seg.Segmentation().run(make_inputs(demo_root, tmp_path, "seg/luna16-lung", params, sizes=(1, 1, 1)))
    assert seen and set(seen) == {precision == "bf16"}  # every forward: the training step, validation, test
    assert ("precision" in result.notes) == (precision == "bf16")
    assert result.metrics["dice"] is not None


def test_an_unknown_precision_is_refused_naming_the_field(demo_root, tmp_path):
    inputs = make_inputs(demo_root, tmp_path, "seg/luna16-lung", {"precision": "fp16"})
    with pytest.raises(ValueError, match=r"head.params precision must be one of \['bf16', 'float32'\], got 'fp16'"):
        seg.Segmentation().run(inputs)
