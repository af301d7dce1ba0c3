"""Real CT through the project's reading and preprocessing path, checked against the raw bytes.

Sources: the head CT the Debian package ``invesalius-examples`` ships (``Cranium.inv3``)
and the CT slice in pydicom's test data (``CT_small.dcm``).
"""

from __future__ import annotations

import plistlib
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from asap_bench.data.io import dicom_series, inv3_to_nifti, read_inv3, write_sitk
from asap_bench.data.transforms import build_preprocessing
from asap_bench.encoders.card import InputSpec

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
needs_cranium = pytest.mark.skipif(not CRANIUM.is_file(), reason=f"{CRANIUM} is absent: install the Debian package "
                                   "invesalius-examples (apt-get install invesalius-examples)")


def _raw_inv3(path: Path) -> tuple[np.ndarray, dict]:
    """main.plist and matrix.dat straight from the archive: (slices, rows, columns) int16."""
    with tarfile.open(path, "r:gz") as archive:
        members = {Path(m.name).name: m for m in archive.getmembers()}
        meta = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        raw = archive.extractfile(members["matrix.dat"]).read()
    return np.frombuffer(raw, dtype="<i2").reshape(meta["matrix"]["shape"]), meta


def _steps(spec: InputSpec, n: int):
    """The first ``n`` steps of the project's preprocessing (load, channel, orientation, spacing)."""
    from monai.transforms import Compose

    return Compose(build_preprocessing(spec).transforms[:n])


@pytest.fixture(scope="module")
def cranium(tmp_path_factory) -> tuple[Path, np.ndarray, dict]:
    raw, meta = _raw_inv3(CRANIUM)
    out = inv3_to_nifti(CRANIUM, tmp_path_factory.mktemp("inv3") / "cranium.nii.gz")
    return out, raw, meta


@needs_cranium
def test_inv3_reader_matches_the_raw_bytes(cranium):
    _, raw, meta = cranium
    volume, spacing = read_inv3(CRANIUM)
    assert raw.shape == (108, 256, 256) and volume.shape == (256, 256, 108)
    assert np.allclose(spacing, (0.9570312, 0.9570312, 1.5))
    np.testing.assert_array_equal(volume, raw.transpose(2, 1, 0))
    low, high = meta["scalar_range"]  # the range of the original series; the stored volume lies within it
    assert int(raw.min()) == low == -1024 and 2000 < int(raw.max()) <= high


@needs_cranium
def test_cranium_orientation_spacing_hu_and_shape(cranium):
    path, raw, meta = cranium
    spec = InputSpec(spacing=(1.5, 1.5, 3.0), orientation="RAS", intensity="hu_window", hu_window=(-1000, 1000),
                     value_range=(-1, 1), size=(224, 224, 112))
    # load + channel + orientation: RAS reverses the columns (stored towards the patient's left);
    # rows are stored towards anterior and slices towards superior already
    oriented = _steps(spec, 3)({"image": str(path)})["image"]
    expected = raw.transpose(2, 1, 0)[::-1, :, :].astype(np.float32)
    assert tuple(oriented.shape) == (1, 256, 256, 108)
    np.testing.assert_array_equal(np.asarray(oriented[0]), expected)
    affine = np.asarray(oriented.affine)
    assert np.allclose(np.diag(affine)[:3], (0.9570312, 0.9570312, 1.5)) and np.allclose(affine[:3, :3],
                                                                                          np.diag(np.diag(affine)[:3]))
    assert float(oriented.min()) == raw.min() == -1024 and float(oriented.max()) == raw.max()  # HU as stored
    # anatomy agrees with superior = +z: the slices at the vertex hold less head than those at the skull base
    head = np.asarray(oriented[0]) > -300
    assert head[:, :, -10:].mean() < 0.5 * head[:, :, :10].mean()

    # + spacing: the grid covers the same extent at 1.5 x 1.5 x 3 mm
    spaced = _steps(spec, 4)({"image": str(path)})["image"]
    extent = np.array([256 * 0.9570312, 256 * 0.9570312, 108 * 1.5])
    assert np.all(np.abs(np.array(spaced.shape[1:]) - extent / np.array(spec.spacing)) <= 1)
    assert np.allclose(np.linalg.norm(np.asarray(spaced.affine)[:3, :3], axis=0), spec.spacing)
    centre = np.asarray(spaced[0])[tuple(s // 2 for s in spaced.shape[1:])]
    assert raw.min() <= centre <= raw.max()

    # the whole pipeline: window [-1000, 1000] to [-1, 1], resized to the encoder's size
    out = build_preprocessing(spec)({"image": str(path)})["image"]
    assert tuple(out.shape) == (1, 224, 224, 112) and out.dtype.is_floating_point
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    # resampling keeps the mean of the windowed intensities (the same field of view throughout)
    windowed = float((np.clip(expected, -1000, 1000) / 1000).mean())
    assert abs(float(out.mean()) - windowed) < 0.01


@pytest.fixture(scope="module")
def ct_small(tmp_path_factory):
    import pydicom
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")  # ships inside the pydicom wheel
    assert source is not None, "pydicom's bundled test file CT_small.dcm is missing"
    folder = tmp_path_factory.mktemp("dicom") / "series"
    folder.mkdir()
    shutil.copy(source, folder / "CT_small.dcm")
    return pydicom.dcmread(source), folder


def test_dicom_slice_hu_orientation_and_spacing(ct_small, tmp_path: Path):
    ds, folder = ct_small
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # rows, columns
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    path = write_sitk(tmp_path / "ct_small.nii.gz", dicom_series(folder))
    spec = InputSpec(spacing=None, orientation="RAS", intensity="hu_window", hu_window=(-1000, 1000),
                     value_range=(-1, 1), size=(128, 128, 1), resize="crop_or_pad")
    oriented = _steps(spec, 3)({"image": str(path)})["image"]
    assert tuple(oriented.shape) == (1, 128, 128, 1)
    # x = columns, y = rows in DICOM (LPS); RAS reverses both
    np.testing.assert_allclose(np.asarray(oriented[0, :, :, 0]), hu.T[::-1, ::-1])
    spacing = np.linalg.norm(np.asarray(oriented.affine)[:3, :3], axis=0)
    assert np.allclose(spacing[:2], [float(v) for v in ds.PixelSpacing])
    # the slice's position (LPS) is the corner voxel of the stored grid; in RAS x and y change sign
    corner = np.asarray(oriented.affine) @ np.array([127, 127, 0, 1.0])
    assert np.allclose(corner[:3], [-float(ds.ImagePositionPatient[0]), -float(ds.ImagePositionPatient[1]),
                                    float(ds.ImagePositionPatient[2])], atol=1e-3)
    out = build_preprocessing(spec)({"image": str(path)})["image"]
    np.testing.assert_allclose(np.asarray(out[0, :, :, 0]), np.clip(hu.T[::-1, ::-1], -1000, 1000) / 1000, atol=1e-5)
