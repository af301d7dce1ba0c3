"""The synthetic demo cohort: every dataset card's tables, filled with drawn phantoms.

``build_demo`` writes ``<out>/<dataset>/<table>.csv`` for all datasets in the
real on-disk format, the volumes as ``images/<case_id>.nii.gz`` and masks as
``masks/<case_id>.nii.gz``, then ``<out>/demo.json`` last, so a folder without
the marker is never taken as complete. Output is byte-identical between builds:
every random draw comes from a generator seeded by a hash of (dataset, patient,
scan), files carry no time stamps, and gzip headers have mtime 0.

Each label is the presence of a pattern drawn in that image (report-mined
labels also carry ``LABEL_NOISE`` flips, as real ones do); reports and VQA
answers are written from what was drawn. Datasets are planned by one small
function each (who, how many scans, which findings, which split), and rendered
by one generic mechanism.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

import nibabel as nib
import numpy as np
import pandas as pd

from .. import files
from . import phantom as ph
from .cards import dataset_names, load_card
from .phantom import T, Scanner

GENERATOR_VERSION = 4
SEED = 20240531
MARKER = "demo.json"
LABEL_NOISE = 0.01  # share of report-mined labels flipped (CT-RATE, AHPH, RAD-ChestCT)
PATCH = (32, 32, 16)  # LUNA16 candidate patches, voxels
ZERO = (0.0, 0.0, 0.0)

CT_RATE_LABELS = tuple(load_card("ct-rate").table("volumes").labels["abnormality"].columns)

# Base prevalence and loadings on two latent factors per patient (age/vascular, lung
# disease burden), so labels co-occur as in real cohorts.
PREVALENCE = {
    "Medical material": 0.12, "Arterial wall calcification": 0.30, "Cardiomegaly": 0.12,
    "Pericardial effusion": 0.08, "Coronary artery wall calcification": 0.25, "Hiatal hernia": 0.12,
    "Lymphadenopathy": 0.25, "Emphysema": 0.20, "Atelectasis": 0.25, "Lung nodule": 0.38,
    "Lung opacity": 0.33, "Pulmonary fibrotic sequela": 0.25, "Pleural effusion": 0.12,
    "Mosaic attenuation pattern": 0.08, "Peribronchial thickening": 0.10, "Consolidation": 0.15,
    "Bronchiectasis": 0.10, "Interlobular septal thickening": 0.08,
}
LOADING = {
    "Medical material": (0.5, 0.3), "Arterial wall calcification": (1.2, 0.0), "Cardiomegaly": (0.6, 0.4),
    "Pericardial effusion": (0.3, 0.5), "Coronary artery wall calcification": (1.2, 0.0),
    "Hiatal hernia": (0.5, 0.0), "Lymphadenopathy": (0.2, 0.7), "Emphysema": (0.5, 0.6),
    "Atelectasis": (0.0, 0.9), "Lung nodule": (0.3, 0.4), "Lung opacity": (0.0, 1.0),
    "Pulmonary fibrotic sequela": (0.4, 0.6), "Pleural effusion": (0.2, 0.9),
    "Mosaic attenuation pattern": (0.0, 0.6), "Peribronchial thickening": (0.0, 0.7),
    "Consolidation": (0.0, 1.0), "Bronchiectasis": (0.2, 0.7), "Interlobular septal thickening": (0.0, 0.8),
}

CTPA = 320.0
SCANNERS = {  # site differences: spacing, noise, blur, calibration offset, contrast
    "ct-rate": Scanner(noise=14, smooth=0.45),
    "ct-rate-smooth": Scanner(noise=9, smooth=0.65),  # the second reconstruction of a scan
    "rad-chestct": Scanner(spacing=(5.2, 5.2, 8.0), noise=12, smooth=0.55, offset=-10),
    "ahph": Scanner(spacing=(5.6, 5.6, 9.0), noise=22, smooth=0.6, offset=30),
    "ctrg": Scanner(spacing=(5.0, 5.0, 8.5), noise=16, smooth=0.5),
    "stoic": Scanner(noise=16, smooth=0.55, offset=-5),
    "cc-ccii": Scanner(spacing=(5.3, 5.3, 8.0), noise=18, smooth=0.6, offset=10),
    "luna16": Scanner(noise=12, smooth=0.5),
    "inspect": Scanner(noise=15, smooth=0.5, contrast=CTPA),
    "rspect": Scanner(spacing=(5.5, 5.5, 8.5), noise=22, smooth=0.65, offset=20, contrast=260),
    "fumpe": Scanner(noise=14, smooth=0.5, contrast=300),
    "msd-lung": Scanner(noise=12, smooth=0.5),
    "rider": Scanner(spacing=(5.4, 5.4, 8.5), noise=20, smooth=0.6, offset=15),
    "covid19-20": Scanner(noise=14, smooth=0.5),
    "covid19-ct-seg": Scanner(spacing=(5.6, 5.6, 9.0), noise=20, smooth=0.65, offset=-20),
    "segthor": Scanner(noise=12, smooth=0.5),
    "btcv": Scanner(noise=12, smooth=0.5),
    "acdc": Scanner(spacing=(4.5, 4.5, 6.0), noise=25, smooth=0.6),
}

# mask value -> tissue ids (or a named region); later entries win where they overlap.
MaskSpec = tuple[tuple[int, "tuple[int, ...] | str"], ...]
MASKS: dict[str, MaskSpec] = {
    "msd-lung": ((1, (T.TUMOUR,)),),
    "rider": ((1, (T.TUMOUR,)),),
    "covid19-20": ((1, (T.INFECTION,)),),
    "covid19-ct-seg": ((1, "lung_left"), (2, "lung_right"), (3, (T.INFECTION,))),
    "luna16": ((1, "lung_left"), (1, "lung_right")),
    "segthor": ((1, (T.ESOPHAGUS,)), (2, (T.HEART, T.BLOOD_POOL)), (3, (T.TRACHEA,)), (4, (T.AORTA,))),
    "fumpe": ((1, (T.EMBOLUS,)),),
    "btcv": ((1, (T.SPLEEN,)), (2, (T.KIDNEY_R,)), (3, (T.KIDNEY_L,)), (4, (T.GALLBLADDER,)),
             (5, (T.ESOPHAGUS,)), (6, (T.LIVER,)), (7, (T.STOMACH,)), (8, (T.AORTA,)), (9, (T.IVC,)),
             (10, (T.PORTAL_VEIN,)), (11, (T.PANCREAS,)), (12, (T.ADRENAL_R,)), (13, (T.ADRENAL_L,))),
    "acdc": ((1, (T.RV,)), (2, (T.MYOCARDIUM,)), (3, (T.LV,))),
}


# --------------------------------------------------------------------------- plan

@dataclass
class Image:
    """One written volume (one CSV row): which scanner saw the scan, and how it is cut."""

    table: str
    case_id: str
    scanner: Scanner
    noise_key: str
    shift: tuple[float, float, float] = ZERO
    mask: MaskSpec | None = None
    options: dict = field(default_factory=dict)  # {"systole": bool} or {"candidate": kind, "index": k}
    row: dict = field(default_factory=dict)  # columns specific to this image


@dataclass
class Scan:
    """One acquisition: anatomy (seeded by patient) and findings (seeded by key), drawn once."""

    dataset: str
    kind: str  # chest | abdomen | cardiac
    patient: str
    key: str
    findings: dict[str, dict]
    images: list[Image]
    row: dict = field(default_factory=dict)  # columns shared by every image of the scan
    flips: set[str] = field(default_factory=set)  # labels recorded wrongly (label noise)
    text: tuple[str, ...] = ()  # report columns written from the drawn findings

    def label(self, name: str) -> int:
        return int((name in self.findings) != (name in self.flips))


def rng_for(*parts: object) -> np.random.Generator:
    """A generator seeded by the hash of ``parts``: the same draw on every build and machine."""
    digest = hashlib.sha256(repr((SEED, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def hex_id(*parts: object, n: int = 8) -> str:
    return hashlib.sha256(repr((SEED, *parts)).encode()).hexdigest()[:n]


def assign_splits(n: int, shares: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Exact split sizes over ``n`` patients in random order (patient-grouped by construction)."""
    counts = {name: int(round(n * share)) for name, share in shares.items()}
    first = next(iter(shares))
    counts[first] += n - sum(counts.values())
    labels = [name for name, count in counts.items() for _ in range(count)]
    return [labels[i] for i in rng.permutation(n)]


