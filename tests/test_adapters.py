"""Every dataset adapter on a tiny tree written in its official layout (real file and column names)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from asap_bench.data.adapters import ADAPTERS, PrepareError, prepare, private_message
from asap_bench.data.cards import dataset_names, load_card
from asap_bench.data.manifest import load_manifest
from asap_bench.data.verify import verify_root

SHAPE = (8, 7, 4)  # x, y, z: tiny, and not symmetric so axis mix-ups show
CT_RATE_LABELS = load_card("ct-rate").table("volumes").labels["abnormality"].columns


# --------------------------------------------------------------------------- fixture writers

def ct(seed: int, shape=SHAPE) -> np.ndarray:
    """A small int16 'CT' with air and tissue, distinct per seed."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-1000, 400, size=shape).astype(np.int16)
    data[0, 0, 0] = -1024
    return data


def nii(path: Path, data: np.ndarray, spacing=(0.8, 0.9, 2.5), **header) -> Path:
    affine = np.diag([*spacing, 1.0])
    image = nib.Nifti1Image(data, affine)
    if "slope" in header:
        image.header.set_slope_inter(header["slope"], header["inter"])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def seg(shape=SHAPE, values=(1,), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice([0, *values], size=shape).astype(np.uint8)


def mha(path: Path, data_xyz: np.ndarray, spacing=(0.7, 0.7, 1.25), origin=(-10.0, -20.0, -30.0)) -> Path:
    image = sitk.GetImageFromArray(np.transpose(data_xyz, (2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def dicom_series(folder: Path, hu_xyz: np.ndarray, *, spacing=(0.7, 0.7, 2.0), series_uid=None, study_uid=None,
                 reverse_instances=False) -> str:
    """One CT slice per file, stored as HU + 1024 with RescaleIntercept -1024 (as scanners do)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    n = hu_xyz.shape[2]
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", folder.name
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.InstanceNumber = (n - k) if reverse_instances else (k + 1)
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = hu_xyz.shape[1], hu_xyz.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu_xyz[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(str(folder / f"{meta.MediaStorageSOPInstanceUID}.dcm"), enforce_file_format=True)
    return series_uid


def dicom_seg(path: Path, mask_xyz: np.ndarray, series_uid: str, spacing_z: float) -> None:
    """A minimal DICOM SEG: one binary frame per CT slice that holds tumour, placed by position."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    slices = [k for k in range(mask_xyz.shape[2]) if mask_xyz[:, :, k].any()]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "SEG", generate_uid()
    ref = Dataset()
    ref.SeriesInstanceUID = series_uid
    ds.ReferencedSeriesSequence = Sequence([ref])
    frames = []
    for k in slices:
        group, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, float(k * spacing_z)]
        group.PlanePositionSequence = Sequence([plane])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.NumberOfFrames = len(slices)
    ds.Rows, ds.Columns = mask_xyz.shape[1], mask_xyz.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(np.stack([mask_xyz[:, :, k].T for k in slices]).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def loaded(root: Path, dataset: str, table: str = "volumes"):
    return load_manifest(root, dataset, table)


def voxels(manifest, case: str, column: str = "image") -> np.ndarray:
    from monai.transforms import LoadImage

    path = manifest.folder / manifest.frame.loc[case, column]
    return np.asarray(LoadImage(image_only=True)(str(path)))


def assert_verified(root: Path, dataset: str) -> None:
    report = verify_root(root, [dataset])
    assert report.ok, [str(p) for p in report.problems]


# --------------------------------------------------------------------------- the datasets

def test_every_card_has_an_adapter():
    assert sorted(ADAPTERS) == dataset_names() and len(ADAPTERS) == 18


def test_ct_rate(tmp_path: Path):
    src, root = tmp_path / "CT-RATE", tmp_path / "prepared"
    good, raw = ct(1), ct(2)
    nii(src / "dataset/train/train_1/train_1_a/train_1_a_1.nii.gz", good, spacing=(0.75, 0.75, 1.5),
        slope=1.0, inter=0.0)
    nii(src / "dataset/train/train_1/train_1_a/train_1_a_2.nii.gz", (good + 1024).astype(np.int16))
    nii(src / "dataset/train_fixed/train_1/train_1_a/train_1_a_2.nii.gz", good, spacing=(0.75, 0.75, 1.5))
    # stored values without the rescale, spacing 1 mm: the metadata must fix both
    nii(src / "dataset/valid/valid_7/valid_7_a/valid_7_a_1.nii.gz", (raw + 1024).astype(np.int16), spacing=(1, 1, 1))
    names = ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz"]
    for part, csv_part, vols in (("train", "train", names), ("valid", "validation", ["valid_7_a_1.nii.gz"])):
        labels = pd.DataFrame({"VolumeName": vols, **{c: [int(i % 2 == j % 2) for i in range(len(vols))]
                                                     for j, c in enumerate(CT_RATE_LABELS)}})
        (src / "dataset/multi_abnormality_labels").mkdir(parents=True, exist_ok=True)
        labels.to_csv(src / f"dataset/multi_abnormality_labels/{part}_predicted_labels.csv", index=False)
        reports = pd.DataFrame({"VolumeName": vols, "ClinicalInformation_EN": "x", "Technique_EN": "y",
                                "Findings_EN": [f"findings {v}" for v in vols],
                                "Impressions_EN": [f"impression {v}" for v in vols]})
        (src / "dataset/radiology_text_reports").mkdir(parents=True, exist_ok=True)
        reports.to_csv(src / f"dataset/radiology_text_reports/{csv_part}_reports.csv", index=False)
        meta = pd.DataFrame({"VolumeName": vols, "RescaleSlope": 1.0,
                             "RescaleIntercept": -1024.0 if part == "valid" else 0.0,
                             "XYSpacing": "[0.75, 0.75]", "ZSpacing": 1.5})
        (src / "dataset/metadata").mkdir(parents=True, exist_ok=True)
        meta.to_csv(src / f"dataset/metadata/{csv_part}_metadata.csv", index=False)
    summary = prepare("ct-rate", src, root)
    m = loaded(root, "ct-rate")
    assert sorted(m.frame.index) == ["train_1_a_1", "train_1_a_2", "valid_7_a_1"]
    assert m.frame.loc["train_1_a_2", "patient_id"] == "train_1" and m.frame.loc["valid_7_a_1", "split"] == "test"
    assert m.frame.loc["train_1_a_1", "image"] == "source/dataset/train/train_1/train_1_a/train_1_a_1.nii.gz"
    assert m.frame.loc["train_1_a_2", "image"] == "source/dataset/train_fixed/train_1/train_1_a/train_1_a_2.nii.gz"
    assert m.frame.loc["valid_7_a_1", "image"].startswith("images/")  # rewritten with the metadata
    np.testing.assert_array_equal(voxels(m, "valid_7_a_1"), raw)
    fixed = nib.load(str(m.image_path("valid_7_a_1")))
    assert np.allclose(fixed.header.get_zooms()[:3], (0.75, 0.75, 1.5))
    assert m.frame.loc["train_1_a_2", "findings"] == "findings train_1_a_2.nii.gz"
    assert int(m.frame.loc["train_1_a_1", CT_RATE_LABELS[0]]) == 1
    assert summary["fingerprints"]["volumes"]
    assert_verified(root, "ct-rate")

    # RadGenome's questions point at these prepared volumes
    rg = tmp_path / "RadGenome-ChestCT" / "dataset" / "radgenome_files"
    rg.mkdir(parents=True)
    for part, vol in (("train", "train_1_a_1.nii.gz"), ("validation", "valid_7_a_1.nii.gz")):
        pd.DataFrame({"Volumename": [vol], "Anatomy": ["lung"], "Abnormality": ["nodule"]}).to_csv(
            rg / f"{part}_vqa_abnormality.csv", index=False)
        pd.DataFrame({"Volumename": [vol], "Anatomy": ["right lung"], "Abnormality": ["nodule"]}).to_csv(
            rg / f"{part}_vqa_location.csv", index=False)
        pd.DataFrame({"Volumename": [vol, "train_99_a_1.nii.gz"], "Anatomy": [None, None],
                      "Finding": ["pleural effusion"] * 2, "Presence": ["No.", "Yes."]}).to_csv(
            rg / f"{part}_vqa_presence.csv", index=False)
        pd.DataFrame({"Volumename": [vol], "Anatomy": ["lung"], "Abnormality": ["nodule"], "Size": ["5 mm"]}).to_csv(
            rg / f"{part}_vqa_size.csv", index=False)
        pd.DataFrame({"Volumename": [vol], "Disorders": ["nodule, emphysema"]}).to_csv(
            rg / f"{part}_case_disorders.csv", index=False)
    summary = prepare("radgenome", tmp_path / "RadGenome-ChestCT", root)
    q = loaded(root, "radgenome", "vqa")
    assert len(q) == 10 and set(q.frame["qa_type"]) == {"abnormality", "location", "presence", "size", "disorder"}
    row = q.frame[(q.frame["qa_type"] == "size") & (q.frame["split"] == "test")].iloc[0]
    assert row["question"] == "What is the size of the nodule?" and row["answer"] == "5 mm"
    assert row["image"].startswith("../ct-rate/") and (q.folder / row["image"]).is_file()
    assert any("train_99_a_1" not in n and "no CT-RATE volume" in n for n in summary["notes"])


def test_rad_chestct(tmp_path: Path):
    src, root = tmp_path / "rad", tmp_path / "prepared"
    src.mkdir()
    zyx = np.arange(4 * 7 * 8, dtype=np.int16).reshape(4, 7, 8) - 1000
    for case in ("trn00001", "trn00002"):
        np.savez_compressed(src / f"{case}.npz", ct=zyx)
    pd.DataFrame({"NoteAcc_DEID": ["trn00001", "trn00002"], "nodule*right_lung": [1, 0], "nodule*left_lung": [0, 0],
                  "calcification*aorta": [0, 1], "calcification*heart": [1, 0], "cardiomegaly*heart": [0, 1]}).to_csv(
        src / "imgtrain_Abnormality_and_Location_Labels.csv", index=False)
    summary = prepare("rad-chestct", src, root)
    m = loaded(root, "rad-chestct")
    assert m.frame.loc["trn00001", "Lung nodule"] == 1 and m.frame.loc["trn00002", "Lung nodule"] == 0
    assert m.frame.loc["trn00001", "Arterial wall calcification"] == 0  # heart calcification is not arterial wall
    assert m.frame.loc["trn00002", "Arterial wall calcification"] == 1 and m.frame.loc["trn00002", "Cardiomegaly"] == 1
    assert pd.isna(m.frame.loc["trn00001", "Emphysema"])  # no such column in the file: unlabelled, not negative
    assert any("Emphysema" in n for n in summary["notes"])
    vol = voxels(m, "trn00001")
    assert vol.shape == (8, 7, 4) and vol.min() == zyx.min() and vol.max() == zyx.max()
    assert_verified(root, "rad-chestct")


def test_stoic(tmp_path: Path):
    src, root = tmp_path / "stoic2021-training", tmp_path / "prepared"
    for pid in (1, 2, 3):
        mha(src / f"data/mha/{pid}.mha", ct(pid))
    (src / "metadata").mkdir()
    pd.DataFrame({"PatientID": [1, 2, 3], "probCOVID": [1, 0, 1], "probSevere": [1, 0, 0]}).to_csv(
        src / "metadata/reference.csv", index=False)
    prepare("stoic", src, root)
    m = loaded(root, "stoic")
    assert list(m.frame["covid"]) == [1, 0, 1] and list(m.frame["severe"]) == [1, 0, 0]
    img = nib.load(str(m.image_path("2")))
    assert np.allclose(img.header.get_zooms()[:3], (0.7, 0.7, 1.25))
    # LPS origin (-10, -20, -30) becomes RAS (10, 20, -30) with x and y flipped
    assert np.allclose(img.affine[:3, 3], (10.0, 20.0, -30.0)) and img.affine[0, 0] < 0
    np.testing.assert_array_equal(np.asarray(img.dataobj), ct(2))
    assert_verified(root, "stoic")


def test_luna16(tmp_path: Path):
    src, root = tmp_path / "LUNA16", tmp_path / "prepared"
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    data = ct(5, (40, 40, 20))
    mha(src / f"subset0/{uid}.mhd", data, spacing=(0.7, 0.7, 1.25), origin=(-10.0, -20.0, -30.0))
    lungs = np.zeros(data.shape, np.uint8)
    lungs[2:18, :, :] = 3
    lungs[22:38, :, :] = 4
    lungs[19:21, :, :] = 5
    mha(src / f"seg-lungs-LUNA16/{uid}.mhd", lungs, spacing=(0.7, 0.7, 1.25), origin=(-10.0, -20.0, -30.0))
    # a nodule at voxel (20, 10, 5) and three non-nodules; world = origin + index * spacing (LPS)
    world = lambda i, j, k: (-10 + 0.7 * i, -20 + 0.7 * j, -30 + 1.25 * k)  # noqa: E731
    cands = [(*world(20, 10, 5), 1), (*world(0, 0, 0), 0), (*world(39, 39, 19), 0), (*world(5, 5, 5), 0)]
    pd.DataFrame(cands, columns=["coordX", "coordY", "coordZ", "class"]).assign(seriesuid=uid)[
        ["seriesuid", "coordX", "coordY", "coordZ", "class"]].to_csv(src / "candidates_V2.csv", index=False)
    prepare("luna16", src, root, {"negatives_per_series": 2})
    c = loaded(root, "luna16", "candidates")
    assert len(c) == 3 and int(c.frame["nodule"].sum()) == 1  # all positives, two negatives kept
    nodule = c.frame[c.frame["nodule"] == 1].index[0]
    patch = voxels(c, nodule)
    assert patch.shape == (32, 32, 16)
    # the patch centre is the candidate voxel (LPS -> RAS flips x and y, so compare via the affine)
    img = nib.load(str(c.image_path(nodule)))
    centre = img.affine @ np.array([16, 16, 8, 1.0])
    assert np.allclose(centre[:3], (10 - 0.7 * 20, 20 - 0.7 * 10, -30 + 1.25 * 5))
    assert np.asarray(img.dataobj)[16, 16, 8] == data[20, 10, 5]
    v = loaded(root, "luna16", "volumes")
    mask = voxels(v, uid, "mask")
    assert set(np.unique(mask)) == {0, 1} and mask.sum() == 32 * 40 * 20
    assert_verified(root, "luna16")


def test_inspect(tmp_path: Path):
    src, root = tmp_path / "inspect", tmp_path / "prepared"
    ids = ["PE45ab", "PE45cd", "PE99ef"]
    for i, image_id in enumerate(ids):
        nii(src / f"CTPA/{image_id}.nii.gz", ct(10 + i))
    pd.DataFrame({"impression_id": ["1", "2", "3"], "pe_positive_nlp": [True, False, False],
                  "1_month_mortality": [True, False, "Censored"], "6_month_mortality": [True, False, "Censored"],
                  "12_month_mortality": [True, "Censored", "Censored"],
                  "days_to_event": [12, 400, 20], "death": [1, 0, 0]}).to_csv(
        src / "labels_20250611.tsv", sep="\t", index=False)
    pd.DataFrame({"impression_id": ["1", "2", "3"], "image_id": ids, "person_id": ["77", "77", "78"]}).to_csv(
        src / "study_mapping_20250611.tsv", sep="\t", index=False)
    pd.DataFrame({"impression_id": ["1", "2", "3"], "split": ["train", "valid", "test"]}).to_csv(
        src / "splits_20250611.tsv", sep="\t", index=False)
    prepare("inspect", src, root)
    m = loaded(root, "inspect")
    f = m.frame
    assert list(f["patient_id"]) == ["77", "77", "78"] and list(f["split"]) == ["train", "val", "test"]
    assert list(f["pe"]) == [1, 0, 0]
    assert (f.loc["PE45ab", "time"], f.loc["PE45ab", "event"]) == (30, 1)
    assert (f.loc["PE45cd", "time"], f.loc["PE45cd", "event"]) == (182, 0)  # alive at 6 months, censored after
    assert (f.loc["PE99ef", "time"], f.loc["PE99ef", "event"]) == (0, 0)
    assert pd.isna(f.loc["PE45cd", "mortality_12m"]) and f.loc["PE45cd", "mortality_6m"] == 0
    assert_verified(root, "inspect")
    # where a release carries time-to-event columns they are used as given
    prepare("inspect", src, tmp_path / "given", {"time_column": "days_to_event", "event_column": "death"})
    g = loaded(tmp_path / "given", "inspect").frame
    assert list(g["time"]) == [12, 400, 20] and list(g["event"]) == [1, 0, 0]
    with pytest.raises(PrepareError, match="no column 'nope'"):
        prepare("inspect", src, tmp_path / "bad", {"time_column": "nope", "event_column": "death"})


def test_cc_ccii(tmp_path: Path):
    from PIL import Image

    src, root = tmp_path / "CC-CCII", tmp_path / "prepared"
    for cls, patient, scan in (("NCP", "1001", "3001"), ("CP", "1002", "3002"), ("Normal", "1003", "3003")):
        for k in range(3):
            folder = src / cls / patient / scan
            folder.mkdir(parents=True, exist_ok=True)
            plane = np.full((7, 8), 10 * k + int(patient[-1]), dtype=np.uint8)
            Image.fromarray(plane).save(folder / f"{k if k < 2 else 10:04d}.png")
    pd.DataFrame({"zip_file": ["COVID19-1.zip", "CP-1.zip", "Normal-1.zip"], "label": ["NCP", "CP", "Normal"],
                  "patient_id": ["1001", "1002", "1003"], "scan_id": ["3001", "3002", "3003"],
                  "n_slice": [3, 3, 3]}).to_csv(src / "unzip_filenames.csv", index=False)
    prepare("cc-ccii", src, root, {"spacing": [0.7, 0.7, 5.0]})
    m = loaded(root, "cc-ccii")
    assert dict(zip(m.frame["patient_id"], m.frame["diagnosis"])) == {"1001": 2, "1002": 1, "1003": 0}
    vol = voxels(m, "1001_3001")
    assert vol.shape == (8, 7, 3) and list(vol[0, 0, :]) == [1, 11, 21]  # slices in numeric order
    assert np.allclose(nib.load(str(m.image_path("1001_3001"))).header.get_zooms()[:3], (0.7, 0.7, 5.0))
    report = verify_root(root, ["cc-ccii"])
    assert report.ok  # 8-bit slices are not HU: the card says so, and verify does not flag them


def test_msd_lung(tmp_path: Path):
    src, root = tmp_path / "msd", tmp_path / "prepared"
    task = src / "Task06_Lung"
    pairs = []
    for i in (1, 3):
        nii(task / f"imagesTr/lung_{i:03d}.nii.gz", ct(i))
        nii(task / f"labelsTr/lung_{i:03d}.nii.gz", seg(seed=i))
        pairs.append({"image": f"./imagesTr/lung_{i:03d}.nii.gz", "label": f"./labelsTr/lung_{i:03d}.nii.gz"})
    (task / "imagesTr/._lung_001.nii.gz").write_bytes(b"macOS resource fork")
    (task / "dataset.json").write_text(json.dumps({"name": "Lung", "labels": {"0": "background", "1": "cancer"},
                                                   "training": pairs, "test": []}))
    prepare("msd-lung", src, root)
    m = loaded(root, "msd-lung")
    assert list(m.frame.index) == ["lung_001", "lung_003"]
    assert m.frame.loc["lung_003", "mask"] == "source/Task06_Lung/labelsTr/lung_003.nii.gz"
    assert_verified(root, "msd-lung")


def test_covid19_20(tmp_path: Path):
    src, root = tmp_path / "COVID-19-20_v2", tmp_path / "prepared"
    for name in ("volume-covid19-A-0003", "volume-covid19-A-0011_day000", "volume-covid19-A-0011_day005"):
        nii(src / f"Train/{name}_ct.nii.gz", ct(len(name)))
        nii(src / f"Train/{name}_seg.nii.gz", seg())
    prepare("covid19-20", src, root)
    m = loaded(root, "covid19-20")
    assert m.frame.loc["volume-covid19-A-0011_day005", "patient_id"] == "covid19-A-0011"
    assert m.frame["patient_id"].nunique() == 2
    assert_verified(root, "covid19-20")


def test_segthor(tmp_path: Path):
    src, root = tmp_path / "segthor", tmp_path / "prepared"
    for p in ("Patient_01", "Patient_02"):
        nii(src / f"train/{p}/{p}.nii.gz", ct(3))
        nii(src / f"train/{p}/GT.nii.gz", seg(values=(1, 2, 3, 4)))
    prepare("segthor", src, root)
    m = loaded(root, "segthor")
    assert list(m.frame.index) == ["Patient_01", "Patient_02"]
    assert m.frame.loc["Patient_02", "mask"] == "source/train/Patient_02/GT.nii.gz"
    assert_verified(root, "segthor")


def test_btcv(tmp_path: Path):
    src, root = tmp_path / "btcv", tmp_path / "prepared"
    for n in ("0001", "0002"):
        nii(src / f"RawData/Training/img/img{n}.nii.gz", ct(int(n)))
        nii(src / f"RawData/Training/label/label{n}.nii.gz", seg(values=tuple(range(1, 14))))
    prepare("btcv", src, root)
    m = loaded(root, "btcv")
    assert m.frame.loc["img0002", "mask"] == "source/RawData/Training/label/label0002.nii.gz"
    assert_verified(root, "btcv")


def test_covid19_ct_seg(tmp_path: Path):
    src, root = tmp_path / "covid-ct-seg", tmp_path / "prepared"
    for name in ("coronacases_001", "radiopaedia_4_85506_1", "radiopaedia_4_85506_3"):
        nii(src / f"COVID-19-CT-Seg_20cases/{name}.nii.gz", ct(9))
        nii(src / f"Lung_and_Infection_Mask/{name}.nii.gz", seg(values=(1, 2, 3)))
    prepare("covid19-ct-seg", src, root)
    m = loaded(root, "covid19-ct-seg")
    assert m.frame.loc["radiopaedia_4_85506_3", "patient_id"] == "radiopaedia_4_85506"
    assert m.frame.loc["coronacases_001", "patient_id"] == "coronacases_001"
    assert_verified(root, "covid19-ct-seg")


def test_fumpe(tmp_path: Path):
    from scipy.io import savemat

    src, root = tmp_path / "FUMPE", tmp_path / "prepared"
    hu = ct(4)
    dicom_series(src / "CT_scans/PAT001", hu, reverse_instances=True)
    mask_xyz = np.zeros(SHAPE, np.uint8)
    mask_xyz[2:4, 1:3, 1] = 1  # embolus on the second slice from the bottom
    # the MATLAB mask is rows x columns x slices, slices in InstanceNumber order (here top to bottom)
    rows_cols = np.stack([mask_xyz[:, :, k].T for k in range(SHAPE[2])], axis=-1)[:, :, ::-1]
    (src / "GroundTruth").mkdir(parents=True)
    savemat(src / "GroundTruth/PAT001.mat", {"Mask": rows_cols, "spacing": np.ones((1, 3))})
    prepare("fumpe", src, root)
    m = loaded(root, "fumpe")
    img, mask = nib.load(str(m.image_path("PAT001"))), nib.load(str(m.mask_path("PAT001")))
    np.testing.assert_allclose(np.asarray(img.dataobj), hu)  # the stored grid is the DICOM one (LPS); only the affine differs
    np.testing.assert_array_equal(np.asarray(mask.dataobj), mask_xyz)
    assert np.allclose(img.affine, mask.affine)
    assert_verified(root, "fumpe")


def test_rspect(tmp_path: Path):
    src, root = tmp_path / "rsna-str", tmp_path / "prepared"
    from pydicom.uid import generate_uid

    rows = []
    for negative in (1, 0):
        study = generate_uid()
        series = dicom_series(src / "train" / study / "s", ct(negative), study_uid=study)
        (src / "train" / study / "s").rename(src / "train" / study / series)
        rows += [{"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": f"{k}",
                  "pe_present_on_image": 0, "negative_exam_for_pe": negative} for k in range(SHAPE[2])]
    pd.DataFrame(rows).to_csv(src / "train.csv", index=False)
    prepare("rspect", src, root)
    m = loaded(root, "rspect")
    assert sorted(m.frame["pe"].tolist()) == [0, 1]
    study = m.frame[m.frame["pe"] == 1].index[0]
    np.testing.assert_allclose(np.asarray(nib.load(str(m.image_path(study))).dataobj), ct(0))
    assert_verified(root, "rspect")


def test_rider(tmp_path: Path):
    src, root = tmp_path / "RIDER Lung CT", tmp_path / "prepared"
    patient = src / "RIDER-1129164940"
    for n, study in enumerate(("1.000000-NA-12345", "1.000000-NA-67890")):
        hu = ct(20 + n)
        uid = dicom_series(patient / f"01-0{n + 1}-2007-NA-CT/{study}", hu, spacing=(0.7, 0.7, 2.0))
        tumour = np.zeros(SHAPE, np.uint8)
        tumour[3:5, 2:4, 2] = 1
        dicom_seg(patient / f"01-0{n + 1}-2007-NA-CT/300.000000-Segmentation-{n}/1-1.dcm", tumour, uid, 2.0)
    prepare("rider", src, root)
    m = loaded(root, "rider")
    assert list(m.frame.index) == ["RIDER-1129164940_scan1", "RIDER-1129164940_scan2"]
    assert set(m.frame["patient_id"]) == {"RIDER-1129164940"}
    mask = np.asarray(nib.load(str(m.mask_path("RIDER-1129164940_scan2"))).dataobj)
    assert mask.sum() == 4 and mask[3:5, 2:4, 2].all()
    assert_verified(root, "rider")


def test_acdc(tmp_path: Path):
    src, root = tmp_path / "ACDC", tmp_path / "prepared"
    cine = np.stack([np.full(SHAPE, t, np.int16) for t in range(12)], axis=-1)
    for folder, patient in (("training", "patient001"), ("testing", "patient101")):
        base = src / "database" / folder / patient
        nii(base / f"{patient}_4d.nii.gz", cine, spacing=(1.5, 1.5, 10.0))
        (base / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: DCM\nHeight: 184.0\nNbFrame: 12\nWeight: 95.0\n")
        for frame in (1, 12):
            if patient == "patient001":  # training frames are released; the test patient's are cut from the cine
                nii(base / f"{patient}_frame{frame:02d}.nii.gz", cine[..., frame - 1], spacing=(1.5, 1.5, 10.0))
            nii(base / f"{patient}_frame{frame:02d}_gt.nii.gz", seg(values=(1, 2, 3)), spacing=(1.5, 1.5, 10.0))
    prepare("acdc", src, root)
    m = loaded(root, "acdc", "frames")
    assert list(m.frame.index) == ["patient001_frame01", "patient001_frame12", "patient101_frame01", "patient101_frame12"]
    assert list(m.frame["split"]) == ["train", "train", "test", "test"]
    assert m.frame.loc["patient101_frame12", "image"].startswith("images/")
    assert int(voxels(m, "patient101_frame12").max()) == 11  # 1-based ES frame 12 is index 11
    assert_verified(root, "acdc")


def test_ctrg(tmp_path: Path):
    src, root = tmp_path / "ctrg", tmp_path / "prepared"
    base = src / "CTRG-Chest-548K"
    for case in ("1", "2", "3"):
        nii(base / f"volumes/{case}.nii.gz", ct(int(case)))
    (base / "reports.json").write_text(json.dumps({
        "train": [{"id": "1", "findings": "No nodule."}], "val": [{"id": "2", "findings": "Small effusion."}],
        "test": [{"id": "3", "findings": "Emphysema."}]}))
    prepare("ctrg", src, root)
    m = loaded(root, "ctrg")
    assert dict(zip(m.frame["case_id"], m.frame["split"])) == {"1": "train", "2": "val", "3": "test"}
    assert m.frame.loc["2", "findings"] == "Small effusion."
    assert_verified(root, "ctrg")


def test_ahph_is_private(tmp_path: Path):
    with pytest.raises(PrepareError, match="private"):
        prepare("ahph", tmp_path, tmp_path / "out")
    message = private_message("ahph")
    assert "ahph/volumes.csv" in message and "findings, impression" in message


# --------------------------------------------------------------------------- bad input

def test_missing_official_file_is_named(tmp_path: Path):
    (tmp_path / "stoic" / "data" / "mha").mkdir(parents=True)
    with pytest.raises(PrepareError, match=r"metadata/reference.csv"):
        prepare("stoic", tmp_path / "stoic", tmp_path / "out")


def test_missing_label_column_is_named(tmp_path: Path):
    src = tmp_path / "stoic"
    mha(src / "data/mha/1.mha", ct(1))
    (src / "metadata").mkdir()
    pd.DataFrame({"PatientID": [1], "probCOVID": [1]}).to_csv(src / "metadata/reference.csv", index=False)
    with pytest.raises(PrepareError, match=r"reference.csv: missing column\(s\) \['probSevere'\]"):
        prepare("stoic", src, tmp_path / "out")


def test_unknown_option_is_refused(tmp_path: Path):
    with pytest.raises(PrepareError, match="stoic has no option spacing; its options: none"):
        prepare("stoic", tmp_path, tmp_path / "out", {"spacing": [1, 1, 1]})
    with pytest.raises(PrepareError, match="its options: negatives_per_series"):
        prepare("luna16", tmp_path, tmp_path / "out", {"negative_per_series": 3})


def test_refuses_the_demo_root(tmp_path: Path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_text(json.dumps({"synthetic": True}))
    with pytest.raises(PrepareError, match="demo cohort"):
        prepare("segthor", tmp_path, demo)
