"""``asap-bench report --compare A,B``: one encoder against another over every setting both have.

A setting is a (protocol, label ratio, metric) cell; its value is the mean over seeds
(or the number the paper prints). The settings of a benchmark mix units (fractions,
percent, HD95 in mm), so the Wilcoxon signed-rank test over them ranks the unit-free
symmetric relative difference ``stats.SCALES["relative"]``; raw differences are shown
beside it only where every setting shares one unit. Mean ranks and the Friedman /
Nemenyi critical-difference diagram rank the encoders within each setting, which has
no unit either. Each data source (quoted paper numbers, measured runs, the synthetic
demo) is compared on its own, never pooled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .. import stats

QUOTED = "computed from numbers quoted from the paper, not measured"


def parse_pair(text: str) -> tuple[str, str]:
    """``"A,B"`` -> (A, B): two different encoder names."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if len(names) != 2 or names[0] == names[1]:
        raise ValueError(f"--compare takes two different encoders as A,B (e.g. asap,simcrop), not {text!r}")
    return names[0], names[1]


def _unit_of(metric: str, source: str) -> str:
    if source == "paper":
        return "percent"
    return "mm" if metric in stats.LOWER_IS_BETTER else "fraction"


def _wilcoxon(frame: pd.DataFrame, a: str, b: str, scale: str, alpha: float) -> dict[str, Any]:
    result = stats.across_settings(frame, a, b, scale=scale, alpha=alpha)
    matrix = stats.settings_matrix(frame, encoders=[a, b])
    d = stats.setting_differences(matrix, a, b, scale)
    return {"scale": scale, "definition": stats.SCALES[scale], "n": result.n, "statistic": result.statistic,
            "p": result.p, "effect": result.effect, "method": stats.wilcoxon_method(d.to_numpy()),
            "exact_min_p": result.min_p, "significant": result.significant(alpha)}


def _ranks(frame: pd.DataFrame, encoders: Sequence[str] | None) -> dict[str, Any]:
    matrix = stats.settings_matrix(frame, encoders=encoders)
    ranks = stats.mean_ranks(frame, encoders=encoders)
    return {"k": int(matrix.shape[1]), "n": int(matrix.shape[0]), "ranks": {e: float(r) for e, r in ranks.items()}}


def _paper_claim(paper: pd.DataFrame, a: str, b: str) -> dict[str, Any] | None:
    """The paper's across-task p beside what its own tables give, over all settings and over II-VI."""
    from ..results.paper import ACROSS_TASKS_CLAIM as claim, load_paper_tables

    if {a, b} != {claim["a"], claim["b"]}:
        return None
    tested = [t for t, table in load_paper_tables().items() if table.significance is not None]
    subsets = {"all quoted tables": paper, f"Tables {tested[0]}-{tested[-1]}": paper[paper["table"].isin(tested)]}
    computed = []
    for label, rows in subsets.items():
        rel, raw = (stats.across_settings(rows, a, b, scale=s) for s in ("relative", "raw"))
        computed.append({"settings": label, "n": rel.n, "p_relative": rel.p, "p_raw": raw.p,
                         "statistic_relative": rel.statistic, "exact_min_p": rel.min_p})
    matches = any(f"{c[k]:.2e}" == f"{claim['p']:.2e}" for c in computed for k in ("p_relative", "p_raw"))
    return {**claim, "computed": computed, "reproducible": matches}


def compare_source(frame: pd.DataFrame, source: str, a: str, b: str, *, encoders: Sequence[str] | None = None,
                   alpha: float = stats.ALPHA, paper: pd.DataFrame | None = None) -> dict[str, Any]:
    """The whole comparison for one data source's aggregated frame (columns as ``stats.aggregate``)."""
    if frame.empty:
        raise ValueError(f"no {source} results left to compare after the --metric/--family/--regime filters")
    present = sorted(set(frame["encoder"]))
    absent = [e for e in (a, b) if e not in present]
    if absent:
        raise ValueError(f"no {source} results for encoder(s) {absent}; encoders there: {', '.join(present)}")
    matrix = stats.settings_matrix(frame, encoders=[a, b])
    if matrix.empty:
        raise ValueError(f"{a} and {b} share no setting in the {source} results")
    metrics = list(matrix.index.get_level_values("metric"))
    units = sorted({_unit_of(m, source) for m in metrics})
    d = stats.setting_differences(matrix, a, b, "relative")
    wins, ties, losses, sign_p = stats.sign_test(d.to_numpy())
    raw = (_wilcoxon(frame, a, b, "raw", alpha) if len(units) == 1 else
           {"scale": "raw", "skipped": f"the settings mix units ({', '.join(units)}): raw differences would rank "
                                       "them against each other"})
    out: dict[str, Any] = {
        "source": source, "a": a, "b": b, "alpha": alpha, "settings": len(matrix),
        "unit": "setting (protocol x label ratio x metric), valued by "
                + ("the mean the paper prints" if source == "paper" else "its mean over seeds"),
        "metric_units": units, "wins": wins, "ties": ties, "losses": losses, "sign_test_p": sign_p,
        "wilcoxon": _wilcoxon(frame, a, b, "relative", alpha), "raw": raw,
        "mean_ranks": _ranks(frame, sorted(set(encoders) | {a, b}) if encoders else None),
    }
    if "table" in frame:
        keys = set(matrix.index)
        tables = frame.assign(_k=list(zip(frame["protocol"], frame["regime"], frame["metric"])))
        tables = tables[tables["_k"].isin(keys) & (tables["encoder"] == a)]
        out["tables"] = {str(t): int(n) for t, n in tables.groupby("table", sort=False).size().items()}
    if source == "paper":
        out["computed_from"] = QUOTED
        claim = _paper_claim(paper if paper is not None else frame, a, b)
        if claim is not None:
            out["paper_claim"] = claim
    return out