def sample_findings(rng: np.random.Generator, vocabulary: tuple[str, ...], scale: float = 1.0,
                    latent: tuple[float, float] | None = None) -> dict[str, dict]:
    """Findings of one scan: prevalence per label, correlated through two latent factors."""
    a, b = latent if latent is not None else rng.normal(size=2)
    found = {}
    for name in vocabulary:
        p0 = PREVALENCE[name] * scale
        wa, wb = LOADING[name]
        logit = math.log(p0 / (1 - p0)) + wa * a + wb * b - 0.5 * (wa * wa + wb * wb) * 0.35
        if rng.random() < 1 / (1 + math.exp(-logit)):
            found[name] = {}
    return found


def add_label_noise(scans: list[Scan], labels: tuple[str, ...], rng: np.random.Generator) -> None:
    for scan in scans:
        scan.flips = {name for name in labels if rng.random() < LABEL_NOISE}


def balance(scans: list[Scan], labels: tuple[str, ...], rng: np.random.Generator) -> None:
    """Make every split hold both classes of every label (a test set must be scorable).

    Where a split lacks a class, one of its scans is changed so that the finding is
    drawn (or not) and recorded correctly; the change is seeded like everything else.
    """
    splits = sorted({s.row.get("split", "all") for s in scans})
    for split in splits:
        members = [s for s in scans if s.row.get("split", "all") == split]
        for name in labels:
            for wanted in (1, 0):
                if any(s.label(name) == wanted for s in members):
                    continue
                scan = members[int(rng.integers(len(members)))]
                scan.flips.discard(name)
                if wanted:
                    scan.findings[name] = {}
                else:
                    scan.findings.pop(name, None)


def fill_labels(scans: list[Scan], labels: tuple[str, ...]) -> None:
    for scan in scans:
        scan.row.update({name: scan.label(name) for name in labels})


def _chest_images(dataset: str, case_ids: list[str], key: str, table: str = "volumes",
                  scanners: list[Scanner] | None = None, **kw) -> list[Image]:
    scanners = scanners or [SCANNERS[dataset]] * len(case_ids)
    return [Image(table, c, s, f"{key}/{c}", **kw) for c, s in zip(case_ids, scanners)]


def plan_report_cohort(dataset: str, n_patients: int, shares: dict[str, float], labels: tuple[str, ...],
                       vocabulary: tuple[str, ...], text: tuple[str, ...], noisy: bool,
                       name: Callable[[int, str], str]) -> list[Scan]:
    """One volume per patient with findings from the CT-RATE vocabulary (RAD-ChestCT, AHPH, CTRG)."""
    rng = rng_for(dataset, "plan")
    splits = assign_splits(n_patients, shares, rng)
    scans = []
    for i, split in enumerate(splits):
        case = name(i, split)
        key = f"{dataset}/{case}"
        scans.append(Scan(dataset, "chest", key, key, sample_findings(rng, vocabulary),
                          _chest_images(dataset, [case], key), row={"patient_id": case, "split": split},
                          text=text))
    if noisy:
        add_label_noise(scans, labels, rng)
    balance(scans, labels, rng)
    fill_labels(scans, labels)
    return scans


