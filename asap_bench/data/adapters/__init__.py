"""Dataset adapters: official download layout -> prepared manifest root (``<root>/<dataset>/<table>.csv``).

``prepare(name, source, out)`` runs one dataset's adapter, writes its tables in
the card's column order, checks them with ``load_manifest`` exactly as every
protocol will read them, and records what it did in ``prepared.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..cards import dataset_names, load_card
from ..demo import is_demo_root
from ..manifest import data_fingerprint, load_manifest
from .base import Adapter, Context, PrepareError, link_source, write_prepared, write_tables
from .cohorts import prepare_cc_ccii, prepare_inspect
from .dicom import prepare_fumpe, prepare_rider, prepare_rspect
from .metaimage import prepare_luna16, prepare_stoic
from .reports import prepare_ct_rate, prepare_ctrg, prepare_rad_chestct, prepare_radgenome
from .segmentation import (prepare_acdc, prepare_btcv, prepare_covid19_20, prepare_covid19_ct_seg,
                           prepare_msd_lung, prepare_segthor)

_SITK = ("SimpleITK",)
ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    Adapter("ct-rate", prepare_ct_rate, "NIfTI in place; volumes whose header lacks the metadata's rescale/spacing are rewritten"),
    Adapter("rad-chestct", prepare_rad_chestct, ".npz ('ct') converted to NIfTI", options=("spacing",)),
    Adapter("stoic", prepare_stoic, ".mha converted to NIfTI", _SITK),
    Adapter("luna16", prepare_luna16, ".mhd/.raw converted to NIfTI; candidate patches cut; lung masks merged", _SITK,
            ("negatives_per_series",)),
    Adapter("inspect", prepare_inspect, "NIfTI in place", options=("time_column", "event_column")),
    Adapter("cc-ccii", prepare_cc_ccii, "per-scan slice folders stacked into NIfTI", options=("spacing",)),
    Adapter("msd-lung", prepare_msd_lung, "NIfTI in place (dataset.json)"),
    Adapter("covid19-20", prepare_covid19_20, "NIfTI in place"),
    Adapter("segthor", prepare_segthor, "NIfTI in place"),
    Adapter("fumpe", prepare_fumpe, "DICOM series and MATLAB masks converted to NIfTI", _SITK, ("mask_variable",)),
    Adapter("btcv", prepare_btcv, "NIfTI in place"),
    Adapter("acdc", prepare_acdc, "NIfTI frames in place (cut from the 4D cine when absent)"),
    Adapter("ctrg", prepare_ctrg, "NIfTI in place"),
    Adapter("radgenome", prepare_radgenome, "VQA tables pointing at the prepared CT-RATE volumes"),
    Adapter("rspect", prepare_rspect, "DICOM series converted to NIfTI", _SITK),
    Adapter("rider", prepare_rider, "DICOM series and DICOM SEG masks converted to NIfTI", (*_SITK, "pydicom")),
    Adapter("covid19-ct-seg", prepare_covid19_ct_seg, "NIfTI in place"),
    Adapter("ahph", None, "private: bring your own manifest"),
)}


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        load_card(name)  # unknown names get the card registry's message
        raise KeyError(f"dataset {name!r} has a card but no adapter; known adapters: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]


def private_message(name: str) -> str:
    """How to bring a private dataset: the manifest format its card declares."""
    card = load_card(name)
    lines = [f"{card.title} is private; there is no download to prepare (licence: {card.license}).",
             "Write the manifest yourself, one CSV per table, with the images beside it:"]
    for table_name, table in card.tables.items():
        lines.append(f"  <ROOT>/{name}/{table_name}.csv  columns: {', '.join(table.columns())}")
    lines += ["image (and mask) paths are relative to <ROOT>/" + name + "/; NIfTI (.nii.gz) in HU.",
              "split is train/val/test; label columns are 0/1 (empty when unknown).",
              f"See `asap-bench datasets show {name}` and docs/datasets.md, then run `asap-bench datasets verify <ROOT>`."]
    return "\n".join(lines)


def prepare(name: str, source: Path | str, out: Path | str, options: dict | None = None) -> dict:
    """Prepare one dataset from its official download into the data root ``out``; returns a summary."""
    adapter = get_adapter(name)
    if adapter.prepare is None:
        raise PrepareError(private_message(name))
    unknown = sorted(set(options or {}) - set(adapter.options) - {"resume"})
    if unknown:
        known = ", ".join(adapter.options) or "none"
        raise PrepareError(f"{name} has no option {', '.join(unknown)}; its options: {known}")
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source}: no such folder (the official {name} download)")
    if is_demo_root(out):
        raise PrepareError(f"{out} is the synthetic demo cohort; prepare real data into another root")
    folder = out / name
    if source.resolve() == folder.resolve() or folder.resolve() in source.resolve().parents:
        raise PrepareError(f"--out {out} would place the prepared {name} inside its own source {source}")
    folder.mkdir(parents=True, exist_ok=True)
    ctx = Context(name, source, folder, dict(options or {}))
    link_source(ctx)
    if not ctx.options.get("resume"):
        for sub in ("images", "masks"):
            shutil.rmtree(folder / sub, ignore_errors=True)
    counts = write_tables(ctx, adapter.prepare(ctx))
    fingerprints = {table: data_fingerprint(load_manifest(out, name, table)) for table in counts}
    write_prepared(ctx, counts)
    return {"dataset": name, "folder": str(folder), "tables": counts, "fingerprints": fingerprints, "notes": ctx.notes}


__all__ = ["ADAPTERS", "Adapter", "Context", "PrepareError", "dataset_names", "get_adapter", "prepare",
           "private_message"]
