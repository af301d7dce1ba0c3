"""Whole volumes with their masks, preprocessed once and cached by content.

Segmentation trains on crops and infers by sliding window, so it needs each
volume whole (resampled, reoriented, intensity-mapped, in the encoder's axis
order, but not resized to the ViT input) and its mask on the same grid. An
entry is keyed by the manifest hash, the InputSpec and the label mapping; each
case is one ``.npz`` (image float16, mask uint8, voxel spacing in mm along the
array axes) named by the identity of both its files and carrying the checks of
its arrays, written atomically, so a killed run never leaves half an entry, a
changed image or mask is read again, and a damaged file is rebuilt.
Image and mask must agree on the raw files (shape and affine) before any
resampling: a mismatch fails with both file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai import transforms as mt
from monai.data.utils import affine_to_spacing

from ..encoders.card import InputSpec
from ..schema import content_hash
from .cache import DamagedEntry, discard, read_arrays, write_arrays, write_meta
from .cache_kinds import SEG_VOLUMES
from .io import read_error
from .manifest import Manifest, file_identity
from .transforms import build_preprocessing

FORMAT_VERSION = 2
ARRAYS = ("image", "mask", "spacing")
AFFINE_TOLERANCE = 1e-3  # mm: image and mask affines must agree to this


class MaskMismatch(ValueError):
    """An image and its mask that do not share one voxel grid (shape, spacing or position)."""


@dataclass
class SegVolume:
    image: np.ndarray  # [C, *spatial] float32, in the encoder's axis order
    mask: np.ndarray  # [1, *spatial] int64, label values of the model (after any label map)
    spacing: tuple[float, float, float]  # mm along the array's spatial axes


def _remap(mask: np.ndarray, label_map: dict[int, int] | None, known: set[int], where: Path) -> np.ndarray:
    """Apply ``label_map`` (values not in it become background); without one, refuse unknown values."""
    values = set(int(v) for v in np.unique(mask))
    if label_map is None:
        unknown = sorted(values - known - {0})
        if unknown:
            raise ValueError(f"{where}: mask values {unknown} are not structures of the dataset card "
                             f"(expected 0 or one of {sorted(known)})")
        return mask.astype(np.uint8)
    out = np.zeros(mask.shape, dtype=np.uint8)
    for source, target in label_map.items():
        out[mask == int(source)] = int(target)
    return out


class SegVolumeCache:
    """Preprocessed whole volumes and masks of one manifest under one InputSpec (and label map)."""

    def __init__(self, manifest: Manifest, spec: InputSpec, root: Path, label_map: dict[int, int] | None = None):
        if manifest.table.mask is None:
            raise ValueError(f"{manifest.path}: table {manifest.table_name!r} of {manifest.dataset!r} has no mask column")
        self.manifest, self.spec, self.label_map = manifest, spec, label_map
        self.known = set(manifest.table.mask)
        self.key = content_hash({"kind": SEG_VOLUMES, "format": FORMAT_VERSION, "manifest_sha256": manifest.sha256,
                                 "input": spec.model_dump(mode="json"),
                                 "label_map": None if label_map is None else sorted(label_map.items())})
        self.folder = Path(root) / SEG_VOLUMES / self.key
        self.load = mt.LoadImaged(["image", "mask"], image_only=True)
        self.transform = build_preprocessing(spec, with_mask=True, load=False, whole_volume=True)

    def path(self, case_id: str) -> Path:
        """Named by the identity of the image and mask files: a change to either is read again."""
        row = self.manifest.frame.loc[case_id]
        files = [file_identity(self.manifest, row["image"]), file_identity(self.manifest, row["mask"])]
        return self.folder / f"{content_hash(files)[:32]}.npz"

    def get(self, case_id: str) -> SegVolume:
        path = self.path(case_id)
        data = None
        if path.is_file():
            try:
                data = read_arrays(path, ARRAYS)
            except DamagedEntry as error:
                discard(path, error)
        if data is None:
            data = self._build(case_id, path)
        return SegVolume(data["image"].astype(np.float32), data["mask"].astype(np.int64),
                         tuple(float(s) for s in data["spacing"]))

    def _build(self, case_id: str, path: Path) -> dict[str, np.ndarray]:
        image_file, mask_file = self.manifest.image_path(case_id), self.manifest.mask_path(case_id)
        try:
            raw = self.load({"image": str(image_file), "mask": str(mask_file)})
        except Exception as err:
            raise ValueError(f"{image_file} / {mask_file}: cannot be read ({read_error(err)})") from err
        check_same_grid(raw["image"], raw["mask"], image_file, mask_file)
        out = self._preprocess(raw)
        image = np.asarray(out["image"], dtype=np.float32)
        if not np.isfinite(image).all():
            raise ValueError(f"{image_file}: preprocessing produced non-finite values")
        mask = _remap(np.asarray(out["mask"]), self.label_map, self.known, mask_file)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "meta.json").exists():
            write_meta(self.folder, {"kind": SEG_VOLUMES, "format": FORMAT_VERSION, "dataset": self.manifest.dataset,
                                     "table": self.manifest.table_name, "manifest_sha256": self.manifest.sha256,
                                     "input": self.spec.model_dump(mode="json"),
                                     "label_map": None if self.label_map is None else
                                     {str(k): v for k, v in self.label_map.items()}})
        data = {"image": image.astype(np.float16), "mask": mask,
                "spacing": np.asarray(out["spacing"], dtype=np.float64)}
        write_arrays(path, data, "preprocessed volume and mask")
        return data

    def _preprocess(self, raw: dict) -> dict:
        """Run the preprocessing, reading the voxel spacing off the image before the axis transpose."""
        data, spacing = dict(raw), None
        for step in self.transform.transforms:
            if spacing is None and isinstance(step, (mt.Transposed, mt.EnsureTyped)):
                spacing = _spacing(data["image"])
            data = step(data)
        if spacing is None:
            spacing = _spacing(data["image"])
        order = ["HWD".index(a) for a in self.spec.axis_order]
        data["spacing"] = [float(spacing[i]) for i in order]
        return data


def _spacing(tensor) -> list[float]:
    return [float(s) for s in affine_to_spacing(tensor.affine, r=3)]


def check_same_grid(image, mask, image_file: Path, mask_file: Path) -> None:
    """Image and mask (as loaded, before any resampling) must share shape and affine."""
    shape_i, shape_m = tuple(image.shape[:3]), tuple(mask.shape[:3])
    if shape_i != shape_m or image.ndim != mask.ndim:
        raise MaskMismatch(f"mask {mask_file} has shape {list(mask.shape)}, its image {image_file} has "
                           f"{list(image.shape)}: they must share one voxel grid")
    a_i, a_m = np.asarray(image.affine, dtype=float), np.asarray(mask.affine, dtype=float)
    if not np.allclose(a_i, a_m, atol=AFFINE_TOLERANCE):
        raise MaskMismatch(f"mask {mask_file} and its image {image_file} differ in spacing or position "
                           f"(voxel sizes {_rounded(a_m)} vs {_rounded(a_i)} mm; affines\n{a_m.round(4)}\nvs\n"
                           f"{a_i.round(4)})")


def _rounded(affine: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0)]