def plan_ct_rate(dataset: str = "ct-rate") -> list[Scan]:
    """~150 patients, 1-3 volumes each: scans a/b, reconstructions 1 (sharp) and 2 (smooth)."""
    rng = rng_for(dataset, "plan")
    splits = assign_splits(150, {"train": 0.8, "test": 0.2}, rng)
    counters = {"train": 0, "valid": 0}
    scans = []
    for split in splits:
        part = "train" if split == "train" else "valid"
        counters[part] += 1
        patient = f"{part}_{counters[part]}"
        latent = tuple(rng.normal(size=2))
        n_volumes = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
        for s, scan_letter in enumerate("ab"):
            recons = [r for r in (1, 2) if 2 * s + r <= n_volumes]
            if not recons:
                break
            key = f"{dataset}/{patient}_{scan_letter}"
            cases = [f"{patient}_{scan_letter}_{r}" for r in recons]
            scanners = [SCANNERS["ct-rate"] if r == 1 else SCANNERS["ct-rate-smooth"] for r in recons]
            scans.append(Scan(dataset, "chest", f"{dataset}/{patient}", key,
                              sample_findings(rng, CT_RATE_LABELS, latent=latent),
                              _chest_images(dataset, cases, key, scanners=scanners),
                              row={"patient_id": patient, "split": split}, text=("findings", "impression")))
    add_label_noise(scans, CT_RATE_LABELS, rng)
    balance(scans, CT_RATE_LABELS, rng)
    fill_labels(scans, CT_RATE_LABELS)
    return scans


def plan_rad_chestct(dataset: str = "rad-chestct") -> list[Scan]:
    labels = tuple(load_card(dataset).table("volumes").labels["abnormality"].columns)
    return plan_report_cohort(dataset, 100, {"train": 0.85, "test": 0.15}, labels, labels, (), True,
                              lambda i, split: f"trn{i + 1:05d}")  # the public release is train-only


def plan_ahph(dataset: str = "ahph") -> list[Scan]:
    return plan_report_cohort(dataset, 100, {"train": 0.8, "test": 0.2}, CT_RATE_LABELS, CT_RATE_LABELS,
                              ("findings", "impression"), True, lambda i, split: f"AHPH{i + 1:05d}")


def plan_ctrg(dataset: str = "ctrg") -> list[Scan]:
    """300 patients at the official split's shares: 30 test reports, enough for rg/ctrg to separate encoders."""
    return plan_report_cohort(dataset, 300, {"train": 0.8, "val": 0.1, "test": 0.1}, (), CT_RATE_LABELS,
                              ("findings",), False, lambda i, split: f"CTRG{i + 1:05d}")


def plan_stoic(dataset: str = "stoic") -> list[Scan]:
    """COVID-19 = peripheral bilateral ground glass; severe = large extent (COVID cases only)."""
    rng = rng_for(dataset, "plan")
    scans = []
    for i in range(400):  # enough COVID-positive test cases (about 40) for prog/stoic-severity to separate encoders
        case = f"stoic_{i + 1:04d}"
        covid = rng.random() < 0.5
        if covid:
            extent = float(rng.beta(2, 3))
            findings = {"Covid pattern": {"extent": extent}}
            severe = int(extent + rng.normal(0, 0.05) > 0.52)
        else:
            findings = sample_findings(rng, ("Consolidation", "Emphysema", "Lung nodule", "Atelectasis"), 0.6)
            severe = 0
        key = f"{dataset}/{case}"
        scans.append(Scan(dataset, "chest", key, key, findings, _chest_images(dataset, [case], key),
                          row={"patient_id": case, "covid": int(covid), "severe": severe}))
    return scans


def plan_cc_ccii(dataset: str = "cc-ccii") -> list[Scan]:
    """Normal, common pneumonia (lobar consolidation) or COVID-19 (peripheral ground glass)."""
    rng = rng_for(dataset, "plan")
    scans = []
    for p in range(90):
        patient = f"ccii_p{p + 1:04d}"
        diagnosis = int(rng.choice(3, p=[0.3, 0.35, 0.35]))
        for s in range(1 + int(p % 3 == 0)):
            case = f"{patient}_s{s + 1}"
            if diagnosis == 2:
                findings = {"Covid pattern": {"extent": float(rng.uniform(0.2, 0.9))}}
            elif diagnosis == 1:
                findings = {"Consolidation": {}}
                if rng.random() < 0.3:
                    findings["Pleural effusion"] = {}
            else:
                findings = {}
            key = f"{dataset}/{case}"
            scans.append(Scan(dataset, "chest", f"{dataset}/{patient}", key, findings,
                              _chest_images(dataset, [case], key, shift=_jitter(rng)),
                              row={"patient_id": patient, "diagnosis": diagnosis}))
    return scans


def _jitter(rng: np.random.Generator, mm: float = 6.0) -> tuple[float, float, float]:
    """Patient repositioning between scans."""
    return tuple(float(v) for v in np.round(rng.uniform(-mm, mm, 3), 1))


def plan_luna16(dataset: str = "luna16") -> list[Scan]:
    """40 series; 4 candidate patches each (nodule at the centre, or vessel / plain lung);
    every series also goes to the volumes table with lung masks (12 test scans for seg/luna16-lung)."""
    rng = rng_for(dataset, "plan")
    scans = []
    for i in range(40):
        uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001." + str(int(hex_id(dataset, i, n=24), 16))[:30]
        n_nodules = int(rng.choice([0, 1, 2, 3], p=[0.25, 0.35, 0.25, 0.15]))
        findings = {"Lung nodule": {"count": n_nodules}} if n_nodules else {}
        if rng.random() < 0.2:
            findings["Emphysema"] = {}
        key = f"{dataset}/{uid}"
        images = []
        images += _chest_images(dataset, [uid], key, mask=MASKS[dataset])
        kinds = ["nodule"] * min(n_nodules, 3) + ["vessel", "lung"] * 2
        for k, kind in enumerate(kinds[:4]):
            case = f"{uid}_cand{k + 1}"
            images.append(Image("candidates", case, SCANNERS[dataset], f"{key}/{uid}",
                                options={"candidate": kind, "index": k}, row={"nodule": int(kind == "nodule")}))
        scans.append(Scan(dataset, "chest", key, key, findings, images, row={"patient_id": uid}))
    return scans


