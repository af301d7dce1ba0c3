"""The paper's figures from an aggregated frame: label-ratio curves, family averages, a VQA radar.

Each figure is written as PNG (for pages) and PDF (for papers). Figures are
drawn per source, so measured numbers and numbers quoted from the paper never
share axes: they come from different data and are not comparable. Matplotlib is
used through its object API (``Figure``), which draws with the Agg and PDF
backends without touching pyplot's global state.

- ``ratio_<source>``: the primary metric of every task against the label ratio
  (log x: 1, 10, 100 %), one line per encoder with seed std error bars (Fig. 3).
- ``families_<source>``: each encoder's average over the settings of a task
  family (primary metrics, settings every encoder has), with the average seed
  std as error bar (Fig. 5). Distances (HD95, mm) are left out: they do not
  average with percentages.
- ``vqa_radar_<source>``: every VQA metric per encoder at the largest label
  ratio; skipped with a note when the frame holds no VQA rows.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pandas as pd

from ..stats import critical_difference

from .html import (FAMILY_ORDER, FAMILY_TITLES, LOWER_IS_BETTER, card_info, choose_metrics, display_value,
                   metric_label, regime_label, source_label, task_label, where)

log = logging.getLogger(__name__)

FORMATS = ("png", "pdf")
DPI = 150


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", str(text)).strip("-") or "source"


def _prepare(aggregated: pd.DataFrame) -> pd.DataFrame:
    """Display units (percent, or mm for distances), typed columns, finite means only."""
    frame = aggregated.copy()
    for column in ("encoder", "protocol", "metric", "source"):
        frame[column] = frame[column].astype(str)
    frame["regime"] = frame["regime"].astype(float).round(6)
    means = pd.to_numeric(frame["mean"], errors="coerce")
    frame = frame[means.notna() & means.abs().lt(math.inf)]
    frame["value"] = [display_value(v, m, s) for v, m, s in zip(frame["mean"], frame["metric"], frame["source"])]
    stds = pd.to_numeric(frame["std"], errors="coerce")
    frame["err"] = [display_value(v, m, s) if pd.notna(v) else 0.0
                    for v, m, s in zip(stds, frame["metric"], frame["source"])]
    frame["family"] = frame["protocol"].str.split("/").str[0]
    return frame


def _encoder_order(encoders) -> list[str]:
    cards = {e: card_info(e) for e in set(encoders)}
    groups = ("random", "ssl", "vlp", "other")
    return sorted(cards, key=lambda e: (groups.index(cards[e]["group"]) if cards[e]["group"] in groups else 9,
                                        cards[e]["order"], e))


def _styles(encoders: list[str]) -> dict[str, dict]:
    """One colour and marker per encoder, the same in every figure of a call."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(encoders) <= 10 else "tab20"]
    markers = "osD^vP*Xh<>p"
    return {e: {"color": cmap(i % cmap.N), "marker": markers[i % len(markers)], "label": card_info(e)["label"]}
            for i, e in enumerate(encoders)}


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{stem}.{fmt}"
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        fig.savefig(path, dpi=DPI, metadata=metadata)
        paths.append(path)
    return paths


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    cols = max(1, min(ncols, n))
    return math.ceil(n / cols), cols


