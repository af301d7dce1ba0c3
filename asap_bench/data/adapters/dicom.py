"""DICOM releases, each series converted to one NIfTI volume in HU with SimpleITK:
RSPECT (exam-level PE labels), FUMPE (MATLAB masks) and RIDER Lung CT (DICOM SEG tumour masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import FormatError, dicom_series, load_mat_array, require_sitk, sitk_like, write_sitk
from .base import Context, PrepareError, read_table, to_binary


def _series_to_nifti(ctx: Context, case: str, folder: Path):
    """(manifest path, SimpleITK image) of the series in ``folder``; converts unless resumable."""
    rel, out = ctx.image_path(case)
    image = dicom_series(folder)
    if not ctx.reuse(out):
        write_sitk(out, image)
    return rel, image


def prepare_rspect(ctx: Context) -> dict[str, list[dict]]:
    """One row per study (the largest series of the study folder); pe = 1 - negative_exam_for_pe."""
    path = ctx.find("train.csv")
    frame = read_table(path, ["StudyInstanceUID", "SeriesInstanceUID", "negative_exam_for_pe"])
    exams = frame.groupby("StudyInstanceUID")["negative_exam_for_pe"].agg(["min", "max"])
    conflicting = exams.index[exams["min"] != exams["max"]]
    if len(conflicting):
        raise PrepareError(f"{path}: negative_exam_for_pe differs within study {conflicting[0]!r}; it is exam-level")
    train = ctx.find("train", kind="dir")
    rows = []
    for study, labels in exams.iterrows():
        folder = train / str(study)
        if not folder.is_dir():
            ctx.note(f"{study}: in {path.name} but no folder train/{study}; skipped")
            continue
        rel, _ = _series_to_nifti(ctx, str(study), folder)
        negative = to_binary(labels["min"], path, "negative_exam_for_pe")
        rows.append({"case_id": str(study), "patient_id": str(study), "image": rel, "pe": 1 - negative})
    return {"volumes": rows}


def _instance_order(files: list[str]) -> list[int]:
    """InstanceNumber of each file (the order a MATLAB mask's slices follow)."""
    sitk = require_sitk()

    numbers = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        numbers.append(int(reader.GetMetaData("0020|0013").strip()) if reader.HasMetaDataKey("0020|0013") else 0)
    return numbers


def prepare_fumpe(ctx: Context) -> dict[str, list[dict]]:
    """CT_scans/PATxxx (DICOM) with GroundTruth/PATxxx.mat, a rows x columns x slices mask whose
    slices follow the DICOM InstanceNumber; they are put in the volume's (position) order here."""
    sitk = require_sitk()

    scans = ctx.find("CT_scans", kind="dir")
    truth = ctx.find("GroundTruth", kind="dir")
    variable = ctx.options.get("mask_variable")
    rows = []
    for folder in sorted(p for p in scans.iterdir() if p.is_dir()):
        case = folder.name
        mat = truth / f"{case}.mat"
        if not mat.is_file():
            ctx.note(f"{case}: no GroundTruth/{case}.mat; skipped")
            continue
        rel, image = _series_to_nifti(ctx, case, folder)
        reader = sitk.ImageSeriesReader()
        files = list(reader.GetGDCMSeriesFileNames(str(folder)))
        mask = np.asarray(load_mat_array(mat, variable, prefer=("Mask", "GT", "mask", "gt")))
        if mask.ndim == 2:
            mask = mask[..., None]
        size = tuple(image.GetSize())
        if mask.shape != (size[1], size[0], size[2]):
            raise FormatError(f"{mat}: mask shape {mask.shape} does not match its CT (rows, columns, slices) "
                              f"{(size[1], size[0], size[2])}")
        order = np.argsort(np.argsort(_instance_order(files)))  # rank of each position-ordered slice by instance
        xyz = np.stack([mask[:, :, k].T for k in order], axis=-1)
        mask_rel, mask_out = ctx.mask_path(case)
        if not ctx.reuse(mask_out):
            write_sitk(mask_out, sitk_like((xyz > 0).astype(np.uint8), image))
        rows.append({"case_id": case, "patient_id": case, "image": rel, "mask": mask_rel})
    return {"volumes": rows}


def _seg_mask(seg_path: Path, image) -> np.ndarray:
    """A DICOM SEG (all segments merged into 1) on the grid of ``image``, each frame placed by its position."""
    import pydicom

    seg = pydicom.dcmread(str(seg_path))
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    mask = np.zeros(tuple(image.GetSize()), dtype=np.uint8)
    for k, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        index = image.TransformPhysicalPointToIndex(position)
        z = int(index[2])
        if not 0 <= z < mask.shape[2]:
            raise FormatError(f"{seg_path}: frame {k} lies outside its CT (slice {z} of {mask.shape[2]})")
        mask[:, :, z] |= (frames[k].T > 0).astype(np.uint8)
    return mask


def prepare_rider(ctx: Context) -> dict[str, list[dict]]:
    """RIDER-<id>/<study>/<series>: the CT series each DICOM SEG references, scans numbered by study order."""
    try:
        import pydicom
    except ImportError:
        raise ImportError("reading RIDER's DICOM SEG masks needs pydicom: pip install pydicom") from None
    sitk = require_sitk()

    rows = []
    for patient in ctx.glob("RIDER-*", "RIDER patient folders (RIDER-<id>)"):
        if not patient.is_dir():
            continue
        series_dirs: dict[str, Path] = {}
        segs: list[tuple[Path, str]] = []
        for dcm in sorted(patient.rglob("*.dcm")):
            header = pydicom.dcmread(str(dcm), stop_before_pixels=True)
            if header.get("Modality") == "SEG":
                try:
                    referenced = header.ReferencedSeriesSequence[0].SeriesInstanceUID
                except (AttributeError, IndexError):
                    raise FormatError(f"{dcm}: DICOM SEG without ReferencedSeriesSequence") from None
                segs.append((dcm, str(referenced)))
            elif header.get("Modality") == "CT":
                series_dirs.setdefault(str(header.SeriesInstanceUID), dcm.parent)
        if not segs:
            ctx.note(f"{patient.name}: no DICOM SEG found; skipped")
            continue
        ordered = sorted(segs, key=lambda s: str(series_dirs.get(s[1], "")))
        for n, (seg_path, uid) in enumerate(ordered, start=1):
            if uid not in series_dirs:
                raise PrepareError(f"{seg_path}: references CT series {uid}, which is not under {patient}")
            case = f"{patient.name}_scan{n}"
            rel, out = ctx.image_path(case)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(reader.GetGDCMSeriesFileNames(str(series_dirs[uid]), uid)))
            image = reader.Execute()
            if not ctx.reuse(out):
                write_sitk(out, image)
            mask_rel, mask_out = ctx.mask_path(case)
            if not ctx.reuse(mask_out):
                write_sitk(mask_out, sitk_like(_seg_mask(seg_path, image), image))
            rows.append({"case_id": case, "patient_id": patient.name, "image": rel, "mask": mask_rel})
    return {"volumes": rows}