def _survival(rng: np.random.Generator, hazard: float, horizons: dict[str, float]) -> dict:
    """Exponential event time, uniform follow-up (30-700 days) as independent censoring."""
    event_time = rng.exponential(1 / hazard)
    follow_up = rng.uniform(30, 700)
    time = int(math.ceil(min(event_time, follow_up)))
    event = int(event_time <= follow_up)
    row = {"time": time, "event": event}
    for column, h in horizons.items():
        row[column] = 1 if event and time <= h else (0 if time > h else None)
    return row


INSPECT_OTHERS = ("Pleural effusion", "Consolidation", "Cardiomegaly", "Lung nodule", "Emphysema",
                  "Atelectasis", "Pericardial effusion", "Lymphadenopathy")


def plan_pe_cohort(dataset: str, n_patients: int, p_pe: float, shares: dict[str, float] | None,
                   survival: bool) -> list[Scan]:
    """CT pulmonary angiograms; PE = filling defects. INSPECT adds mortality driven by lesion burden."""
    rng = rng_for(dataset, "plan")
    horizons = load_card(dataset).table("volumes").survival.horizons if survival else {}
    splits = assign_splits(n_patients, shares, rng) if shares else [None] * n_patients
    scans = []
    for p, split in enumerate(splits):
        patient = f"person_{p + 1:05d}" if survival else hex_id(dataset, p, n=12)
        latent = tuple(rng.normal(size=2))
        for s in range(1 + int(survival and rng.random() < 0.4)):
            case = f"PE{hex_id(dataset, p, s)}" if survival else patient
            findings = sample_findings(rng, INSPECT_OTHERS, 0.6, latent)
            pe = rng.random() < p_pe
            count = int(rng.integers(1, 4))
            if pe:
                findings["Pulmonary embolism"] = {"count": count}
            row = {"patient_id": patient, "pe": int(pe)}
            if split:
                row["split"] = split
            if survival:
                burden = pe * (1.0 + 0.35 * count) + 0.55 * (len(findings) - pe)
                row.update(_survival(rng, math.exp(-8.6 + burden), horizons))
            key = f"{dataset}/{case}"
            scans.append(Scan(dataset, "chest", f"{dataset}/{patient}", key, findings,
                              _chest_images(dataset, [case], key), row=row))
    return scans


def plan_segmentation(dataset: str, n: int, findings: Callable[[np.random.Generator], dict],
                      name: Callable[[int], str], kind: str = "chest", repeats: int = 1) -> list[Scan]:
    """Cases whose mask is read from the drawn tissue; ``repeats`` > 1 gives same-day rescans."""
    rng = rng_for(dataset, "plan")
    scans = []
    for i in range(n):
        patient = name(i)
        key = f"{dataset}/{patient}"
        cases = [patient] if repeats == 1 else [f"{patient}_scan{r + 1}" for r in range(repeats)]
        shifts = [ZERO] + [_jitter(rng, 5.0) for _ in cases[1:]]
        images = [Image("volumes", c, SCANNERS[dataset], f"{key}/{c}", shift=sh, mask=MASKS[dataset])
                  for c, sh in zip(cases, shifts)]
        scans.append(Scan(dataset, kind, key, key, findings(rng), images, row={"patient_id": patient}))
    return scans


# Lesions of the segmentation cohorts are drawn larger than the report cohorts' findings, so
# that on the 5 x 5 x 8 mm demo grid each covers hundreds of voxels (a 30 mm mass is about 70)
# and a briefly trained UNETR can learn them (docs/demo.md, the segmentation floors).
SEG_TUMOUR_RADIUS_MM = (20.0, 32.0)
SEG_EMBOLUS_MM = (18.0, 30.0)


def _tumour(rng: np.random.Generator) -> dict:
    found = {"Tumour": {"radius_mm": SEG_TUMOUR_RADIUS_MM}}
    if rng.random() < 0.3:
        found["Emphysema"] = {}
    return found


def _covid(lo: float, hi: float) -> Callable[[np.random.Generator], dict]:
    return lambda rng: {"Covid pattern": {"extent": float(rng.uniform(lo, hi))}}


def plan_acdc(dataset: str = "acdc") -> list[Scan]:
    """28 patients x (end-diastole, end-systole); both frames of a patient share a split (14 test frames)."""
    rng = rng_for(dataset, "plan")
    splits = assign_splits(28, {"train": 0.75, "test": 0.25}, rng)
    scans = []
    for i, split in enumerate(splits):
        patient = f"patient{i + 1:03d}"
        es = int(rng.integers(8, 16))
        images = [Image("frames", f"{patient}_frame{frame:02d}", SCANNERS[dataset], f"{dataset}/{patient}/{frame}",
                        mask=MASKS[dataset], options={"systole": frame != 1})
                  for frame in (1, es)]
        key = f"{dataset}/{patient}"
        scans.append(Scan(dataset, "cardiac", key, key, {}, images, row={"patient_id": patient, "split": split}))
    return scans


# Segmentation cohorts: a one-fifth test split of 60 holds 12 cases, enough for the per-case
# Wilcoxon to separate a trained model from an untrained one (n = 12: p >= 0.0005).
SEG_CASES = 60

