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

from monai import transforms as mt

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
    """Bring ``keys`` to ``spec.size``: resample, or crop / pad (a mask pads with background)."""
    if spec.resize == "resize":
        modes = ("trilinear", "nearest")[: len(keys)]
        return [mt.Resized(keys, spatial_size=spec.size, mode=modes)]
    pad = spec.pad_value if spec.pad_value is not None else (spec.value_range or (0.0,))[0]
    steps = [mt.ResizeWithPadOrCropd(["image"], spatial_size=spec.size, mode=spec.pad_mode,
                                     **({"value": pad} if spec.pad_mode == "constant" else {}))]
    if "mask" in keys:
        steps.append(mt.ResizeWithPadOrCropd(["mask"], spatial_size=spec.size, mode="constant", value=0))
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
        channels=native.channels, axis_order=native.axis_order,
    )
