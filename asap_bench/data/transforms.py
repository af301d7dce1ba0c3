"""Preprocessing built from an InputSpec with MONAI transforms, never hand-coded per task.

One function turns a spec (spacing, orientation, intensity mapping, size,
normalisation, tensor layout) into a dictionary transform over ``image`` and,
for segmentation, ``mask`` (nearest-neighbour wherever the image is
interpolated). ``input_for`` decides which spec a protocol feeds an encoder:
its own published one (``native``) or the protocol's shared one (``paper``).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from ..encoders.card import InputSpec
from ..protocol import Preprocessing

# MONAI says at every reader construction that its optional GPU DICOM decoder is absent: not news on CPU
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)

PERCENTILES = (0.5, 99.5)  # intensity 'percentile': robust min-max for MRI and 8-bit sources


def _intensity(spec: InputSpec, keys: list[str]) -> list[mt.Transform]:
    low, high = spec.value_range or (0.0, 1.0)
    if spec.intensity == "hu_window":
        a_min, a_max = spec.hu_window
        return [mt.ScaleIntensityRanged(keys, a_min=a_min, a_max=a_max, b_min=low, b_max=high, clip=True)]
    if spec.intensity == "minmax":
        return [mt.ScaleIntensityd(keys, minv=low, maxv=high)]
    if spec.intensity == "percentile":
        return [mt.ScaleIntensityRangePercentilesd(keys, lower=PERCENTILES[0], upper=PERCENTILES[1],
                                                   b_min=low, b_max=high, clip=True)]
    return [mt.NormalizeIntensityd(keys)]  # zscore


def _axis_permutation(axis_order: str) -> tuple[int, ...]:
    """Transpose indices (channel first) taking MONAI's H, W, D layout to ``axis_order``."""
    return (0, *(1 + "HWD".index(axis) for axis in axis_order))


def _size(spec: InputSpec, keys: list[str]) -> list[mt.Transform]:
    """Bring ``keys`` to ``spec.size``: resample, or crop / pad (a mask pads with background); then to
    ``spec.fit_size``, the size the encoder's patches tile, by a centred pad or crop of the same kind."""
    if spec.resize == "resize":
        modes = ("trilinear", "nearest")[: len(keys)]
        steps: list[mt.Transform] = [mt.Resized(keys, spatial_size=spec.size, mode=modes)]
    else:
        steps = _pad_or_crop(spec, keys, spec.size)
    if spec.fit_size is not None and tuple(spec.fit_size) != tuple(spec.size):
        steps += _pad_or_crop(spec, keys, spec.fit_size)
    return steps


class NumpyReflectPadd(mt.MapTransform):
    """Centred crop, then symmetric padding to ``spatial_size`` with numpy's ``reflect``.

    The ASAP benchmark's MONAI 0.8 ``SpatialPad(mode="reflect")`` ran ``np.pad`` on arrays. Torch's reflect
    padding, which MONAI uses on tensors today, refuses a border as wide as the volume, where numpy keeps
    reflecting; for narrower borders the two agree. Meta data is kept; it is not read after the size step.
    """

    def __init__(self, keys, spatial_size: tuple[int, int, int]):
        super().__init__(keys)
        self.crop = mt.CenterSpatialCrop(spatial_size)
        self.size = tuple(int(s) for s in spatial_size)

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            image = self.crop(out[key])
            widths = [(0, 0)] + [((s - n) // 2, s - n - (s - n) // 2) if n < s else (0, 0)
                                 for n, s in zip(image.shape[1:], self.size)]
            if any(w != (0, 0) for w in widths):
                padded = torch.from_numpy(np.pad(np.asarray(image), widths, mode="reflect"))
                image = MetaTensor(padded, meta=image.meta) if isinstance(image, MetaTensor) else padded
            out[key] = image
        return out


def _pad_or_crop(spec: InputSpec, keys: list[str], size: tuple[int, int, int]) -> list[mt.Transform]:
    """Centred crop / pad to ``size``: the image with the spec's pad mode and value, a mask with background."""
    pad = spec.pad_value if spec.pad_value is not None else (spec.value_range or (0.0,))[0]
    if spec.pad_mode == "reflect":
        steps: list[mt.Transform] = [NumpyReflectPadd(["image"], size)]
    else:
        steps = [mt.ResizeWithPadOrCropd(["image"], spatial_size=size, mode=spec.pad_mode,
                                         **({"value": pad} if spec.pad_mode == "constant" else {}))]
    if "mask" in keys:
        steps.append(mt.ResizeWithPadOrCropd(["mask"], spatial_size=size, mode="constant", value=0))
    return steps


def build_preprocessing(spec: InputSpec, with_mask: bool = False, load: bool = True,
                        whole_volume: bool = False) -> mt.Compose:
    """Dictionary transform: file path(s) under ``image`` (and ``mask``) -> tensors the encoder takes.

    ``whole_volume`` skips the resize / crop-or-pad to ``spec.size``: segmentation keeps the
    whole resampled volume and crops (training) or slides a window (inference) over it.
    """
    keys = ["image", "mask"] if with_mask else ["image"]
    image = ["image"]
    steps: list[mt.Transform] = []
    if load:
        steps.append(mt.LoadImaged(keys, image_only=True))
    steps.append(mt.EnsureChannelFirstd(keys))
    if spec.orientation:
        steps.append(mt.Orientationd(keys, axcodes=spec.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if spec.spacing:
        modes = ("bilinear", "nearest")[: len(keys)]
        steps.append(mt.Spacingd(keys, pixdim=spec.spacing, mode=modes))
    steps += _intensity(spec, image)
    if not whole_volume:  # a whole volume keeps its size: the consumer crops or slides a window over it
        steps += _size(spec, keys)
    if spec.mean is not None:
        steps.append(mt.NormalizeIntensityd(image, subtrahend=spec.mean, divisor=spec.std))
    if spec.axis_order != "HWD":
        steps.append(mt.Transposed(keys, indices=_axis_permutation(spec.axis_order)))
    steps.append(mt.EnsureTyped(image, dtype="float32", track_meta=False))
    if with_mask:
        steps.append(mt.EnsureTyped(["mask"], dtype="int64", track_meta=False))
    return mt.Compose(steps)


def input_for(preprocessing: Preprocessing, native: InputSpec) -> InputSpec:
    """The spec a protocol feeds an encoder whose published spec is ``native``.

    ``native`` keeps the encoder's own input. ``paper`` takes resampling, intensity
    mapping and size from the protocol (the ASAP paper feeds every encoder the same
    input) and keeps only the encoder's tensor layout and channel count.
    """
    if preprocessing.input == "native":
        return native
    return InputSpec(
        spacing=preprocessing.spacing, orientation=preprocessing.orientation, intensity=preprocessing.intensity,
        hu_window=preprocessing.hu_window if preprocessing.intensity == "hu_window" else None,
        value_range=preprocessing.value_range, size=preprocessing.size, resize=preprocessing.resize,
        pad_mode=preprocessing.pad_mode, channels=native.channels, axis_order=native.axis_order,
    )