PLANNERS: dict[str, Callable[[], list[Scan]]] = {
    "ct-rate": plan_ct_rate,
    "rad-chestct": plan_rad_chestct,
    "ahph": plan_ahph,
    "ctrg": plan_ctrg,
    "stoic": plan_stoic,
    "cc-ccii": plan_cc_ccii,
    "luna16": plan_luna16,
    "inspect": lambda: plan_pe_cohort("inspect", 320, 0.3, {"train": 0.8, "test": 0.2}, True),  # ~20 test deaths
    "rspect": lambda: plan_pe_cohort("rspect", 60, 0.42, None, False),
    "fumpe": lambda: plan_segmentation("fumpe", SEG_CASES,
                                       lambda r: {"Pulmonary embolism": {"count": int(r.integers(4, 7)),
                                                                          "length_mm": SEG_EMBOLUS_MM},
                                                  "Pulmonary artery enlargement": {}},
                                       lambda i: f"PAT{i + 1:03d}"),
    "msd-lung": lambda: plan_segmentation("msd-lung", SEG_CASES, _tumour, lambda i: f"lung_{i + 1:03d}"),
    "rider": lambda: plan_segmentation("rider", 8, _tumour,
                                       lambda i: f"RIDER-{int(hex_id('rider', i), 16) % 10**10:010d}", repeats=2),
    "covid19-20": lambda: plan_segmentation("covid19-20", SEG_CASES, _covid(0.2, 1.0),
                                            lambda i: f"volume-covid19-A-{i + 1:04d}"),
    "covid19-ct-seg": lambda: plan_segmentation("covid19-ct-seg", 14, _covid(0.2, 1.0),
                                                lambda i: f"coronacases_{i + 1:03d}"),
    "segthor": lambda: plan_segmentation("segthor", SEG_CASES,
                                         lambda r: {"Cardiomegaly": {}} if r.random() < 0.2 else {},
                                         lambda i: f"Patient_{i + 1:02d}"),
    "btcv": lambda: plan_segmentation("btcv", SEG_CASES, lambda r: {}, lambda i: f"img{i + 1:04d}", kind="abdomen"),
    "acdc": plan_acdc,
}


# --------------------------------------------------------------------------- render

def _mask(canvas: ph.Canvas, spec: MaskSpec) -> np.ndarray:
    mask = np.zeros(canvas.shape, dtype=np.uint8)
    for value, source in spec:
        if isinstance(source, str):
            where = canvas.regions[source]
        else:
            lut = np.zeros(256, dtype=bool)
            lut[list(source)] = True
            where = lut[canvas.tissue]
        mask[where] = value
    return mask


def _draw(scan: Scan, image: Image) -> tuple[ph.Canvas, ph.Chest | None, dict]:
    """The noiseless phantom of ``scan`` as ``image``'s scanner geometry sees it."""
    anatomy_rng, lesion_rng = rng_for(scan.patient, "anatomy"), rng_for(scan.key, "lesions")
    s = image.scanner
    if scan.kind == "chest":
        return ph.render_chest(ph.sample_chest(anatomy_rng), scan.findings, s, lesion_rng, image.shift)
    canvas = ph.Canvas(s.shape, s.spacing, image.shift, background=-1000.0 if scan.kind == "abdomen" else 0.0)
    if scan.kind == "abdomen":
        ph.draw_abdomen(canvas, ph.sample_abdomen(anatomy_rng))
    else:
        ph.draw_cardiac(canvas, ph.sample_cardiac(anatomy_rng), bool(image.options.get("systole")))
    return canvas, None, {}


def _candidate_centre(canvas: ph.Canvas, chest: ph.Chest, records: dict, kind: str, index: int,
                      rng: np.random.Generator) -> tuple[float, float, float]:
    """Where a LUNA16-style candidate sits: on a nodule, on a lung vessel, or in plain lung."""
    if kind == "nodule":
        return records["Lung nodule"]["nodules"][index]["centre"]
    if kind == "vessel":
        lobar = [t for t in chest.arteries if t.r < 9]
        return lobar[int(rng.integers(len(lobar)))].at(float(rng.uniform(0.4, 0.9)))
    return ph.lobe_point(chest, ph.pick_lobe(rng), rng)


