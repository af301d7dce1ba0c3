"""NIfTI segmentation releases, referenced in place: MSD Task06 Lung, COVID-19-20, SegTHOR, BTCV,
COVID-19-CT-Seg, and ACDC (cine MRI, end-diastole and end-systole frames)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io import FormatError, write_nifti
from .base import Context, PrepareError


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def _row(ctx: Context, case: str, patient: str, image: Path, mask: Path, **extra) -> dict:
    if not mask.is_file():
        raise PrepareError(f"{mask}: the label of {image.name} is missing")
    return {"case_id": case, "patient_id": patient, "image": ctx.ref(image), "mask": ctx.ref(mask), **extra}


def prepare_msd_lung(ctx: Context) -> dict[str, list[dict]]:
    """Task06_Lung/dataset.json lists the labelled pairs (and so skips macOS '._' shadow files)."""
    path = ctx.find("Task06_Lung/dataset.json", "dataset.json")
    base = path.parent
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        pairs = [(entry["image"], entry["label"]) for entry in spec["training"]]
    except (ValueError, KeyError, TypeError) as err:
        raise PrepareError(f"{path}: expected a Decathlon dataset.json with 'training': "
                           f"[{{'image', 'label'}}] ({err!r})") from None
    rows = []
    for image, label in pairs:
        image_path, label_path = Path(os.path.normpath(base / image)), Path(os.path.normpath(base / label))
        if not image_path.is_file():
            raise PrepareError(f"{image_path}: listed in {path} but missing")
        case = _stem(image_path)
        rows.append(_row(ctx, case, case, image_path, label_path))
    return {"volumes": rows}


COVID19_20 = re.compile(r"^volume-(covid19-A-\d+)(.*)_ct$")


def prepare_covid19_20(ctx: Context) -> dict[str, list[dict]]:
    rows = []
    for image in ctx.glob("**/Train/volume-covid19-A-*_ct.nii.gz", "COVID-19-20 training volumes"):
        match = COVID19_20.match(_stem(image))
        if not match:
            continue
        case = _stem(image).removesuffix("_ct")
        rows.append(_row(ctx, case, match.group(1), image, image.with_name(f"{case}_seg.nii.gz")))
    return {"volumes": rows}


def prepare_segthor(ctx: Context) -> dict[str, list[dict]]:
    rows = []
    for folder in ctx.glob("**/train/Patient_*", "SegTHOR patient folders"):
        if folder.is_dir():
            rows.append(_row(ctx, folder.name, folder.name, folder / f"{folder.name}.nii.gz", folder / "GT.nii.gz"))
    return {"volumes": rows}


def prepare_btcv(ctx: Context) -> dict[str, list[dict]]:
    rows = []
    for image in ctx.glob("**/Training/img/img*.nii.gz", "BTCV training volumes (RawData/Training/img)"):
        case = _stem(image)
        label = image.parent.parent / "label" / f"label{case.removeprefix('img')}.nii.gz"
        rows.append(_row(ctx, case, case, image, label))
    return {"volumes": rows}


def prepare_covid19_ct_seg(ctx: Context) -> dict[str, list[dict]]:
    """Masks from Lung_and_Infection_Mask (1 left lung, 2 right lung, 3 infection); Radiopaedia
    cases ``radiopaedia_<case>_<study>_<n>`` share a patient across their trailing number."""
    images = ctx.find("COVID-19-CT-Seg_20cases", kind="dir")
    masks = ctx.find("Lung_and_Infection_Mask", kind="dir")
    rows = []
    for image in sorted(images.glob("*.nii.gz")):
        case = _stem(image)
        patient = re.sub(r"_\d+$", "", case) if case.startswith("radiopaedia_") else case
        rows.append(_row(ctx, case, patient, image, masks / image.name))
    if not rows:
        raise PrepareError(f"{images}: no .nii.gz volumes")
    ctx.note("the Radiopaedia volumes are stored in [0, 255], not HU; the coronacases volumes are in HU")
    return {"volumes": rows}


def _acdc_info(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise PrepareError(f"{path}: not readable ({err})") from None
    info = dict(line.split(":", 1) for line in lines if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    if "ED" not in info or "ES" not in info:
        raise PrepareError(f"{path}: expected 'ED: <frame>' and 'ES: <frame>' lines")
    return info


def _acdc_frame(ctx: Context, patient_dir: Path, frame: int) -> str:
    """The frame's own 3D file when released, else that frame cut from the 4D cine (1-based frame number)."""
    own = patient_dir / f"{patient_dir.name}_frame{frame:02d}.nii.gz"
    if own.is_file():
        return ctx.ref(own)
    cine = patient_dir / f"{patient_dir.name}_4d.nii.gz"
    if not cine.is_file():
        raise PrepareError(f"{patient_dir}: neither {own.name} nor {cine.name}")
    rel, out = ctx.image_path(f"{patient_dir.name}_frame{frame:02d}")
    if not ctx.reuse(out):
        try:
            image = nib.load(str(cine))
            data = np.asarray(image.dataobj[..., frame - 1])
        except (IndexError, OSError, ValueError) as err:
            raise FormatError(f"{cine}: frame {frame} not readable ({err})") from None
        write_nifti(out, data, image.affine)
    return rel


def prepare_acdc(ctx: Context) -> dict[str, list[dict]]:
    rows = []
    for folder, split in (("training", "train"), ("testing", "test")):
        base = next((p for p in (ctx.source / "database" / folder, ctx.source / folder) if p.is_dir()), None)
        if base is None:
            continue
        for patient_dir in sorted(p for p in base.glob("patient*") if p.is_dir()):
            info = _acdc_info(patient_dir / "Info.cfg")
            for key in ("ED", "ES"):
                frame = int(info[key])
                case = f"{patient_dir.name}_frame{frame:02d}"
                gt = patient_dir / f"{case}_gt.nii.gz"
                if not gt.is_file():
                    ctx.note(f"{gt}: no ground truth; {case} skipped")
                    continue
                rows.append({"case_id": case, "patient_id": patient_dir.name, "split": split,
                             "image": _acdc_frame(ctx, patient_dir, frame), "mask": ctx.ref(gt)})
    if not rows:
        ctx.find("database/training", "training", kind="dir")
    return {"frames": rows}
