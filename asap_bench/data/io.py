"""Readers and converters for the formats MONAI's LoadImage cannot read with the core install.

Prepared datasets reference NIfTI files wherever the official download has them.
What arrives in another form (MetaImage ``.mha``/``.mhd``, DICOM series, MATLAB
masks, per-slice PNG folders, ``.npz`` arrays, InVesalius ``.inv3`` projects) is
converted here into NIfTI once, at prepare time, so every protocol reads one
format. MetaImage and DICOM go through SimpleITK, which keeps the scanner's
geometry (origin, spacing, direction) and applies the DICOM rescale to HU;
arrays with known geometry are written with nibabel. Optional packages are
imported on use, with an error that names the package to install.
"""

from __future__ import annotations

import gzip
import plistlib
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np


def read_error(err: BaseException) -> str:
    """Why a file could not be read, as ``Type: message`` of the innermost cause.

    MONAI's ``LoadImage`` wraps the reader's own error (``EOFError: Compressed file ended
    before the end-of-stream marker was reached``) in one that names only the transform.
    """
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ if err.__cause__ is not None else err.__context__
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1]}" if text else type(err).__name__


class FormatError(ValueError):
    """A file that cannot be read as the format its dataset promises; names the file."""


def require_sitk():
    """SimpleITK, or an error that names the package to install."""
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("reading MetaImage (.mha/.mhd) and DICOM needs SimpleITK: pip install SimpleITK") from None
    return sitk


# --------------------------------------------------------------------------- NIfTI writing

def lps_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
               direction: np.ndarray | None = None) -> np.ndarray:
    """NIfTI (RAS) affine of an array indexed (x, y, z) whose geometry is given in DICOM's LPS frame."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    flip = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = flip @ direction @ np.diag(spacing)
    affine[:3, 3] = flip @ np.asarray(origin, dtype=float)
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """``data`` indexed (x, y, z) as a gzipped NIfTI-1 with both qform and sform set."""
    image = nib.Nifti1Image(np.asarray(data), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(image, tmp)
    tmp.replace(path)
    return path


def write_sitk(path: Path, image) -> Path:
    """A SimpleITK image as NIfTI (SimpleITK converts its LPS geometry to the NIfTI frame)."""
    sitk = require_sitk()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    sitk.WriteImage(image, str(tmp), useCompression=True)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- MetaImage and DICOM

def read_sitk(path: Path):
    """Any file SimpleITK reads (``.mha``, ``.mhd`` + ``.raw``, ``.nrrd``); a clear error when it cannot."""
    sitk = require_sitk()
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise FormatError(f"{path}: not a readable image ({str(err).strip().splitlines()[-1]})") from None


def dicom_series(folder: Path):
    """The largest DICOM series under ``folder`` as one SimpleITK volume in HU.

    Slices are ordered by position (not file name) and the rescale slope and
    intercept are applied by the reader; a folder holding several series keeps
    the one with the most slices (localisers and dose reports are smaller).
    """
    sitk = require_sitk()
    reader = sitk.ImageSeriesReader()
    best: list[str] = []
    folders = [folder, *(p for p in sorted(folder.rglob("*")) if p.is_dir())]
    for sub in folders:
        for uid in reader.GetGDCMSeriesIDs(str(sub)) or ():
            files = list(reader.GetGDCMSeriesFileNames(str(sub), uid))
            if len(files) > len(best):
                best = files
    if not best:
        raise FormatError(f"{folder}: no DICOM series found")
    reader.SetFileNames(best)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise FormatError(f"{folder}: DICOM series not readable ({str(err).strip().splitlines()[-1]})") from None


def sitk_array_xyz(image) -> np.ndarray:
    """Voxel array of a SimpleITK image indexed (x, y, z) like its physical index."""
    return np.transpose(require_sitk().GetArrayFromImage(image), (2, 1, 0))


def sitk_like(array_xyz: np.ndarray, reference):
    """A SimpleITK image with ``reference``'s geometry holding ``array_xyz`` (indexed x, y, z)."""
    sitk = require_sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    image.CopyInformation(reference)
    return image