def _cut(volume: np.ndarray, centre_idx: tuple[int, int, int], fill: float) -> np.ndarray:
    """A PATCH-sized block centred on a voxel, padded where it leaves the volume."""
    half = [p // 2 for p in PATCH]
    padded = np.pad(volume, [(h, h) for h in half], constant_values=fill)
    return padded[tuple(slice(c, c + p) for c, p in zip(centre_idx, PATCH))]


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """NIfTI-1 through our own gzip stream: mtime 0 and no file name, so bytes never vary."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle, gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0,
                                                   compresslevel=1) as gz:
        gz.write(img.to_bytes())


def render_scan(scan: Scan, folder: str) -> tuple[list[tuple[str, dict]], dict]:
    """Draw one scan, write each of its images (and masks); return CSV rows and the records."""
    out = Path(folder) / scan.dataset
    drawn: dict = {}
    acquired: dict = {}
    rows, records = [], {}
    for image in scan.images:
        s = image.scanner
        gkey = (s.shape, s.spacing, s.contrast, image.shift, image.options.get("systole"))
        if gkey not in drawn:
            drawn[gkey] = _draw(scan, image)
        canvas, chest, records = drawn[gkey]
        akey = (gkey, s, image.noise_key)
        if akey not in acquired:
            acquire = ph.acquire_mri if scan.kind == "cardiac" else ph.acquire_ct
            acquired[akey] = acquire(canvas.hu, s, rng_for(image.noise_key, "noise"))
        volume, affine = acquired[akey], ph.affine_for(s.shape, s.spacing)
        mask = _mask(canvas, image.mask) if image.mask else None
        if "candidate" in image.options:
            rng = rng_for(image.case_id, "candidate")
            centre = _candidate_centre(canvas, chest, records, image.options["candidate"],
                                       image.options["index"], rng)
            idx = tuple(int(i) for i in canvas.nearest(np.asarray(centre)))
            volume = _cut(volume, idx, -1024)
            affine = ph.affine_for(s.shape, s.spacing, tuple(i - p // 2 for i, p in zip(idx, PATCH)))
        rel = f"images/{image.case_id}.nii.gz"
        _write_nifti(out / rel, volume, affine)
        row = {"case_id": image.case_id, **scan.row, **image.row, "image": rel}
        if mask is not None:
            row["mask"] = f"masks/{image.case_id}.nii.gz"
            _write_nifti(out / row["mask"], mask, affine)
        rows.append((image.table, row))
    return rows, records


# --------------------------------------------------------------------------- reports and VQA

POSITIVE = {
    "Medical material": ["A {device} is present in the chest wall with its lead extending towards the heart.",
                         "There is a {device} in the anterior chest wall."],
    "Arterial wall calcification": ["Atherosclerotic calcifications are seen in the walls of the {location}.",
                                    "Calcified plaques are present along the {location}."],
    "Cardiomegaly": ["The heart is enlarged.",
                     "Cardiomegaly is present, with a cardiothoracic ratio of about {ratio}."],
    "Pericardial effusion": ["There is a pericardial effusion measuring {size_mm} mm in thickness.",
                             "Pericardial fluid up to {size_mm} mm thick is seen."],
    "Coronary artery wall calcification": ["Calcification is noted in the coronary arteries ({location}).",
                                           "There are coronary artery wall calcifications."],
    "Hiatal hernia": ["A hiatal hernia measuring {size_mm} mm is seen.", "There is a {size_mm} mm hiatal hernia."],
    "Lymphadenopathy": ["Enlarged lymph nodes are seen at the {location} stations, the largest {size_mm} mm.",
                        "Lymphadenopathy is present ({location}), up to {size_mm} mm."],
    "Emphysema": ["Centrilobular emphysema is seen in the {location}.",
                  "Emphysematous changes are present in the {location}."],
    "Atelectasis": ["Atelectasis is noted in the {location}.", "There is subsegmental atelectasis in the {location}."],
    "Lung nodule": ["A {size_mm} mm solid nodule is seen in the {location}.",
                    "There is a solid pulmonary nodule of {size_mm} mm in the {location}."],
    "Lung opacity": ["A ground-glass opacity of {size_mm} mm is seen in the {location}.",
                     "There is a {size_mm} mm area of ground-glass density in the {location}."],
    "Pulmonary fibrotic sequela": ["Fibrotic sequelae with reticular densities are present in the {location}.",
                                   "Linear fibrotic streaks are seen in the {location}."],
    "Pleural effusion": ["There is a {location} pleural effusion measuring {size_mm} mm in thickness.",
                         "A {location} pleural effusion up to {size_mm} mm is seen."],
    "Mosaic attenuation pattern": ["A mosaic attenuation pattern is seen in {location}.",
                                   "There is mosaic attenuation throughout {location}."],
    "Peribronchial thickening": ["Peribronchial wall thickening is noted bilaterally.",
                                 "The bronchial walls are thickened in both lungs."],
    "Consolidation": ["Consolidation of {size_mm} mm with air bronchograms is present in the {location}.",
                      "There is an area of consolidation in the {location}, about {size_mm} mm."],
    "Bronchiectasis": ["Bronchiectasis is seen in the {location}.", "Dilated bronchi are noted in the {location}."],
    "Interlobular septal thickening": ["Interlobular septal thickening is seen in the {location}.",
                                       "There is smooth septal thickening at the {location}."],
}
NEGATIVE = {
    "Medical material": ["No medical device is seen."],
    "Arterial wall calcification": ["No aortic wall calcification.", "The aorta shows no calcification."],
    "Cardiomegaly": ["Heart size is normal.", "The heart is of normal size."],
    "Pericardial effusion": ["No pericardial effusion.", "There is no pericardial effusion."],
    "Coronary artery wall calcification": ["No coronary artery calcification."],
    "Hiatal hernia": ["No hiatal hernia."],
    "Lymphadenopathy": ["No mediastinal or hilar lymphadenopathy.", "No enlarged lymph nodes."],
    "Emphysema": ["No emphysema."],
    "Atelectasis": ["No atelectasis."],
    "Lung nodule": ["No pulmonary nodule is seen.", "No nodules."],
    "Lung opacity": ["No ground-glass opacity."],
    "Pulmonary fibrotic sequela": ["No fibrotic changes."],
    "Pleural effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "Mosaic attenuation pattern": ["Lung attenuation is homogeneous."],
    "Peribronchial thickening": ["Bronchial walls are normal."],
    "Consolidation": ["No consolidation.", "There is no consolidation."],
    "Bronchiectasis": ["No bronchiectasis."],
    "Interlobular septal thickening": ["No septal thickening."],
}
EXTRA = {  # findings outside the CT-RATE vocabulary, reported when drawn
    "Covid pattern": "Multifocal peripheral ground-glass opacities are seen in both lungs.",
    "Tumour": "A {size_mm} mm mass is seen in the {location}.",
    "Pulmonary embolism": "Filling defects consistent with pulmonary embolism are seen in the {location}.",
}
REPORT_ORDER = ("Medical material", "Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification",
                "Arterial wall calcification", "Lymphadenopathy", "Hiatal hernia", "Lung nodule", "Lung opacity",
                "Consolidation", "Atelectasis", "Emphysema", "Mosaic attenuation pattern",
                "Interlobular septal thickening", "Pulmonary fibrotic sequela", "Bronchiectasis",
                "Peribronchial thickening", "Pleural effusion")
ALWAYS_MENTIONED = {"Cardiomegaly", "Pleural effusion", "Lung nodule", "Consolidation", "Lymphadenopathy"}


def _phrase(name: str, record: dict) -> str:
    """Short impression phrase for a finding, with its location when it has one."""
    where = record.get("location")
    noun = NOUN.get(name, name.lower())
    if where and name in LOCATED:
        return f"{noun} in the {where}" if any(w in where for w in ("lobe", "lung")) else f"{where} {noun}"
    return noun


def write_report(records: dict, rng: np.random.Generator) -> tuple[str, str]:
    """Findings and impression sentences that describe exactly what was drawn."""
    sentences = []
    for name in REPORT_ORDER:
        if name in records:
            template = POSITIVE[name][int(rng.integers(len(POSITIVE[name])))]
            sentences.append(template.format(**records[name]))
        elif name in ALWAYS_MENTIONED or rng.random() < 0.4:
            sentences.append(NEGATIVE[name][int(rng.integers(len(NEGATIVE[name])))])
    sentences += [EXTRA[n].format(**records[n]) for n in EXTRA if n in records]
    positives = [n for n in (*REPORT_ORDER, *EXTRA) if n in records]
    if positives:
        impression = " ".join(f"{i + 1}. {_phrase(n, records[n]).capitalize()}." for i, n in enumerate(positives))
    else:
        impression = "No acute cardiopulmonary abnormality."
    return " ".join(sentences), impression


NOUN = {
    "Lung nodule": "nodule", "Lung opacity": "ground-glass opacity", "Pulmonary fibrotic sequela": "fibrotic sequela",
    "Mosaic attenuation pattern": "mosaic attenuation", "Coronary artery wall calcification": "coronary calcification",
    "Arterial wall calcification": "aortic wall calcification", "Interlobular septal thickening": "septal thickening",
    "Covid pattern": "peripheral ground-glass opacities", "Tumour": "mass", "Pulmonary embolism": "pulmonary embolism",
}
LOCATED = {"Lung nodule", "Lung opacity", "Consolidation", "Atelectasis", "Emphysema", "Pulmonary fibrotic sequela",
           "Pleural effusion", "Bronchiectasis", "Tumour", "Interlobular septal thickening"}
SIZED = {"Lung nodule", "Lung opacity", "Consolidation", "Pleural effusion", "Pericardial effusion", "Hiatal hernia",
         "Lymphadenopathy", "Tumour"}
REGIONS = {
    "lungs": ("Lung nodule", "Lung opacity", "Consolidation", "Atelectasis", "Emphysema", "Mosaic attenuation pattern",
              "Interlobular septal thickening", "Pulmonary fibrotic sequela"),
    "airways": ("Bronchiectasis", "Peribronchial thickening"),
    "mediastinum": ("Lymphadenopathy", "Hiatal hernia", "Arterial wall calcification"),
    "heart": ("Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification"),
    "pleura": ("Pleural effusion",),
}


def _listing(names: list[str]) -> str:
    return ", ".join(NOUN.get(n, n.lower()) for n in names).capitalize() + "." if names else "None."


def write_vqa(records: dict, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Five questions per volume (abnormality, location, size, presence, disorder), answered
    from the drawn findings; with no located or sized finding a presence question stands in."""
    present = [n for n in CT_RATE_LABELS if n in records]
    region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
    qa = [("abnormality", f"What abnormalities are seen in the {region}?",
           _listing([n for n in REGIONS[region] if n in records]))]
    located = [n for n in present if n in LOCATED]
    if located:
        n = located[int(rng.integers(len(located)))]
        qa.append(("location", f"Where is the {NOUN.get(n, n.lower())} located?", records[n]["location"]))
    sized = [n for n in present if n in SIZED]
    if sized:
        n = sized[int(rng.integers(len(sized)))]
        where = records[n].get("location")
        place = f" in the {where}" if where and "lobe" in where else ""
        qa.append(("size", f"What is the size of the {NOUN.get(n, n.lower())}{place}?", f"{records[n]['size_mm']} mm"))
    while len(qa) < 4:
        ask_present = present and rng.random() < 0.5
        pool = present if ask_present else [n for n in CT_RATE_LABELS if n not in records]
        n = pool[int(rng.integers(len(pool)))]
        qa.append(("presence", f"Is there {NOUN.get(n, n.lower())}?", "Yes." if n in records else "No."))
    qa.append(("disorder", "What disorders does this patient have?",
               _listing(present) if present else "No abnormal findings."))
    return qa


def add_text(scans: list[Scan], results: list[tuple[list, dict]]) -> None:
    """Fill report columns from each scan's records (one report per scan, shared by its images)."""
    for scan, (rows, records) in zip(scans, results):
        if not scan.text:
            continue
        findings, impression = write_report(records, rng_for(scan.key, "report"))
        text = {"findings": findings, "impression": impression}
        for _, row in rows:
            row.update({column: text[column] for column in scan.text})


def radgenome_rows(scans: list[Scan], results: list[tuple[list, dict]]) -> list[dict]:
    """VQA on ~60 CT-RATE volumes (reconstruction 1 of the first scan), pointing at its files."""
    rows = []
    firsts = [(scan, res) for scan, res in zip(scans, results) if scan.key.endswith("_a")]
    rng = rng_for("radgenome", "plan")
    keep = sorted(rng.choice(len(firsts), size=min(60, len(firsts)), replace=False).tolist())
    for i in keep:
        scan, (ct_rows, records) = firsts[i]
        volume = ct_rows[0][1]
        for k, (qa_type, question, answer) in enumerate(write_vqa(records, rng_for(scan.key, "vqa"))):
            rows.append({"case_id": f"{volume['case_id']}_q{k + 1}", "patient_id": volume["patient_id"],
                         "image": f"../ct-rate/{volume['image']}", "split": volume["split"],
                         "qa_type": qa_type, "question": question, "answer": answer})
    return rows


# --------------------------------------------------------------------------- build

def _render_all(scans: list[Scan], folder: Path, workers: int) -> list[tuple[list, dict]]:
    """Render every scan, on several forked workers when allowed (the output does not depend on it).

    Fork, not spawn: workers then need not re-import the caller's __main__ (a notebook,
    a piped script), and they only run numpy/scipy code.
    """
    args = [str(folder)] * len(scans)
    if workers > 1:
        try:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                return list(pool.map(render_scan, scans, args, chunksize=8))
        except (OSError, BrokenProcessPool):  # no process pool here: fall back to one process
            pass
    return [render_scan(s, f) for s, f in zip(scans, args)]


def _write_tables(root: Path, dataset: str, rows: list[tuple[str, dict]]) -> dict[str, int]:
    """One CSV per card table, in the card's column order; missing horizons stay empty."""
    card = load_card(dataset)
    counts = {}
    for table_name, table in card.tables.items():
        frame = pd.DataFrame([row for t, row in rows if t == table_name])
        if not table.official_split:  # planned splits only balance classes; the protocol splits
            frame = frame.drop(columns=["split"], errors="ignore")
        columns = table.columns()
        if set(frame.columns) != set(columns):
            raise RuntimeError(f"demo {dataset}/{table_name}: columns {sorted(frame.columns)} != card {columns}")
        if table.survival is not None:
            for column in table.survival.horizons:
                frame[column] = frame[column].astype("Int64")
        frame[columns].to_csv(root / dataset / f"{table_name}.csv", index=False, lineterminator="\n")
        counts[table_name] = len(frame)
    return counts


def generate(folder: Path, workers: int = 1) -> dict[str, dict[str, int]]:
    """Plan, render and tabulate every dataset into ``folder`` (no marker; see build_demo)."""
    plans = {name: PLANNERS[name]() for name in sorted(PLANNERS)}
    order = [(name, scan) for name, scans in plans.items() for scan in scans]
    flat = _render_all([scan for _, scan in order], folder, workers)
    results: dict[str, list] = {name: [] for name in plans}
    for (name, _), result in zip(order, flat):
        results[name].append(result)
    counts = {}
    for name in dataset_names():
        if name == "radgenome":
            (folder / name).mkdir(parents=True, exist_ok=True)
            rows = [("vqa", r) for r in radgenome_rows(plans["ct-rate"], results["ct-rate"])]
        else:
            add_text(plans[name], results[name])
            rows = [row for scan_rows, _ in results[name] for row in scan_rows]
        counts[name] = _write_tables(folder, name, rows)
    return counts


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Serialise builds of one folder across processes (``<out>.lock``, never deleted)."""
    with open(out.with_name(out.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_marker(root: Path | str) -> dict | None:
    try:
        data = json.loads((Path(root) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_demo_root(root: Path | str) -> bool:
    """True for a folder written by ``build_demo`` (its results must never mix with real ones)."""
    marker = read_marker(root)
    return bool(marker) and marker.get("synthetic") is True


def _is_current(out: Path) -> bool:
    marker = read_marker(out)
    return bool(marker) and marker.get("synthetic") is True and marker.get("generator_version") == GENERATOR_VERSION \
        and marker.get("seed") == SEED


def _write_json_atomic(path: Path, data: dict) -> None:
    files.write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _default_workers() -> int:
    env = os.environ.get("ASAP_BENCH_DEMO_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); OSError where unsupported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap_in(new: Path, out: Path) -> None:
    """Put the cohort at ``new`` in place of ``out``; afterwards ``new`` holds the old one, or nothing.

    One atomic exchange where the file system has it, so ``out`` is always a complete
    cohort; elsewhere two renames, and ``_recover`` closes the gap between them.
    """
    if not out.exists():
        os.replace(new, out)
        return
    try:
        _exchange(new, out)
        return
    except OSError as error:
        if error.errno not in _NO_EXCHANGE:
            raise
    old = out.with_name(f".{out.name}.tmp-old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    os.replace(old, new)


def _recover(out: Path) -> None:
    """Put back the cohort that a rebuild killed between its two renames had moved aside."""
    if out.exists():
        return
    for old in sorted(out.parent.glob(f".{out.name}.tmp-old-*")):
        if read_marker(old) is not None:
            os.replace(old, out)
            return


def build_demo(out: Path | str, *, force: bool = False, workers: int | None = None) -> Path:
    """Write the demo cohort to ``out`` unless a complete one of this version is there.

    The cohort is built in a temporary sibling folder and swapped into place, so a
    crash leaves nothing half-written under ``out``, and a rebuild killed at any point
    leaves the old or the new cohort there (or, without an atomic exchange, beside it,
    put back by the next call); a file lock lets concurrent callers wait for one build
    instead of racing. A non-empty ``out`` that is not a demo cohort is never overwritten.
    """
    out = Path(out).expanduser().absolute()
    if not force and _is_current(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _recover(out)
        if not force and _is_current(out):
            return out
        if out.exists() and not is_demo_root(out) and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} exists and is not a demo cohort (no {MARKER}); refusing to overwrite it")
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cohort is ordinary shared data
        try:
            counts = generate(tmp, workers or _default_workers())
            _write_json_atomic(tmp / MARKER, {"synthetic": True, "generator_version": GENERATOR_VERSION,
                                              "seed": SEED, "datasets": counts})
            _swap_in(tmp, out)
        finally:  # the old cohort, or a build that failed
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_demo_root() -> Path:
    """``$ASAP_BENCH_CACHE/demo-v<N>``, else ``$XDG_CACHE_HOME`` (or ~/.cache) ``/asap-bench/demo-v<N>``."""
    from .cache import cache_root

    return cache_root() / f"demo-v{GENERATOR_VERSION}"


def ensure_demo(root: Path | str | None = None) -> Path:
    """The demo cohort's root, built first if it is missing or from another generator version."""
    return build_demo(Path(root) if root is not None else default_demo_root())