def _p(value: float) -> str:
    return "undefined" if not math.isfinite(value) else f"{value:.3g}"


def _test_line(w: dict[str, Any], a: str) -> str:
    if "skipped" in w:
        return f"  raw differences: not tested: {w['skipped']}"
    effect = f"{100 * w['effect']:+.2f} %" if w["scale"] == "relative" else f"{w['effect']:+.3g}"
    label = "relative scale" if w["scale"] == "relative" else "raw differences"
    return (f"  {label}: n = {w['n']}, W = {w['statistic']:g}, p = {_p(w['p'])}"
            f"{' (significant)' if w['significant'] else ''}; mean difference {effect} ({a} better when > 0)\n"
            f"    scale: {w['definition']}\n"
            f"    p from scipy.stats.wilcoxon: {w['method']}; an exact test's smallest p at this n: "
            f"{_p(w['exact_min_p'])}")


def _claim_lines(claim: dict[str, Any]) -> list[str]:
    lines = [(f"The paper states p = {claim['p']:.3g} for {claim['a']} vs {claim['b']} across task categories "
              f"({claim['test']}, {claim['where']}), naming neither the units nor n.")]
    for c in claim["computed"]:
        lines.append(f"  over the {c['n']} settings of {c['settings']}: p = {_p(c['p_relative'])} (relative scale), "
                     f"{_p(c['p_raw'])} (raw differences), two-sided")
    if claim["reproducible"]:
        lines.append("  One of these matches the stated p.")
    else:
        lines.append(f"  p = {claim['p']:.3g} is not reproducible from the published tables.")
    if all(c["statistic_relative"] == 0 for c in claim["computed"]):
        lines.append(f"  {claim['a']} is ahead of {claim['b']} in every quoted setting, so W = 0 and p depends on "
                     "n alone (an exact test: 2/2^n).")
    return lines


def render_text(result: dict[str, Any]) -> str:
    from .html import source_label

    a, b, source = result["a"], result["b"], result["source"]
    head = f"{a} vs {b}: {source_label(source)}"
    lines = [head, "=" * len(head),
             f"n = {result['settings']} settings where both have a number; unit: {result['unit']}",
             f"metric units: {', '.join(result['metric_units'])}"]
    if "tables" in result:
        lines.append("by table: " + ", ".join(f"{t} {n}" for t, n in result["tables"].items()))
    lines.append(f"{a} better in {result['wins']}, tied in {result['ties']}, worse in {result['losses']} "
                 f"(sign test, two-sided: p = {_p(result['sign_test_p'])})")
    lines.append(f"Wilcoxon signed-rank over settings (two-sided, alpha = {result['alpha']:g}):")
    lines.append(_test_line(result["wilcoxon"], a))
    lines.append(_test_line(result["raw"], a))
    ranks = result["mean_ranks"]
    if ranks["n"]:
        lines.append(f"Mean ranks (1 = best; ranked within each setting) over the {ranks['n']} settings all "
                     f"{ranks['k']} encoders have:")
        lines.append("  " + ", ".join(f"{e} {r:.2f}" for e, r in ranks["ranks"].items()))
    else:
        lines.append(f"Mean ranks: no setting has a number for all {ranks['k']} encoders; choose some with --encoders")
    if "paper_claim" in result:
        lines += _claim_lines(result["paper_claim"])
    if "computed_from" in result:
        lines.append(f"Every p above is {result['computed_from']}.")
    return "\n".join(lines) + "\n"


def _figures(frame: pd.DataFrame, source: str, encoders: Sequence[str] | None, out_dir: Path,
             notes: list[str]) -> list[Path]:
    from .plots import write_cd_diagram

    try:
        result = stats.critical_difference(frame, encoders=encoders)
    except ValueError as reason:  # fewer than 3 encoders or 2 complete settings
        notes.append(f"{source}: no critical-difference diagram ({reason})")
        return []
    return write_cd_diagram(result, Path(out_dir), source)


def compare_command(frames: dict[str, pd.DataFrame], pair: str, *, fmt: str = "text",
                    encoders: Sequence[str] | None = None, alpha: float = stats.ALPHA,
                    figures: str | Path | None = None, paper: pd.DataFrame | None = None) -> tuple[str, list[str]]:
    """(text or JSON, notes) comparing the pair in every source of ``frames`` (source -> aggregated frame).

    ``paper`` is the unfiltered paper frame the paper's own claim is checked against.
    With ``figures``, each source's critical-difference diagram goes there.
    """
    a, b = parse_pair(pair)
    results, notes, problems = [], [], []
    for source, frame in frames.items():
        try:
            results.append(compare_source(frame, source, a, b, encoders=encoders, alpha=alpha, paper=paper))
        except ValueError as reason:  # one source without the pair does not hide the others
            problems.append(reason)
            notes.append(f"{source}: not compared ({reason})")
    if not results:
        raise problems[0] if problems else ValueError("no results to compare")
    if figures is not None:
        written = []
        for source, frame in frames.items():
            written += _figures(frame, source, sorted(set(encoders) | {a, b}) if encoders else None,
                                Path(figures), notes)
        notes.insert(0, f"{len(written)} figure files under {figures}")
    if fmt == "json":
        return json.dumps(results, indent=1, default=float) + "\n", notes
    return "\n".join(render_text(r) for r in results), notes
