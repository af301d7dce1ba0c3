"""The ``paper`` input is the ASAP benchmark's test transform, and the random row is its random init.

The reference chain is built here from MONAI's array transforms in the order the
authors' ``transform_test`` applies them (``Benchmark/Classification/utils/data_utils.py``):
orientation, spacing, HU window, centre crop, reflect pad. No resize.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt

from asap_bench.data.transforms import build_preprocessing, input_for
from asap_bench.encoders.registry import build_encoder, get_card
from asap_bench.protocol import get_protocol, shipped_protocols


def _authors_chain(size: tuple[int, int, int]) -> mt.Compose:
    return mt.Compose([
        mt.LoadImage(image_only=True), mt.EnsureChannelFirst(),
        mt.Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacing(pixdim=(1.5, 1.5, 3.0), mode="bilinear"),
        mt.ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=-1, b_max=1, clip=True),
        mt.CenterSpatialCrop(roi_size=size),
        mt.SpatialPad(spatial_size=size, mode="reflect"),
    ])


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A chest-sized CT in HU: wider than 224 in x, narrower in y, shorter than 112 in z."""
    rng = np.random.default_rng(0)
    values = rng.normal(-500, 400, size=(250, 200, 90)).astype(np.float32)
    values[100:150, 60:140, 20:70] += 900  # an off-centre structure, so a resize and a crop differ
    path = tmp_path_factory.mktemp("paper") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(values, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    return str(path)


@pytest.mark.parametrize("protocol_id", ["cls/stoic", "prog/inspect-mortality", "voc/ct-rate"])
@pytest.mark.parametrize("encoder", ["asap", "simcrop"])
def test_paper_input_is_the_authors_centre_crop_and_reflect_pad(scan, protocol_id, encoder):
    spec = input_for(get_protocol(protocol_id).preprocessing, get_card(encoder).input)
    ours = build_preprocessing(spec)({"image": scan})["image"]
    theirs = _authors_chain((224, 224, 112))(scan)
    assert tuple(ours.shape) == (1, 224, 224, 112)
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs, dtype=np.float32), atol=1e-6)


def test_the_asap_vit_cards_take_the_same_input_natively(scan):
    """ASAP, and MAE/M3AE/MRM re-trained on its ViT-B, are fed the authors' input under ``native`` too."""
    theirs = np.asarray(_authors_chain((224, 224, 112))(scan), dtype=np.float32)
    for name in ("asap", "mae", "m3ae", "mrm", "random"):
        ours = build_preprocessing(get_card(name).input)({"image": scan})["image"]
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6, err_msg=name)


def test_every_paper_protocol_names_how_it_fits_the_size():
    """Only LUNA16's candidate patches and CC-CCII's spacing-less slices are resized, each stated in its file."""
    resized = sorted(pid for pid, p in shipped_protocols().items()
                     if p.preprocessing.input == "paper" and p.preprocessing.resize == "resize")
    assert resized == ["cls/cc-ccii", "cls/luna16"]
    for pid in resized:
        assert "resized" in shipped_protocols()[pid].description


def test_random_init_has_the_benchmarks_all_zero_position_table():
    random_vit = build_encoder("random", "demo")
    assert torch.count_nonzero(random_vit.pos_embed) == 0 and not random_vit.pos_embed.requires_grad
    simcrop = build_encoder("simcrop", "demo")  # a fresh SimCroP-layout ViT keeps the fixed sin-cos table
    assert torch.count_nonzero(simcrop.pos_embed[0, 1:]) > 0 and not simcrop.pos_embed.requires_grad


def test_a_volume_narrower_than_half_the_input_is_reflected_as_numpy_does(tmp_path):
    """The benchmark's MONAI 0.8 padded with ``np.pad``; torch's reflect pad refuses borders this wide."""
    values = np.random.default_rng(1).normal(-400, 300, size=(60, 50, 20)).astype(np.float32)
    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(values, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    spec = input_for(get_protocol("cls/stoic").preprocessing, get_card("asap").input)
    ours = build_preprocessing(spec)({"image": str(path)})["image"][0].numpy()
    scaled = np.clip(values, -1000, 1000) / 1000
    widths = [((s - n) // 2, s - n - (s - n) // 2) for n, s in zip(values.shape, (224, 224, 112))]
    np.testing.assert_allclose(ours, np.pad(scaled, widths, mode="reflect"), atol=1e-6)
