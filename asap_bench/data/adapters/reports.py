"""Report-paired chest CT: CT-RATE, RadGenome-ChestCT (VQA on CT-RATE), CTRG-Chest, RAD-ChestCT."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..cards import load_card
from ..io import FormatError, write_nifti
from .base import Context, PrepareError, read_table, to_binary

# --------------------------------------------------------------------------- CT-RATE

CT_RATE_PARTS = {"train": ("train", "train", "train"), "valid": ("valid", "validation", "test")}  # folder, csv, split
CT_RATE_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)$")


def _parse_pair(value, path: Path, column: str) -> float:
    """CT-RATE's XYSpacing is written '[0.75, 0.75]'; both entries are equal in the release."""
    try:
        parsed = ast.literal_eval(str(value)) if isinstance(value, str) else value
        return float(parsed[0] if isinstance(parsed, (list, tuple)) else parsed)
    except (ValueError, SyntaxError, TypeError, IndexError):
        raise PrepareError(f"{path}: column {column!r} holds {value!r}; expected a spacing like '[0.75, 0.75]'") from None


def _ct_rate_volume(ctx: Context, case: str, path: Path, meta: dict) -> str:
    """The volume in place when its header carries the metadata's HU scaling and spacing, else a fixed copy."""
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for a damaged header
        raise FormatError(f"{path}: not a readable NIfTI ({err})") from None
    slope, inter = image.header.get_slope_inter()
    slope, inter = (1.0 if slope is None else float(slope)), (0.0 if inter is None else float(inter))
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    want = (meta["xy"], meta["xy"], meta["z"])
    if np.allclose((slope, inter), (meta["slope"], meta["intercept"]), atol=1e-3) and np.allclose(zooms, want, atol=1e-3):
        return ctx.ref(path)
    rel, out = ctx.image_path(case)
    if not ctx.reuse(out):
        stored = np.asarray(image.dataobj.get_unscaled(), dtype=np.float32)
        if stored.min() < -200 and meta["intercept"] <= -500:  # already in HU: only the spacing was wrong
            hu = np.round(stored * slope + inter).astype(np.int16)
        else:
            hu = np.round(stored * meta["slope"] + meta["intercept"]).astype(np.int16)
        direction = image.affine[:3, :3] / np.linalg.norm(image.affine[:3, :3], axis=0)
        affine = np.eye(4)
        affine[:3, :3] = direction @ np.diag(want)
        affine[:3, 3] = image.affine[:3, 3]
        write_nifti(out, hu, affine)
    return rel


def _ct_rate_volumes(ctx: Context) -> dict[str, Path]:
    """Volume name -> file; the re-released ``*_fixed`` trees (corrected headers) win over the originals."""
    found: dict[str, Path] = {}
    for folder in ("train", "valid", "train_fixed", "valid_fixed"):
        for path in sorted((ctx.source / "dataset" / folder).glob("**/*.nii.gz")):
            found[path.name[: -len(".nii.gz")]] = path
    if not found:
        raise PrepareError(f"{ctx.source}: no volumes under dataset/{{train,valid}}[_fixed]/ "
                           "(see `asap-bench datasets show ct-rate` for the layout)")
    return found


