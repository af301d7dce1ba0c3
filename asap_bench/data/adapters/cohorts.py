"""Label-table cohorts: INSPECT (NIfTI in place, PE and mortality) and CC-CCII (per-class slice folders)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..cards import load_card
from ..io import stack_slices, write_nifti
from .base import Context, PrepareError, read_table, to_binary

# --------------------------------------------------------------------------- INSPECT

INSPECT_SPLITS = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}
INSPECT_MORTALITY = {"mortality_1m": "1_month_mortality", "mortality_6m": "6_month_mortality",
                     "mortality_12m": "12_month_mortality"}


def _mortality(value, path: Path, column: str) -> int | None:
    """True / False / Censored -> 1 / 0 / empty."""
    if isinstance(value, str) and value.strip().lower().startswith("censor"):
        return None
    return to_binary(value, path, column)


def _inspect_survival(horizons: dict[str, int | None], days: dict[str, float]) -> tuple[int, int]:
    """(time in days, event) from the horizon labels: death by the first positive horizon (interval-censored,
    recorded at that horizon), else alive through the last negative one (censored there, 0 when none)."""
    for column in sorted(days, key=days.get):
        if horizons[column] == 1:
            return int(days[column]), 1
    known = [days[c] for c in days if horizons[c] == 0]
    return (int(max(known)) if known else 0), 0


def _given_survival(row, columns: tuple[str, str], path: Path) -> tuple[int, int]:
    time_column, event_column = columns
    try:
        time = float(row[time_column])
    except (TypeError, ValueError):
        time = float("nan")
    if not time >= 0:
        raise PrepareError(f"{path}: column {time_column!r} holds {row[time_column]!r}; expected days >= 0")
    event = to_binary(row[event_column], path, event_column)
    if event is None:
        raise PrepareError(f"{path}: column {event_column!r} is empty for impression {row['impression_id']}")
    return int(round(time)), event


def prepare_inspect(ctx: Context) -> dict[str, list[dict]]:
    survival = load_card("inspect").table("volumes").survival
    labels_path = ctx.find("labels_20250611.tsv", "labels.tsv", "labels.csv")
    labels = read_table(labels_path, ["impression_id", "pe_positive_nlp", *INSPECT_MORTALITY.values()], dtype=str)
    frame = labels
    for name, columns in (("study_mapping", ["impression_id", "image_id", "person_id"]), ("splits", ["impression_id", "split"])):
        if all(c in frame.columns for c in columns):
            continue
        path = ctx.find(f"{name}_20250611.tsv", f"{name}.tsv", f"{name}.csv")
        other = read_table(path, columns, dtype=str)[columns].drop_duplicates("impression_id")
        frame = frame.merge(other, on="impression_id", how="inner")
    folder = ctx.find("CTPA", kind="dir")
    days = {column: survival.horizons[column] for column in INSPECT_MORTALITY}
    given = tuple(ctx.options[k] for k in ("time_column", "event_column") if ctx.options.get(k))
    if given and len(given) != 2:
        raise PrepareError("INSPECT time-to-event needs both --set time_column=NAME and --set event_column=NAME")
    for column in given:
        if column not in frame.columns:
            raise PrepareError(f"{labels_path}: no column {column!r} for time-to-event; found {list(frame.columns)[:30]}")
    rows = []
    for _, r in frame.drop_duplicates("impression_id").iterrows():
        image = folder / (str(r["image_id"]).removesuffix(".nii.gz") + ".nii.gz")
        if not image.is_file():
            ctx.note(f"{image.name}: labelled in {labels_path.name} but not under CTPA/; skipped")
            continue
        split = INSPECT_SPLITS.get(str(r["split"]).strip().lower())
        if split is None:
            raise PrepareError(f"impression {r['impression_id']}: split {r['split']!r}; expected train/valid/test")
        horizons = {ours: _mortality(r[theirs], labels_path, theirs) for ours, theirs in INSPECT_MORTALITY.items()}
        time, event = _inspect_survival(horizons, days)
        if given:  # time-to-event columns of the label file, where the release has them
            time, event = _given_survival(r, given, labels_path)
        rows.append({"case_id": image.name[: -len(".nii.gz")], "patient_id": str(r["person_id"]), "split": split,
                     "image": ctx.ref(image), "pe": to_binary(r["pe_positive_nlp"], labels_path, "pe_positive_nlp"),
                     survival.time: time, survival.event: event, **horizons})
    return {"volumes": rows}


# --------------------------------------------------------------------------- CC-CCII

CC_CCII_CLASSES = ("Normal", "CP", "NCP")  # stored 0, 1, 2 as the card's class order
CC_CCII_SPACING = (1.0, 1.0, 1.0)  # the slices carry no spacing; override with --spacing


def _slice_key(path: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", path.stem)
    return (int(digits[-1]) if digits else -1, path.name)


def prepare_cc_ccii(ctx: Context) -> dict[str, list[dict]]:
    """{Normal,CP,NCP}/<patient_id>/<scan_id>/<n>.png|jpg, slices ordered by their number; the class
    folder gives the label, unzip_filenames.csv (when present) is checked against it."""
    spacing = tuple(float(s) for s in ctx.options.get("spacing") or CC_CCII_SPACING)
    listed = {}
    listing = ctx.source / "unzip_filenames.csv"
    if listing.is_file():
        table = read_table(listing, ["label", "patient_id", "scan_id"], dtype=str)
        listed = {(p, s): l for l, p, s in zip(table["label"], table["patient_id"], table["scan_id"])}
    rows = []
    for diagnosis, name in enumerate(CC_CCII_CLASSES):
        base = ctx.source / name
        if not base.is_dir():
            raise PrepareError(f"{base}: missing class folder; expected {list(CC_CCII_CLASSES)} under {ctx.source}")
        for scan in sorted(p for p in base.glob("*/*") if p.is_dir()):
            patient = scan.parent.name
            files = sorted((f for f in scan.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg")), key=_slice_key)
            if not files:
                ctx.note(f"{scan}: no slices; skipped")
                continue
            if (patient, scan.name) in listed and listed[(patient, scan.name)] not in (name, str(diagnosis)):
                raise PrepareError(f"{listing}: scan {patient}/{scan.name} is labelled {listed[(patient, scan.name)]!r} "
                                   f"but lies in the {name}/ folder")
            case = f"{patient}_{scan.name}"
            rel, out = ctx.image_path(case)
            if not ctx.reuse(out):
                volume = stack_slices(files)
                # image rows run anterior to posterior and columns right to left; slices as numbered
                write_nifti(out, np.ascontiguousarray(volume[::-1, ::-1, :]), np.diag([*spacing, 1.0]))
            rows.append({"case_id": case, "patient_id": patient, "image": rel, "diagnosis": diagnosis})
    ctx.note("CC-CCII slices are 8-bit windowed images without spacing: intensities are not HU")
    return {"volumes": rows}