def ratio_figure(frame: pd.DataFrame, styles: dict[str, dict], source: str):
    """Fig. 3: primary metric vs label ratio, one panel per task."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    metrics = choose_metrics(frame)
    frame = where(frame, [metrics.get(p) == m for p, m in zip(frame["protocol"], frame["metric"])])
    protocols = sorted(set(frame["protocol"]), key=lambda p: (FAMILY_ORDER.index(p.split("/")[0])
                                                              if p.split("/")[0] in FAMILY_ORDER else 99, p))
    rows, cols = _grid(len(protocols))
    fig = Figure(figsize=(3.4 * cols, 2.9 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    handles = {}
    for ax, protocol in zip(axes.flat, protocols):
        cell = frame[frame["protocol"] == protocol]
        metric = metrics[protocol]
        for encoder in [e for e in styles if e in set(cell["encoder"])]:
            line = cell[cell["encoder"] == encoder].sort_values("regime")
            style = styles[encoder]
            handles[encoder] = ax.errorbar(line["regime"] * 100, line["value"], yerr=line["err"], capsize=3,
                                           color=style["color"], marker=style["marker"], markersize=4,
                                           linewidth=1.3, label=style["label"])
        ax.set_xscale("log")
        ticks = sorted({round(r * 100, 6) for r in cell["regime"]} | {1.0, 10.0, 100.0})
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}%" for t in ticks])
        ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
        ax.set_title(f"{task_label(protocol)} ({protocol.split('/')[0]})", fontsize=10)
        ax.set_xlabel("label ratio", fontsize=8)
        ax.set_ylabel(f"{metric_label(metric)} ({'mm' if metric in LOWER_IS_BETTER else '%'})", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(protocols):]:
        ax.set_visible(False)
    fig.suptitle(f"Primary metric vs label ratio: {source_label(source)} (mean ± std over seeds)", fontsize=11)
    fig.legend([handles[e] for e in styles if e in handles], [styles[e]["label"] for e in styles if e in handles],
               loc="outside lower center", ncols=min(7, max(1, len(handles))), fontsize=8, frameon=False)
    return fig


def family_averages(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (family, encoder): mean over the settings every encoder of the family has, and the mean seed std."""
    metrics = choose_metrics(frame)
    frame = where(frame, [metrics.get(p) == m and m not in LOWER_IS_BETTER
                          for p, m in zip(frame["protocol"], frame["metric"])])
    out = []
    for family, rows in frame.groupby("family", sort=False):
        settings = {e: set(zip(g["protocol"], g["regime"])) for e, g in rows.groupby("encoder")}
        common = set.intersection(*settings.values()) if settings else set()
        complete = bool(common)
        for encoder, g in rows.groupby("encoder"):
            keys = list(zip(g["protocol"], g["regime"]))
            use = where(g, [k in common for k in keys]) if complete else g
            out.append({"family": family, "encoder": encoder, "mean": use["value"].mean(), "err": use["err"].mean(),
                        "settings": len(use), "common": complete})
    return pd.DataFrame(out, columns=["family", "encoder", "mean", "err", "settings", "common"])