def prepare_ct_rate(ctx: Context) -> dict[str, list[dict]]:
    labels_spec = load_card("ct-rate").table("volumes").labels["abnormality"].columns
    volumes = _ct_rate_volumes(ctx)
    rows, fixed = [], 0
    for part, (folder, csv_part, split) in CT_RATE_PARTS.items():
        label_path = ctx.find(f"dataset/multi_abnormality_labels/{part}_predicted_labels.csv",
                              f"multi_abnormality_labels/{part}_predicted_labels.csv")
        report_path = ctx.find(f"dataset/radiology_text_reports/{csv_part}_reports.csv",
                               f"radiology_text_reports/{csv_part}_reports.csv")
        meta_path = ctx.find(f"dataset/metadata/{csv_part}_metadata.csv", f"metadata/{csv_part}_metadata.csv")
        labels = read_table(label_path, ["VolumeName", *labels_spec]).set_index("VolumeName")
        reports = read_table(report_path, ["VolumeName", "Findings_EN", "Impressions_EN"]).set_index("VolumeName")
        meta = read_table(meta_path, ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"])
        meta = meta.drop_duplicates("VolumeName").set_index("VolumeName")
        for volume_name, label_row in labels.iterrows():
            case = str(volume_name).removesuffix(".nii.gz")
            match = CT_RATE_NAME.match(case)
            if not match:
                raise PrepareError(f"{label_path}: VolumeName {volume_name!r} is not split_patient_scan_reconstruction")
            if case not in volumes:
                ctx.note(f"{case}: listed in {label_path.name} but no volume under dataset/{folder}[_fixed]/; skipped")
                continue
            if volume_name not in meta.index or volume_name not in reports.index:
                which = "metadata" if volume_name not in meta.index else "reports"
                raise PrepareError(f"{meta_path if which == 'metadata' else report_path}: no row for {volume_name!r}")
            m = meta.loc[volume_name]
            info = {"slope": float(m["RescaleSlope"]), "intercept": float(m["RescaleIntercept"]),
                    "xy": _parse_pair(m["XYSpacing"], meta_path, "XYSpacing"),
                    "z": float(m["ZSpacing"])}
            image = _ct_rate_volume(ctx, case, volumes[case], info)
            fixed += image.startswith("images/")
            report = reports.loc[volume_name]
            row = {"case_id": case, "patient_id": f"{match.group(1)}_{match.group(2)}", "split": split,
                   "image": image, "findings": report["Findings_EN"], "impression": report["Impressions_EN"]}
            row.update({c: to_binary(label_row[c], label_path, c) for c in labels_spec})
            rows.append(row)
    if fixed:
        ctx.note(f"{fixed} volume(s) rewritten under images/ with the metadata's rescale and spacing")
    return {"volumes": rows}


# --------------------------------------------------------------------------- RadGenome-ChestCT

# File -> (qa_type, column holding the finding, column holding the answer); questions follow one template per type.
RADGENOME_VQA = {
    "abnormality": ("Anatomy", "Abnormality"),
    "location": ("Abnormality", "Anatomy"),
    "presence": ("Finding", "Presence"),
    "size": ("Abnormality", "Size"),
}
RADGENOME_QUESTIONS = {
    "abnormality": "What abnormalities are seen in the {x}?",
    "location": "Where is the {x} located?",
    "presence": "Is there {x}?",
    "size": "What is the size of the {x}?",
    "disorder": "What disorders does this patient have?",
}
RADGENOME_PARTS = {"train": "train", "validation": "test"}


def _radgenome_images(ctx: Context) -> dict[str, str]:
    """Volume name -> manifest path: the prepared CT-RATE root beside this one, else RadGenome's own volumes."""
    ct_rate = ctx.root / "ct-rate" / "volumes.csv"
    if ct_rate.is_file():
        frame = pd.read_csv(ct_rate, usecols=["case_id", "image"], dtype=str)
        return {c: f"../ct-rate/{i}" for c, i in zip(frame["case_id"], frame["image"])}
    own = sorted(ctx.source.glob("dataset/*_preprocessed/**/*.nii.gz"))
    if not own:
        raise PrepareError(f"RadGenome-ChestCT questions point at CT-RATE volumes: prepare ct-rate into {ctx.root} first "
                           f"(no {ct_rate}), or download RadGenome's dataset/*_preprocessed volumes into {ctx.source}")
    return {p.name[: -len(".nii.gz")]: ctx.ref(p) for p in own}


def prepare_radgenome(ctx: Context) -> dict[str, list[dict]]:
    images = _radgenome_images(ctx)
    rows, missing = [], set()
    for part, split in RADGENOME_PARTS.items():
        sources = {t: ctx.find(f"dataset/radgenome_files/{part}_vqa_{t}.csv", f"radgenome_files/{part}_vqa_{t}.csv")
                   for t in RADGENOME_VQA}
        sources["disorder"] = ctx.find(f"dataset/radgenome_files/{part}_case_disorders.csv",
                                       f"radgenome_files/{part}_case_disorders.csv")
        counters: dict[str, int] = {}
        for qa_type, path in sources.items():
            if qa_type == "disorder":
                frame = read_table(path, ["Volumename"])
                answer_cols = [c for c in frame.columns if c != "Volumename" and not c.startswith("Unnamed")]
                if len(answer_cols) != 1:
                    raise PrepareError(f"{path}: expected Volumename and one disorders column, found {list(frame.columns)}")
                subject, answer = None, answer_cols[0]
            else:
                subject, answer = RADGENOME_VQA[qa_type]
                frame = read_table(path, ["Volumename", "Anatomy", subject, answer])
            for _, r in frame.iterrows():
                volume = str(r["Volumename"]).removesuffix(".nii.gz")
                if volume not in images:
                    missing.add(volume)
                    continue
                if pd.isna(r[answer]):
                    continue
                x = "whole scan" if subject is None or pd.isna(r[subject]) else str(r[subject]).lower()
                k = counters[volume] = counters.get(volume, 0) + 1
                rows.append({"case_id": f"{volume}_q{k}", "patient_id": "_".join(volume.split("_")[:2]),
                             "image": images[volume], "split": split, "qa_type": qa_type,
                             "question": RADGENOME_QUESTIONS[qa_type].format(x=x), "answer": str(r[answer]).strip()})
    if missing:
        ctx.note(f"{len(missing)} volume(s) named in the VQA files have no CT-RATE volume; their questions are skipped")
    return {"vqa": rows}


# --------------------------------------------------------------------------- CTRG-Chest

CTRG_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def prepare_ctrg(ctx: Context) -> dict[str, list[dict]]:
    path = ctx.find("CTRG-Chest-548K/reports.json", "reports.json")
    base = path.parent
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise PrepareError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(content, dict) or not set(content) & set(CTRG_SPLITS):
        raise PrepareError(f"{path}: expected {{'train': [...], 'val': [...], 'test': [...]}} with one "
                           f"{{'id', 'findings'}} entry per volume")
    rows = []
    for part, entries in content.items():
        if part not in CTRG_SPLITS:
            raise PrepareError(f"{path}: unknown split {part!r}; expected {sorted(set(CTRG_SPLITS))}")
        for entry in entries:
            case = str(entry.get("id", "")).strip()
            text = next((entry[k] for k in ("findings", "finding", "report") if k in entry), None)
            if not case or text is None:
                raise PrepareError(f"{path}: split {part!r} entry {entry!r} lacks 'id' or 'findings'")
            volume = base / "volumes" / f"{case}.nii.gz"
            if not volume.is_file():
                raise PrepareError(f"{volume}: volume of {path.name} entry {case!r} is missing")
            rows.append({"case_id": case, "patient_id": str(entry.get("patient_id", case)), "split": CTRG_SPLITS[part],
                         "image": ctx.ref(volume), "findings": str(text)})
    return {"volumes": rows}


# --------------------------------------------------------------------------- RAD-ChestCT

# CT-RATE label -> RAD-ChestCT abnormalities (any location) whose OR it is.
RAD_CHESTCT_MAP = {
    "Medical material": ("catheter_or_port", "chest_tube", "gi_tube", "tracheal_tube", "hardware", "stent", "staple",
                         "clip", "suture", "sternotomy", "heart_valve_replacement", "pacemaker_or_defib"),
    "Arterial wall calcification": ("atherosclerosis", "calcification*aorta"),
    "Cardiomegaly": ("cardiomegaly",),
    "Pericardial effusion": ("pericardial_effusion",),
    "Hiatal hernia": ("hernia",),
    "Lymphadenopathy": ("lymphadenopathy",),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelectasis",),
    "Lung nodule": ("nodule", "nodulegr1cm", "scattered_nod"),
    "Lung opacity": ("opacity", "groundglass"),
    "Pulmonary fibrotic sequela": ("fibrosis", "scarring"),
    "Pleural effusion": ("pleural_effusion",),
    "Consolidation": ("consolidation",),
    "Bronchiectasis": ("bronchiectasis",),
    "Interlobular septal thickening": ("septal_thickening",),
    "Peribronchial thickening": ("bronchial_wall_thickening",),
}
RAD_CHESTCT_SPACING = (0.8, 0.8, 0.8)  # the release's volumes are resampled to 0.8 mm isotropic


def _rad_columns(columns: list[str], patterns: tuple[str, ...]) -> list[str]:
    """Label columns '<abnormality>*<location>' matching an abnormality (and location, when given)."""
    chosen = []
    for column in columns:
        abnormality, _, location = column.partition("*")
        for pattern in patterns:
            want, _, where = pattern.partition("*")
            if abnormality == want and (not where or where in location):
                chosen.append(column)
                break
    return chosen


def prepare_rad_chestct(ctx: Context) -> dict[str, list[dict]]:
    labels = load_card("rad-chestct").table("volumes").labels["abnormality"].columns
    spacing = tuple(float(s) for s in ctx.options.get("spacing") or RAD_CHESTCT_SPACING)
    tables = [p for part in ("train", "valid", "test")
              for p in [ctx.source / f"img{part}_Abnormality_and_Location_Labels.csv"] if p.is_file()]
    if not tables:
        ctx.find("imgtrain_Abnormality_and_Location_Labels.csv")
    arrays = {p.name[: -len(".npz")]: p for p in ctx.source.rglob("*.npz")}
    rows = []
    for path in tables:
        frame = read_table(path, ["NoteAcc_DEID"])
        columns = [c for c in frame.columns if "*" in c]
        mapping = {label: _rad_columns(columns, RAD_CHESTCT_MAP[label]) for label in labels}
        for label, cols in mapping.items():
            if not cols:
                ctx.note(f"{path.name}: no column for {label!r} (looked for {RAD_CHESTCT_MAP[label]}); left empty")
        for _, r in frame.iterrows():
            case = str(r["NoteAcc_DEID"]).removesuffix(".npz")
            if case not in arrays:
                ctx.note(f"{case}: listed in {path.name} but no {case}.npz; skipped")
                continue
            rel, out = ctx.image_path(case)
            if not ctx.reuse(out):
                try:
                    with np.load(arrays[case]) as npz:
                        if "ct" not in npz:
                            raise FormatError(f"{arrays[case]}: no array 'ct'; it holds {list(npz.keys())}")
                        volume = np.asarray(npz["ct"])
                except (ValueError, OSError, EOFError) as err:
                    raise FormatError(f"{arrays[case]}: not a readable .npz ({err})") from None
                if volume.ndim != 3:
                    raise FormatError(f"{arrays[case]}: 'ct' has shape {volume.shape}; expected (slices, rows, columns)")
                # (slices, rows, columns), slices from superior to inferior, rows anterior to posterior,
                # columns right to left (the DICOM image plane); as (x, y, z) in RAS: x = columns reversed.
                xyz = np.transpose(volume, (2, 1, 0))[::-1, ::-1, ::-1].astype(np.int16)
                write_nifti(out, np.ascontiguousarray(xyz), np.diag([*spacing, 1.0]))
            row = {"case_id": case, "patient_id": case, "image": rel}
            for label, cols in mapping.items():
                row[label] = int(pd.to_numeric(r[cols], errors="coerce").fillna(0).max() > 0) if cols else None
            rows.append(row)
    return {"volumes": rows}
