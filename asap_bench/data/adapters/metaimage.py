"""MetaImage releases, converted to NIfTI with SimpleITK: STOIC-2021 (.mha) and LUNA16 (.mhd + .raw)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from ..demo import PATCH
from ..io import read_sitk, require_sitk, sitk_array_xyz, sitk_like, write_sitk
from .base import Context, PrepareError, read_table, to_binary


def _convert(ctx: Context, case: str, source) -> str:
    rel, out = ctx.image_path(case)
    if not ctx.reuse(out):
        write_sitk(out, read_sitk(source))
    return rel


def prepare_stoic(ctx: Context) -> dict[str, list[dict]]:
    path = ctx.find("metadata/reference.csv", "reference.csv")
    frame = read_table(path, ["PatientID", "probCOVID", "probSevere"])
    folder = ctx.find("data/mha", "mha", kind="dir")
    rows = []
    for _, r in frame.iterrows():
        case = str(r["PatientID"])
        source = folder / f"{case}.mha"
        if not source.is_file():
            ctx.note(f"{case}: listed in {path.name} but no {source.name}; skipped")
            continue
        rows.append({"case_id": case, "patient_id": case, "image": _convert(ctx, case, source),
                     "covid": to_binary(r["probCOVID"], path, "probCOVID"),
                     "severe": to_binary(r["probSevere"], path, "probSevere")})
    return {"volumes": rows}


LUNA_LUNG = (3, 4)  # left and right lung in seg-lungs-LUNA16; 5 (trachea) is dropped


def _keep_candidates(frame: pd.DataFrame, negatives: int | None) -> pd.DataFrame:
    """All nodule candidates and up to ``negatives`` non-nodule candidates per series, chosen by a hash
    of their coordinates (the same on every machine); None keeps all ~750,000."""
    if negatives is None:
        return frame
    key = frame.apply(lambda r: hashlib.sha256(f"{r.seriesuid}|{r.coordX}|{r.coordY}|{r.coordZ}".encode()).hexdigest(),
                      axis=1)
    frame = frame.assign(_key=key).sort_values(["seriesuid", "_key"])
    negative = frame["class"] == 0
    rank = frame[negative].groupby("seriesuid").cumcount()
    keep = ~negative
    keep[rank.index] = rank < negatives
    return frame[keep].drop(columns="_key")


def _patch(volume: np.ndarray, image, point):
    """A PATCH-sized block centred on a world point (mm, LPS as LUNA16 gives it), padded with -1024,
    as a SimpleITK image placed where the block sits in the scanner frame."""
    sitk = require_sitk()

    centre = np.asarray(image.TransformPhysicalPointToContinuousIndex([float(p) for p in point]))
    start = np.round(centre).astype(int) - np.asarray(PATCH) // 2
    block = np.full(PATCH, -1024, dtype=np.int16)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.asarray(PATCH), volume.shape)
    if np.all(hi > lo):
        block[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = volume[tuple(slice(a, b) for a, b in zip(lo, hi))]
    patch = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(block, (2, 1, 0))))
    patch.SetSpacing(image.GetSpacing())
    patch.SetDirection(image.GetDirection())
    patch.SetOrigin(image.TransformIndexToPhysicalPoint([int(s) for s in start]))
    return patch


def prepare_luna16(ctx: Context) -> dict[str, list[dict]]:
    candidates_path = ctx.find("candidates_V2.csv", "CSVFILES/candidates_V2.csv", "candidates_V2/candidates_V2.csv")
    candidates = read_table(candidates_path, ["seriesuid", "coordX", "coordY", "coordZ", "class"])
    negatives = ctx.options.get("negatives_per_series", 20)
    candidates = _keep_candidates(candidates, None if negatives in (None, -1) else int(negatives))
    series = {p.stem: p for p in ctx.glob("subset*/**/*.mhd", "LUNA16 series (subset0..subset9/<seriesuid>.mhd)")}
    masks = ctx.source / "seg-lungs-LUNA16"
    volumes, patches = [], []
    for uid, path in series.items():
        image = read_sitk(path)
        rel = _convert(ctx, uid, path)
        mask_file = masks / f"{uid}.mhd"
        if mask_file.is_file():
            mask_rel, mask_out = ctx.mask_path(uid)
            if not ctx.reuse(mask_out):
                lung = np.isin(sitk_array_xyz(read_sitk(mask_file)), LUNA_LUNG).astype(np.uint8)
                if lung.shape != tuple(image.GetSize()):
                    raise PrepareError(f"{mask_file}: size {lung.shape} differs from its CT {tuple(image.GetSize())}")
                write_sitk(mask_out, sitk_like(lung, image))
            volumes.append({"case_id": uid, "patient_id": uid, "image": rel, "mask": mask_rel})
        own = candidates[candidates["seriesuid"] == uid]
        if own.empty:
            continue
        volume = sitk_array_xyz(image)
        for k, (_, c) in enumerate(own.iterrows(), start=1):
            case = f"{uid}_cand{k}"
            patch_rel, patch_out = ctx.image_path(case)
            if not ctx.reuse(patch_out):
                write_sitk(patch_out, _patch(volume, image, (c["coordX"], c["coordY"], c["coordZ"])))
            patches.append({"case_id": case, "patient_id": uid, "image": patch_rel, "nodule": int(c["class"])})
    if not volumes:
        ctx.note(f"{masks}: no lung masks found; the volumes table needs seg-lungs-LUNA16")
    return {"candidates": patches, "volumes": volumes}

