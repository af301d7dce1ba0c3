"""Preprocessing from an InputSpec: intensity mapping, layout, masks kept aligned."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from asap_bench.data.manifest import load_manifest
from asap_bench.data.transforms import build_preprocessing, input_for
from asap_bench.encoders.card import InputSpec, load_encoder_card
from asap_bench.protocol import get_protocol


@pytest.fixture(scope="module")
def case(demo_root):
    manifest = load_manifest(demo_root, "segthor")
    case_id = manifest.frame.index[0]
    return str(manifest.image_path(case_id)), str(manifest.mask_path(case_id))


def test_hu_window_matches_the_formula(case):
    image, _ = case
    hu = np.asarray(nib.load(image).dataobj, dtype=np.float32)
    spec = InputSpec(spacing=None, orientation=None, intensity="hu_window", hu_window=(-1000, 1000),
                     value_range=(-1, 1), size=hu.shape)
    out = build_preprocessing(spec)({"image": image})["image"]
    expected = np.clip((hu + 1000) / 2000, 0, 1) * 2 - 1
    assert out.shape == (1, *hu.shape) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_layout_normalisation_and_mask(case):
    image, mask = case
    spec = load_encoder_card("hlip").input.model_copy(update={"size": (48, 40, 24)})  # DWH, mean/std
    out = build_preprocessing(spec, with_mask=True)({"image": image, "mask": mask})
    assert out["image"].shape == (1, 24, 40, 48) and out["mask"].shape == (1, 24, 40, 48)
    assert set(out["mask"].unique().tolist()) <= {0, 1, 2, 3, 4} and out["mask"].dtype == torch.int64
    # [0, 1] after the window, then Normalize(0.449, 0.226)
    assert out["image"].min() >= (0 - 0.449) / 0.226 - 1e-4 and out["image"].max() <= (1 - 0.449) / 0.226 + 1e-4
    # the mask stays on the image: the heart (2) is brighter than the lungs on average
    heart = out["image"][out["mask"] == 2].mean()
    assert heart > out["image"][out["mask"] == 0].mean()


def test_crop_or_pad_and_resampling(case):
    image, mask = case
    spec = InputSpec(spacing=(8.0, 8.0, 12.0), intensity="hu_window", hu_window=(-1000, 1000), value_range=(0, 1),
                     size=(48, 48, 32), resize="crop_or_pad")
    out = build_preprocessing(spec, with_mask=True)({"image": image, "mask": mask})
    assert out["image"].shape == (1, 48, 48, 32)
    assert out["image"][0, 0, 0, -1] == 0  # padding takes the low end of the value range


def test_paper_input_keeps_only_the_encoder_layout():
    protocol = get_protocol("cls/ct-rate")
    native = load_encoder_card("hlip").input
    paper = input_for(protocol.preprocessing, native)
    assert paper.size == (224, 224, 112) and paper.hu_window == (-1000, 1000) and paper.axis_order == "DWH"
    assert paper.mean is None
    native_protocol = protocol.preprocessing.model_copy(update={"input": "native"})
    assert input_for(native_protocol, native) == native
