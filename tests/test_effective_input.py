"""The effective input of an (encoder, protocol, variant) is valid by construction.

A protocol's paper input (224x224x112) does not tile into every published
encoder's patches. Each card says how it is fitted (``paper_input.fit``); the
runner pads, crops or rebuilds the patch embedding exactly as declared, checks
every pair before any model is made, records the adaptation in provenance and
the job key, and resamples a learned position table from the checkpoint
tensor's own grid. Encoders are built as the runner builds them (``Session``),
at full size on the ``meta`` device where no weights are needed, and with small
widths but the published geometry where a checkpoint must really load.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.data.transforms import build_preprocessing
from asap_bench.encoders.card import Checkpoint, EncoderCard, InputSpec
from asap_bench.encoders.checkpoints import CheckpointError, load_weights
from asap_bench.encoders.registry import (
    build_encoder,
    forget_card,
    get_card,
    register_card,
)
from asap_bench.encoders.vit3d import simcrop_sincos_table
from asap_bench.protocol import get_protocol
from asap_bench.resources import resource_dir
from asap_bench.results.record import read_record
from asap_bench.runner import local
from asap_bench.runner.jobs import Job
from asap_bench.tasks.base import get_family

LOG = logging.getLogger("test.effective_input")


@pytest.fixture
def registered():
    """Register card copies for one test; forget them afterwards."""
    names: list[str] = []

    def add(card: EncoderCard) -> str:
        names.append(register_card(card).name)
        return card.name

    yield add
    for name in names:
        forget_card(name)


def unweighted(name: str) -> EncoderCard:
    """The shipped card without a checkpoint (nothing to download), under its own name."""
    card = get_card(name)
    return card.model_copy(update={"name": f"{name}-unweighted", "group": "random",
                                   "checkpoint": Checkpoint(availability="none")})


def narrow(name: str, **arch) -> EncoderCard:
    """The shipped card at its published geometry (sizes, patches, grids) with a small width and depth."""
    card = get_card(name)
    width = {"embed_dim": 48, "depth": 1, "num_heads": 2, **arch}
    return card.model_copy(update={"name": f"{name}-narrow", "embed_dim": width["embed_dim"],
                                   "architecture": {**card.architecture, **width}})


def session(root: Path, tmp_path: Path, **options) -> local.Session:
    opts = local.RunOptions(data_root=root, out=tmp_path / "runs", splits_dir=tmp_path / "splits",
                            cache_dir=tmp_path / "cache", progress=False, **options)
    return local.Session(opts, LOG)


def group(sess: local.Session, encoder: str, protocol_id: str) -> local.Group:
    protocol = get_protocol(protocol_id)
    return sess.group(encoder, protocol, get_family(protocol))


# --- the paper input reaches every voxel of every encoder ---------------------------------


@pytest.mark.parametrize("name, fitted", [
    ("ct-clip", (120, 240, 240)),     # DHW, patch 10x20x20: 112 % 10 made CTViT raise (EinopsError)
    ("hlip", (112, 240, 240)),        # DWH, patch 8x24x24: 224 % 24 = 8 voxels lost per axis
    ("hi-end-mae", (228, 228, 120)),  # HWD, patch 12^3: 224 % 12 and 112 % 12 voxels lost
])
def test_paper_input_is_padded_to_the_patch_grid_never_cropped(name, fitted, demo_root, tmp_path, registered):
    encoder = registered(unweighted(name))
    sess = session(demo_root, tmp_path, device="meta")
    g = group(sess, encoder, "cls/stoic")
    size = tuple(g.spec.tensor_size())
    assert size == fitted
    paper = dict(zip("HWD", g.spec.size))
    assert all(s >= paper[a] for s, a in zip(size, g.spec.axis_order))  # padded, never cropped
    assert g.input_fit.startswith("pad ") and f"-> {'x'.join(map(str, fitted))}" in g.input_fit
    with torch.device("meta"):
        module = sess.build(g.encoder)
        out = module(torch.empty(1, 1, *size))
    patch = module.arch["patch_size"]
    assert tuple(gr * p for gr, p in zip(out.grid, patch)) == size  # every voxel reaches a token
    assert out.patch_tokens.shape[1] == math.prod(out.grid)


def test_a_pair_that_does_not_fit_refuses_the_run_before_any_job(demo_root, tmp_path):
    raw = yaml.safe_load((resource_dir("baselines") / "ct-clip.yaml").read_text())
    raw["name"], raw["paper_input"]["fit"] = "ct-clip-unfitted", "none"
    card = tmp_path / "ct-clip-unfitted.yaml"
    card.write_text(yaml.safe_dump(raw))
    out = tmp_path / "runs"
    try:
        result = CliRunner().invoke(main, ["run", "--encoder", str(card), "--task", "cls/stoic,cls/luna16",
                                           "--seed-list", "0", "--data-root", str(demo_root), "--out", str(out),
                                           "--variant", "native", "--quiet"])
    finally:
        forget_card("ct-clip-unfitted")
    assert result.exit_code == 1, result.output
    for protocol in ("cls/stoic", "cls/luna16"):
        assert (f"ct-clip-unfitted {protocol}: input 112x224x224 (DHW) is not divisible by patch 10x20x20; "
                "declare paper_input.fit in the card") in result.output
    assert not (out / "ct-clip-unfitted").exists()  # no job started, no record written


# --- position tables -------------------------------------------------------------------


def test_interpolate_pos_takes_the_source_grid_from_the_checkpoint(demo_root, tmp_path, registered):
    """fVLM's learned 7x16x11 table, resampled to the 7x14x7 grid of 112x224x224 (DWH)."""
    encoder = registered(narrow("fvlm"))
    torch.manual_seed(0)
    published = build_encoder(get_card(encoder), "native")
    state = published.state_dict()
    path = tmp_path / "fvlm.pth"
    torch.save({"model": {f"visual_encoder.{k}": v for k, v in state.items()}, "epoch": 3}, path)

    sess = session(demo_root, tmp_path, checkpoint=path, interpolate_pos=True)
    g = group(sess, encoder, "cls/stoic")
    module = sess.build(g.encoder)
    table = state["patch_embedding.position_embeddings"]
    expected = F.interpolate(table.transpose(1, 2).reshape(1, 48, 7, 16, 11), size=(7, 14, 7), mode="trilinear",
                             align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(module.patch_embedding.position_embeddings, expected)
    assert torch.equal(module.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    with torch.no_grad():
        assert module(torch.zeros(1, 1, *g.spec.tensor_size())).grid == (7, 14, 7)
    assert "resampled from the checkpoint (--interpolate-pos)" in g.input_fit

    refused = session(demo_root, tmp_path, checkpoint=path)  # no --interpolate-pos: refused before any model
    with pytest.raises(local.InputMismatch, match=r"7x16x11 token grid .* 7x14x7 .* --interpolate-pos"):
        group(refused, encoder, "cls/stoic")
    jobs = [Job(encoder, get_protocol("cls/stoic"), 1.0, 0)]
    with pytest.raises(local.InputMismatch, match=f"{encoder} cls/stoic: position table is learned"):
        local.run_jobs(jobs, refused.options, LOG)


def test_m3d_is_rebuilt_with_patch_8x16x16_and_its_embeddings_are_not_loaded(demo_root, tmp_path, registered):
    """The ASAP benchmark's M3D: patch 16x16x8 (HWD), qkv_bias, checkpoint patch and position embeddings dropped."""
    encoder = registered(narrow("m3d-clip"))
    torch.manual_seed(0)
    published = build_encoder(get_card(encoder), "native")  # patch 4x16x16, no qkv bias, 2048 tokens
    state = published.state_dict()
    path = tmp_path / "pretrained_ViT.bin"
    torch.save(state, path)

    sess = session(demo_root, tmp_path, checkpoint=path)  # no --interpolate-pos needed: nothing is resampled
    g = group(sess, encoder, "cls/stoic")
    module = sess.build(g.encoder)
    assert module.arch["patch_size"] == [8, 16, 16] and module.grid == (14, 14, 14)
    report = load_weights(module, path)
    assert sorted(k.split(":")[0] for k in report.rebuilt) == [
        "patch_embedding.patch_embeddings.1.bias", "patch_embedding.patch_embeddings.1.weight",
        "patch_embedding.position_embeddings"]
    assert report.missing == ["blocks.0.attn.qkv.bias"] and report.unexpected == [] and report.fraction > 0.99
    assert "rebuilt (3)" in report.summary()
    assert module.patch_embedding.position_embeddings.shape == (1, 2744, 48)
    assert torch.equal(module.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert g.input_fit.startswith("rebuild_patch_embed: patch_size 4x16x16 -> 8x16x16, qkv_bias false -> true (DHW)")
    with torch.no_grad():
        assert module(torch.zeros(1, 1, *g.spec.tensor_size())).patch_tokens.shape == (1, 2744, 48)


def test_a_fixed_sincos_table_is_rebuilt_for_another_grid(demo_root, tmp_path, registered):
    """ASAP's checkpoint table is on 14x14x14; the 96x96x48 segmentation crops need 6x6x6, rebuilt, not resampled."""
    encoder = registered(narrow("asap"))
    torch.manual_seed(0)
    state = build_encoder(get_card(encoder), "native").state_dict()
    path = tmp_path / "asap.pth"
    torch.save({"model": state}, path)
    sess = session(demo_root, tmp_path, checkpoint=path)
    g = group(sess, encoder, "seg/msd-lung")
    module = sess.build(g.encoder)
    assert torch.equal(module.pos_embed[0, 1:], simcrop_sincos_table((6, 6, 6), 48))
    assert torch.equal(module.cls_token, state["cls_token"])
    assert load_weights(module, path).rebuilt == ["pos_embed: checkpoint [1, 2745, 48] not loaded, module [1, 217, 48]"]
    assert g.input_fit.endswith("position table 14x14x14 -> 6x6x6: fixed table rebuilt for the grid")


def test_a_token_count_that_fits_two_published_grids_is_refused(registered):
    card = get_card("asap")
    two = card.model_copy(update={"name": "asap-two-grids", "sizes": {
        **card.sizes, "flat": {**card.sizes["demo"], "img_size": [128, 32, 32]}}})  # 8x2x4 = 64 = demo's 4x4x4
    module = build_encoder(two, "flat")
    other = torch.zeros(1, 1 + 64, 48)
    with pytest.raises(CheckpointError, match=r"64 tokens fits several grids \(4x4x4 \(demo\), 8x2x4 \(flat\)\)"):
        module.adapt_tensor("pos_embed", other, torch.Size([1, 1 + 27, 48]))


# --- the preprocessing pads image and mask alike ------------------------------------------


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    return path


def test_fit_pads_image_and_mask_around_the_volume_in_the_encoders_axis_order(tmp_path):
    rng = np.random.default_rng(0)
    image = _nifti(tmp_path / "ct.nii.gz", rng.uniform(-1000, 1000, (20, 18, 10)).astype(np.float32))
    mask = _nifti(tmp_path / "mask.nii.gz", (rng.random((20, 18, 10)) > 0.5).astype(np.uint8))
    spec = InputSpec(spacing=None, orientation=None, intensity="hu_window", hu_window=(-1000, 1000),
                     value_range=(-1, 1), size=(20, 18, 10), resize="crop_or_pad", axis_order="DWH")
    plain = build_preprocessing(spec, with_mask=True)({"image": str(image), "mask": str(mask)})
    fitted = spec.model_copy(update={"fit_size": (24, 24, 12)})
    out = build_preprocessing(fitted, with_mask=True)({"image": str(image), "mask": str(mask)})
    assert fitted.tensor_size() == (12, 24, 24)
    assert tuple(out["image"].shape) == (1, 12, 24, 24) and tuple(out["mask"].shape) == (1, 12, 24, 24)
    inner = (slice(None), slice(1, 11), slice(3, 21), slice(2, 22))  # centred: nothing of the volume is lost
    assert torch.equal(out["image"][inner], plain["image"]) and torch.equal(out["mask"][inner], plain["mask"])
    border = torch.ones_like(out["mask"], dtype=torch.bool)
    border[inner] = False
    assert (out["image"][border] == -1).all() and (out["mask"][border] == 0).all()
    whole = build_preprocessing(fitted, with_mask=True, whole_volume=True)({"image": str(image), "mask": str(mask)})
    assert tuple(whole["image"].shape) == (1, 10, 18, 20)  # segmentation keeps the whole volume; its ROI is the fit


def test_crop_fit_is_declared_and_centred(registered):
    card = get_card("hi-end-mae")
    cropped = card.model_copy(update={"name": "hi-end-mae-cropped", "paper_input": card.paper_input.model_copy(
        update={"fit": "crop"})})
    effective = local.effective_input(get_protocol("cls/stoic"), cropped, "native")
    assert effective.spec.tensor_size() == (216, 216, 108)
    assert effective.description == "crop 224x224x112 -> 216x216x108 (HWD) for patch 12x12x12"
    assert effective.card.architecture_for(effective.variant)["img_size"] == [216, 216, 108]
    assert effective.card.architecture == card.architecture  # the published sizes stay as they are


# --- end to end: published layouts through the CLI, and the adaptation in the job key ---------


def _published_layout(name: str, state: dict[str, torch.Tensor]) -> dict:
    """``state`` (module keys) saved as each encoder's own code saves it, key names spelled out by hand."""
    if name == "hi-end-mae":
        return {"state_dict": {("module.encoder_pos_embed" if k == "pos_embed" else f"module.encoder.{k}"): v
                               for k, v in state.items()}}
    if name == "hlip":
        return {"state_dict": {f"module.visual.trunk.{k}": v for k, v in state.items()}, "epoch": 1}
    if name == "m3d-clip":
        return dict(state)  # pretrained_ViT.bin: the ViT's own keys
    if name == "fvlm":
        return {"model": {f"visual_encoder.{k}": v for k, v in state.items()}}
    if name == "ct-clip":
        return {f"visual_transformer.{k}": v for k, v in state.items()}
    if name == "merlin":
        return {f"encode_image.i3_resnet.{k}": v for k, v in state.items()}
    if name == "visd-boost-layout":
        return {"model": {f"visual_encoder.res_model.{k}": v for k, v in state.items()}}
    if name == "pcrlv2":
        return {"state_dict": dict(state)}
    if name == "asap":  # Pre-training-ASAP's save_model: the weights, the optimizer, the epoch and its args
        return {"model": dict(state), "optimizer": {}, "epoch": 99, "scaler": None,
                "args": argparse.Namespace(mask_ratio=0.75, lr=1.5e-4)}
    raise AssertionError(name)


def _encoder_arg(name: str, tmp_path: Path) -> str:
    if name != "visd-boost-layout":
        return name
    raw = yaml.safe_load((resource_dir("baselines") / "visd-boost.yaml").read_text())
    raw["name"], raw["checkpoint"]["sha256"] = name, None  # a file in the published layout, not the published file
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the encoders below: the report embeddings of voc/ct-rate are computed once."""
    return tmp_path_factory.mktemp("published-layouts-cache")


SEG = "seg/luna16-lung"  # the ViTs fine-tune UNETR on their own blocks; the CNN cards are not applicable there


@pytest.mark.parametrize("name, fit", [
    ("asap", "none: 64x64x32 (HWD) tiles into patch 16x16x8"),
    ("hi-end-mae", "none: 48x48x24 (HWD) tiles into patch 12x12x12"),
    ("hlip", "none: 32x64x64 (DWH) tiles into patch 8x16x16"),
    ("m3d-clip", "rebuild_patch_embed: patch_size 4x16x16 -> 8x16x16, qkv_bias false -> true (DHW)"),
    ("fvlm", "none: 32x64x64 (DWH) tiles into patch 16x16x32"),
    ("ct-clip", "none: 32x64x64 (DHW) tiles into patch 8x16x16"),
    ("merlin", "none: 64x64x32 (HWD), any size"),
    ("visd-boost-layout", "none: 32x64x64 (DWH), any size"),
    ("pcrlv2", "none: 32x32x16 (HWD) tiles into multiple 8x8x8"),
])
def test_published_layout_runs_cls_voc_and_seg_with_its_adaptation_recorded(name, fit, demo_root, tmp_path,
                                                                           shared_cache, monkeypatch, one_thread):
    """A checkpoint in each encoder's published layout (at the demo size) runs cls/stoic, voc/ct-rate and, for
    the ViTs, a segmentation protocol through the CLI: no error, and every record names its input adaptation."""
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(shared_cache))
    encoder = _encoder_arg(name, tmp_path)
    try:
        card = get_card(encoder)
        tasks = ["cls/stoic", "voc/ct-rate"] + ([SEG] if card.segmentation.mode == "unetr" else [])
        torch.manual_seed(0)
        module = build_encoder(card, "demo")  # the published layout at the demo size
        path = tmp_path / "weights.pth"
        torch.save(_published_layout(name, module.state_dict()), path)
        out = tmp_path / "runs"
        result = CliRunner().invoke(main, ["run", "--encoder", encoder, "--checkpoint", str(path), "--variant", "demo",
                                           "--task", ",".join(tasks), "--seed-list", "0", "--ratios", "1",
                                           "--data-root", str(demo_root), "--out", str(out), "--quiet"])
    finally:
        forget_card(name)
    assert result.exit_code == 0, result.output
    for task in tasks:
        (record,) = [read_record(p) for p in out.glob(f"{name}/{task.replace('/', '__')}/r*_s0.json")]
        assert record.status == "ok", (task, record.error)
        assert record.metrics[get_protocol(task).primary_metric] is not None, task
        assert record.provenance.input_fit, task
    (record,) = [read_record(p) for p in out.glob(f"{name}/cls__stoic/r*_s0.json")]
    assert record.provenance.input_fit.startswith(fit)
    log = next((out / "logs").glob("run-*.log")).read_text()
    assert "of the module's state" in log
    if name == "m3d-clip":
        assert "rebuilt (3): patch_embedding.patch_embeddings.1.bias" in log


def test_pad_and_resampled_table_run_end_to_end_and_a_changed_fit_reruns(demo_root, tmp_path, registered, one_thread):
    """A published-geometry ViT (patch 8^3, learned 2x2x2 table) on a 20x20x12 paper input: padded to 24x24x16."""
    card = get_card("hi-end-mae")
    small = card.model_copy(update={
        "name": "mae-8", "embed_dim": 48,
        "architecture": {**card.architecture, "img_size": [16, 16, 16], "patch_size": [8, 8, 8], "embed_dim": 48,
                         "depth": 1, "num_heads": 2},
        "input": card.input.model_copy(update={"size": (16, 16, 16)})})
    encoder = registered(small)
    torch.manual_seed(0)
    path = tmp_path / "mae-8.pth"
    torch.save(_published_layout("hi-end-mae", build_encoder(small, "native").state_dict()), path)
    stoic = get_protocol("cls/stoic")
    paper = stoic.preprocessing.model_copy(update={"size": (20, 20, 12), "spacing": (5.0, 5.0, 8.0)})  # the demo's own
    protocol = stoic.model_copy(update={"preprocessing": paper})
    options = local.RunOptions(data_root=demo_root, out=tmp_path / "runs", checkpoint=path, interpolate_pos=True,
                               splits_dir=tmp_path / "splits", cache_dir=tmp_path / "cache", progress=False)
    job = Job(encoder, protocol, 1.0, 0)

    (first,) = local.run_jobs([job], options, LOG)
    assert first.status == "ok", first.message
    record = read_record(job.record_path(options.out))
    assert record.provenance.input_fit == ("pad 20x20x12 -> 24x24x16 (HWD) for patch 8x8x8; position table "
                                           "2x2x2 -> 3x3x2: resampled from the checkpoint (--interpolate-pos)")
    assert record.provenance.input_spec["fit_size"] == [24, 24, 16]
    (again,) = local.run_jobs([job], options, LOG)
    assert again.status == "cached"

    registered(small.model_copy(update={"paper_input": small.paper_input.model_copy(update={"fit": "crop"})}))
    (rerun,) = local.run_jobs([job], options, LOG)
    assert rerun.status == "ok", rerun.message  # another adaptation, another key: not served from the record
    record = read_record(job.record_path(options.out))
    assert record.provenance.input_fit.startswith("crop 20x20x12 -> 16x16x8 (HWD) for patch 8x8x8")
    json.dumps(record.provenance.model_dump(mode="json"))


@pytest.mark.parametrize("paper_input, message", [
    ({"fit": "rebuild_patch_embed"}, "paper_input.rebuild (architecture overrides, with patch_size) goes with"),
    ({"fit": "pad", "rebuild": {"patch_size": [8, 16, 16]}}, "goes with fit 'rebuild_patch_embed', and only with it"),
    ({"fit": "rebuild_patch_embed", "rebuild": {"qkv_bias": True}}, "must give the rebuilt patch_size"),
    ({"fit": "rebuild_patch_embed", "rebuild": {"patch_size": [8, 16, 16], "patch_sz": 3}},
     "overrides keys the architecture does not have: ['patch_sz']"),
    ({"fit": "stretch"}, "paper_input.fit"),
])
def test_a_bad_fit_declaration_is_refused_naming_the_field(paper_input, message, tmp_path):
    from asap_bench.encoders.card import load_card_file
    from asap_bench.schema import SchemaError

    raw = yaml.safe_load((resource_dir("baselines") / "m3d-clip.yaml").read_text())
    raw["paper_input"] = {**{k: v for k, v in raw["paper_input"].items() if k not in ("fit", "rebuild")},
                          **paper_input}
    path = tmp_path / "m3d-clip.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SchemaError) as error:
        load_card_file(path)
    assert message in str(error.value) and str(path) in str(error.value)
