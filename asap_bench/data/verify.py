"""Integrity check of a prepared data root, before any training touches it.

Every table of every dataset folder is read through ``load_manifest`` (columns,
ids, labels in range), then every referenced file is opened with the same
MONAI reader the preprocessing uses and read to the end, so a truncated or
corrupt file is named here rather than found mid-run. Geometry is checked for
sanity (3D, finite, plausible spacing) and each mask against its image (same
grid, values the card declares). Problems carry the path they concern.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .cards import dataset_names, load_card
from .io import read_error
from .manifest import Manifest, ManifestError, data_fingerprint, load_manifest

SPACING_MM = (0.05, 25.0)  # plausible voxel size range (CT, MRI, candidate patches)
HU_RANGE = (-4000.0, 40000.0)  # beyond these a volume is not in HU (metal streaks stay below 32k)


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    dataset: str = ""
    case_id: str = ""

    def __str__(self) -> str:
        where = f" [{self.dataset}:{self.case_id}]" if self.case_id else ""
        return f"{self.path}: {self.message}{where}"


@dataclass
class Report:
    root: Path
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    checked: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset -> table -> rows
    fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)
    files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"root": str(self.root), "ok": self.ok, "files_opened": self.files, "tables": self.checked,
                "fingerprints": self.fingerprints, "problems": [p.__dict__ for p in self.problems],
                "warnings": [w.__dict__ for w in self.warnings]}


@dataclass
class _Volume:
    shape: tuple[int, ...]
    affine: np.ndarray
    data: np.ndarray


@lru_cache(maxsize=1)
def _loader():
    """One LoadImage for the whole check; its optional GPU DICOM decoder's absence is not news here."""
    from monai.transforms import LoadImage

    plugin = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin.level
    plugin.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            return LoadImage(image_only=True)
    finally:
        plugin.setLevel(level)


def _open(path: Path) -> _Volume:
    """Read the whole file with MONAI's LoadImage (what preprocessing uses); raises on any damage."""
    image = _loader()(str(path))
    data = np.asarray(image)
    affine = np.asarray(image.affine, dtype=float)
    return _Volume(tuple(data.shape), affine, data)


def _spatial(volume: _Volume) -> tuple[int, ...]:
    shape = volume.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_geometry(volume: _Volume, path: Path, add) -> bool:
    shape = _spatial(volume)
    if len(shape) != 3 or min(shape) < 1:
        add(path, f"shape {volume.shape}; expected a 3D volume")
        return False
    if not np.all(np.isfinite(volume.affine)):
        add(path, "affine holds non-finite values")
        return False
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    if not np.all((spacing >= SPACING_MM[0]) & (spacing <= SPACING_MM[1])):
        add(path, f"voxel spacing {np.round(spacing, 4).tolist()} mm is outside {list(SPACING_MM)}")
        return False
    if not np.all(np.isfinite(volume.data)):
        add(path, "voxel values include NaN or infinity")
        return False
    return True


def _check_mask(mask: _Volume, image: _Volume | None, allowed: set[int], path: Path, add) -> None:
    if not np.all(np.isfinite(mask.data)) or not np.all(np.equal(np.mod(mask.data, 1), 0)):
        add(path, "mask holds non-integer values")
        return
    values = set(np.unique(mask.data).astype(int).tolist())
    extra = sorted(values - allowed - {0})
    if extra:
        add(path, f"mask values {extra} are not declared by the card (allowed 0 and {sorted(allowed)})")
    if image is None:
        return
    if _spatial(mask) != _spatial(image):
        add(path, f"mask shape {_spatial(mask)} differs from its image {_spatial(image)}")
    elif not np.allclose(mask.affine, image.affine, atol=1e-3, rtol=1e-4):
        add(path, "mask affine (spacing/orientation/origin) differs from its image's:\n"
                  f"    mask  {np.round(mask.affine, 4).tolist()}\n    image {np.round(image.affine, 4).tolist()}")


def _check_table(manifest: Manifest, report: Report, open_files: bool) -> None:
    dataset = manifest.dataset
    card = manifest.card
    allowed = set((manifest.table.mask or {}).keys())
    hu = card.modality == "CT" and card.intensity == "HU"
    checked: set[Path] = set()  # files shared by several rows (VQA questions) are read once

    def load(relative: str, case: str, role: str) -> _Volume | None:
        path = manifest.folder / relative
        if path in checked:
            return None
        checked.add(path)
        if not path.is_file():
            report.problems.append(Problem(str(path), f"{role} file does not exist", dataset, case))
            return None
        if not open_files:
            return None
        try:
            volume = _open(path)
        except Exception as err:  # any reader failure means the file cannot be used
            message = read_error(err)
            report.problems.append(Problem(str(path), f"{role} file cannot be read: {message[:300]}", dataset, case))
            return None
        report.files += 1
        add = lambda p, m: report.problems.append(Problem(str(p), m, dataset, case))  # noqa: E731
        return volume if _check_geometry(volume, path, add) else None

    for case, row in manifest.frame.iterrows():
        image = load(row["image"], case, "image")
        if image is not None and hu and not manifest.table.qa:
            low, high = float(image.data.min()), float(image.data.max())
            if low < HU_RANGE[0] or high > HU_RANGE[1]:
                report.problems.append(Problem(str(manifest.folder / row["image"]),
                                               f"values [{low:g}, {high:g}] are outside the HU range {list(HU_RANGE)}",
                                               dataset, case))
            elif low > -200:
                report.warnings.append(Problem(str(manifest.folder / row["image"]),
                                               f"lowest value {low:g} is above -200: air is missing or the "
                                               "volume is not in HU", dataset, case))
        if manifest.table.mask is not None and isinstance(row.get("mask"), str):
            mask = load(row["mask"], case, "mask")
            if mask is not None:
                _check_mask(mask, image, allowed, manifest.folder / row["mask"],
                            lambda p, m: report.problems.append(Problem(str(p), m, dataset, case)))


def verify_root(root: Path | str, datasets: list[str] | None = None, *, open_files: bool = True,
                content: bool = False) -> Report:
    """Check every prepared dataset under ``root`` (or only ``datasets``); never raises on bad data."""
    root = Path(root).expanduser()
    report = Report(root)
    if not root.is_dir():
        report.problems.append(Problem(str(root), "data root does not exist"))
        return report
    known = dataset_names()
    names = datasets or sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in known)
    if not names:
        report.problems.append(Problem(str(root), f"no prepared dataset folder (expected one of: {', '.join(known)})"))
    for name in names:
        if name not in known:
            report.problems.append(Problem(str(root / name), f"unknown dataset {name!r}"))
            continue
        card = load_card(name)
        for table in card.tables:
            path = root / name / f"{table}.csv"
            if not path.is_file():
                report.problems.append(Problem(str(path), f"table {table!r} of {name} is missing "
                                               f"(columns: {', '.join(card.table(table).columns())})", name))
                continue
            try:
                manifest = load_manifest(root, name, table)
            except ManifestError as err:
                for problem in err.problems:
                    report.problems.append(Problem(str(path), problem, name))
                continue
            report.checked.setdefault(name, {})[table] = len(manifest)
            _check_table(manifest, report, open_files)
            report.fingerprints.setdefault(name, {})[table] = data_fingerprint(manifest, content)
    return report