def families_figure(frame: pd.DataFrame, styles: dict[str, dict], source: str):
    """Fig. 5: family averages per encoder as grouped bars with error bars."""
    from matplotlib.figure import Figure

    table = family_averages(frame)
    families = sorted(set(table["family"]), key=lambda f: (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else 99, f))
    encoders = [e for e in styles if e in set(table["encoder"])]
    width_in = min(18.0, max(6.0, 0.16 * len(families) * max(1, len(encoders)) + 2.0))
    fig = Figure(figsize=(width_in, 4.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(encoders))
    for j, encoder in enumerate(encoders):
        xs, ys, es = [], [], []
        for i, family in enumerate(families):
            hit = table[(table["family"] == family) & (table["encoder"] == encoder)]
            if not hit.empty:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(float(hit["mean"].iloc[0]))
                es.append(float(hit["err"].iloc[0]))
        ax.bar(xs, ys, width=width, yerr=es, capsize=2, color=styles[encoder]["color"], label=styles[encoder]["label"],
               error_kw={"elinewidth": 0.8})
    labels = []
    for family in families:
        partial = not table[table["family"] == family]["common"].all()
        note = "\n(not all settings shared)" if partial else ""
        labels.append(f"{family}\n{FAMILY_TITLES.get(family, family)}{note}")
    ax.set_xticks(range(len(families)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("average of the primary metric (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"Task-family averages: {source_label(source)} (error bars: mean seed std)", fontsize=11)
    ax.legend(fontsize=8, ncols=min(7, max(1, len(encoders))), frameon=False, loc="upper center",
              bbox_to_anchor=(0.5, -0.22))
    return fig


def radar_figure(frame: pd.DataFrame, styles: dict[str, dict], source: str):
    """VQA metrics per encoder on a radar, at the largest label ratio present. None without VQA rows."""
    from matplotlib.figure import Figure

    vqa = frame[(frame["family"] == "vqa") & ~frame["metric"].isin(LOWER_IS_BETTER)]
    if vqa.empty:
        return None
    regime = float(vqa["regime"].max())
    vqa = vqa[vqa["regime"] == regime]
    order = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "bertscore_f1", "accuracy"]
    metrics = sorted(set(vqa["metric"]), key=lambda m: (order.index(m) if m in order else 99, m))
    if len(metrics) < 3:
        metrics = metrics + [""] * (3 - len(metrics))  # a radar needs three axes to be a polygon
    angles = [2 * math.pi * i / len(metrics) for i in range(len(metrics))]
    fig = Figure(figsize=(6.2, 5.6), layout="constrained")
    ax = fig.add_subplot(projection="polar")
    top = 0.0
    for encoder in [e for e in styles if e in set(vqa["encoder"])]:
        rows = vqa[vqa["encoder"] == encoder].groupby("metric")["value"].mean()
        values = [float(rows.get(m, 0.0)) if m else 0.0 for m in metrics]
        top = max(top, *values)
        style = styles[encoder]
        ax.plot(angles + angles[:1], values + values[:1], color=style["color"], marker=style["marker"], markersize=3,
                linewidth=1.3, label=style["label"])
        ax.fill(angles + angles[:1], values + values[:1], color=style["color"], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([metric_label(m) for m in metrics], fontsize=9)
    ax.set_ylim(0, max(1.0, top * 1.1))
    ax.tick_params(axis="y", labelsize=7)
    protocols = ", ".join(task_label(p) for p in sorted(set(vqa["protocol"])))
    ax.set_title(f"VQA ({protocols}), {regime_label(regime)} labels: {source_label(source)} (%)", fontsize=10, pad=18)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.05, 1.0), frameon=False)
    return fig


def cd_figure(result, source: str):
    """Critical-difference diagram: mean ranks on an axis, the Nemenyi CD as a bar, and a line
    joining each group of encoders whose ranks differ by less than the CD (not significantly)."""
    from matplotlib.figure import Figure

    ranks = result.mean_ranks
    k = len(ranks)
    fig = Figure(figsize=(7.0, 1.6 + 0.28 * k), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlim(k + 0.5, 0.5)  # best (rank 1) on the right, as CD diagrams are drawn
    ax.set_ylim(-(k + 1), 2.2)
    ax.axhline(0, color="black", linewidth=1)
    for r in range(1, k + 1):
        ax.plot([r, r], [0, 0.15], color="black", linewidth=1)
        ax.text(r, 0.3, str(r), ha="center", va="bottom", fontsize=8)
    ax.plot([k + 0.3 - result.cd, k + 0.3], [1.5, 1.5], color="black", linewidth=2)
    ax.text(k + 0.3 - result.cd / 2, 1.65, f"CD = {result.cd:.2f}", ha="center", va="bottom", fontsize=8)
    for i, (encoder, rank) in enumerate(ranks.items()):
        y = -(i + 1)
        label = card_info(encoder)["label"]
        ax.plot([rank, rank], [0, y], color="grey", linewidth=0.8)
        ax.text(rank, y - 0.15, f"{label} ({rank:.2f})", ha="center", va="top", fontsize=8)
    for j, clique in enumerate(c for c in result.cliques if len(c) > 1):
        lo, hi = min(ranks[list(clique)]), max(ranks[list(clique)])
        ax.plot([lo, hi], [-0.35 - 0.25 * j] * 2, color="tab:red", linewidth=3, solid_capstyle="round")
    ax.set_axis_off()
    ax.set_title(f"Mean rank over {result.n} settings, Friedman p = {result.p:.3g}, Nemenyi alpha = {result.alpha:g}: "
                 f"{source_label(source)}", fontsize=9)
    return fig


def make_figures(aggregated: pd.DataFrame, out_dir: Path, *, notes: list[str] | None = None) -> list[Path]:
    """Write every figure the frame supports to ``out_dir`` (PNG and PDF each); return the paths.

    ``notes`` (optional) collects what was skipped and why, for the caller to print.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = notes if notes is not None else []
    frame = _prepare(aggregated)
    if frame.empty:
        notes.append("no finite results: no figures written")
        log.info(notes[-1])
        return []
    styles = _styles(_encoder_order(frame["encoder"]))
    written: list[Path] = []
    for source, rows in frame.groupby("source", sort=True):
        stem = _slug(source)
        used = {e: s for e, s in styles.items() if e in set(rows["encoder"])}
        written += _save(ratio_figure(rows, used, source), out_dir, f"ratio_{stem}")
        written += _save(families_figure(rows, used, source), out_dir, f"families_{stem}")
        radar = radar_figure(rows, used, source)
        if radar is None:
            notes.append(f"{source_label(source)}: no VQA results, so no VQA radar")
            log.info(notes[-1])
        else:
            written += _save(radar, out_dir, f"vqa_radar_{stem}")
        try:
            result = critical_difference(rows[["encoder", "protocol", "regime", "metric", "mean", "source"]])
        except ValueError as reason:  # fewer than 3 encoders or 2 complete settings
            notes.append(f"{source_label(source)}: no critical-difference diagram ({reason})")
            log.info(notes[-1])
        else:
            written += write_cd_diagram(result, out_dir, source)
    return written


def write_cd_diagram(result, out_dir: Path, source: str) -> list[Path]:
    """``critical_difference_<source>`` (PNG and PDF) under ``out_dir``, from a ``stats.CriticalDifference``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _save(cd_figure(result, source), out_dir, f"critical_difference_{_slug(source)}")