# --------------------------------------------------------------------------- MATLAB masks

def load_mat_array(path: Path, key: str | None = None, prefer: tuple[str, ...] = ()) -> np.ndarray:
    """The array ``key`` of a ``.mat`` file, as stored (rows, cols, ...); without ``key``, the only
    array, or the first of ``prefer`` present when there are several.

    MATLAB v5 files are read with scipy; v7.3 files are HDF5 and need h5py, whose
    arrays come back with the axes reversed, which is undone here.
    """
    from scipy.io import loadmat

    try:
        content = {k: v for k, v in loadmat(str(path)).items() if not k.startswith("__")}
    except NotImplementedError:  # v7.3
        try:
            import h5py
        except ImportError:
            raise ImportError(f"{path} is a MATLAB v7.3 (HDF5) file; reading it needs h5py: pip install h5py") from None
        with h5py.File(path, "r") as handle:
            content = {k: np.asarray(handle[k]).T for k in handle.keys() if not k.startswith("#")}
    except (ValueError, OSError) as err:
        raise FormatError(f"{path}: not a readable MATLAB file ({err})") from None
    arrays = {k: v for k, v in content.items() if isinstance(v, np.ndarray) and v.ndim >= 2}
    if key is not None:
        if key not in arrays:
            raise FormatError(f"{path}: no array {key!r}; it holds {sorted(arrays)}")
        return arrays[key]
    named = [k for k in prefer if k in arrays]
    if named:
        return arrays[named[0]]
    if len(arrays) != 1:
        raise FormatError(f"{path}: expected one array, found {sorted(arrays)}; name the variable")
    return next(iter(arrays.values()))


# --------------------------------------------------------------------------- slice folders

def stack_slices(files: list[Path]) -> np.ndarray:
    """2D greyscale images (PNG, JPEG) stacked in the given order, indexed (x, y, z)."""
    from PIL import Image

    planes = []
    for f in files:
        try:
            with Image.open(f) as img:
                planes.append(np.asarray(img.convert("L") if img.mode not in ("L", "I", "I;16") else img))
        except OSError as err:
            raise FormatError(f"{f}: not a readable image ({err})") from None
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise FormatError(f"{files[0].parent}: slices differ in size {sorted(shapes)}")
    return np.stack([p.T for p in planes], axis=-1)


# --------------------------------------------------------------------------- InVesalius projects

def read_inv3(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The CT of an InVesalius ``.inv3`` project: (array indexed (x, y, z), spacing (x, y, z) in mm).

    An ``.inv3`` is a gzipped tar holding ``main.plist`` (dtype, shape as
    (slices, rows, columns), spacing as (x, y, z)) and the raw C-order
    ``matrix.dat`` it describes. Columns run towards the patient's left as in
    DICOM, but InVesalius stores rows flipped on import (towards anterior),
    and slices run towards superior.
    """
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise FormatError(f"{path}: no main.plist inside; not an InVesalius project")
            meta = plistlib.loads(archive.extractfile(members["main.plist"]).read())
            matrix = meta.get("matrix") or {}
            name = matrix.get("filename", "matrix.dat")
            if name not in members:
                raise FormatError(f"{path}: main.plist names {name!r}, which is not in the archive")
            raw = archive.extractfile(members[name]).read()
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, OSError) as err:
        raise FormatError(f"{path}: not a readable .inv3 archive ({err})") from None
    shape = tuple(int(s) for s in matrix["shape"])
    dtype = np.dtype(matrix.get("dtype", "int16"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise FormatError(f"{path}: {name} has {len(raw)} bytes, expected {expected} for {shape} {dtype}")
    volume = np.frombuffer(raw, dtype=dtype).reshape(shape)  # (z, y, x)
    spacing = tuple(float(s) for s in meta["spacing"])
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0))), spacing


INV3_DIRECTION = np.diag([1.0, -1.0, 1.0])  # in LPS: columns to the left, rows to anterior, slices to superior


def inv3_to_nifti(path: Path, out: Path) -> Path:
    volume, spacing = read_inv3(path)
    return write_nifti(out, volume, lps_affine(spacing, direction=INV3_DIRECTION))
