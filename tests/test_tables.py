"""Paper-style tables: layout, marks, daggers, units, filters, formats, and LaTeX that compiles."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from asap_bench.report import cli_report
from asap_bench.report.cli_report import report_command
from asap_bench.report.tables import (build_tables, fmt1, latex_document, latex_escape, parse_regime, render,
                                      to_latex)
from asap_bench.results.paper import paper_frame

# --------------------------------------------------------------------------- LaTeX structure


def _strip_escapes(text: str) -> str:
    """Drop every backslash-escaped character (\\{, \\}, \\&, \\%, \\\\) so braces and & can be counted."""
    return re.sub(r"\\.", "", text)


def _top_level_cells(row: str) -> list[str]:
    cells, depth, current, i = [], 0, "", 0
    while i < len(row):
        ch = row[i]
        if ch == "\\" and i + 1 < len(row):
            current += row[i:i + 2]
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "&" and depth == 0:
            cells.append(current)
            current = ""
        else:
            current += ch
        i += 1
    return cells + [current]


def check_latex(text: str) -> int:
    """Structural checks a LaTeX engine would otherwise catch; returns the number of tabulars checked."""
    depth = 0
    for ch in _strip_escapes(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "a closing brace without an opening one"
    assert depth == 0, "unbalanced braces"
    for env in ("table", "tabular"):
        assert text.count(rf"\begin{{{env}}}") == text.count(rf"\end{{{env}}}")
    bodies = re.findall(r"\\begin\{tabular\}\{([^\n]*)\}\n(.*?)\\end\{tabular\}", text, flags=re.S)
    for spec, body in bodies:
        ncols = len(re.findall(r"[lcr]", re.sub(r"@\{[^}]*\}", "", spec)))
        top, mid, bottom = body.find(r"\toprule"), body.find(r"\midrule"), body.rfind(r"\bottomrule")
        assert -1 < top < mid < bottom, "booktabs rules missing or out of order"
        assert body.count(r"\toprule") == 1 and body.count(r"\bottomrule") == 1
        for first, last in re.findall(r"\\cmidrule\(lr\)\{(\d+)-(\d+)\}", body):
            assert 1 <= int(first) <= int(last) <= ncols
        for line in body.splitlines():
            line = line.strip()
            if not line.endswith(r"\\"):
                continue
            width = 0
            for cell in _top_level_cells(line[:-2]):
                span = re.match(r"\s*\\multicolumn\{(\d+)\}", cell)
                width += int(span.group(1)) if span else 1
            assert width == ncols, f"{width} cells where the header has {ncols}: {line[:80]}"
            assert line.count("$") % 2 == 0, f"unbalanced math in {line[:80]}"
    return len(bodies)


# --------------------------------------------------------------------------- helpers


def _marks(latex: str, table_label: str) -> dict[str, dict[int, set[str]]]:
    """{"best"|"second"|"dagger": {data column: {row labels}}} of one table in rendered LaTeX."""
    block = latex.split(rf"\label{{{table_label}}}")[1].split(r"\end{table}")[0]
    body = block.split(r"\midrule", 1)[1]
    marks: dict[str, dict[int, set[str]]] = {"best": {}, "second": {}, "dagger": {}}
    for line in body.splitlines():
        if not line.endswith(r"\\") or line.startswith(r"\multicolumn"):
            continue
        cells = [c.strip() for c in _top_level_cells(line[:-2])]
        for j, cell in enumerate(cells[1:]):
            for kind, token in (("best", r"\mathbf"), ("second", r"\underline"), ("dagger", r"\dagger")):
                if token in cell:
                    marks[kind].setdefault(j, set()).add(cells[0])
    return marks


def _frame(rows: list[tuple], source: str = "runs") -> pd.DataFrame:
    """An aggregated frame: (encoder, protocol, regime, metric, mean, std[, n_seeds])."""
    records = []
    for row in rows:
        encoder, protocol, regime, metric, mean, std, *rest = row
        records.append({"encoder": encoder, "protocol": protocol, "regime": regime, "metric": metric,
                        "mean": mean, "std": std, "n_seeds": rest[0] if rest else 5, "source": source})
    return pd.DataFrame(records)


RUNS = _frame([
    ("asap", "cls/ct-rate", 0.01, "auc", 0.8123, 0.004),
    ("hlip", "cls/ct-rate", 0.01, "auc", 0.8049, 0.002),
    ("random", "cls/ct-rate", 0.01, "auc", 0.6, 0.01),
    ("asap", "cls/ct-rate", 1.0, "auc", 0.84, 0.0),
    ("hlip", "cls/ct-rate", 1.0, "auc", 0.85, 0.0),
    ("random", "cls/ct-rate", 1.0, "auc", 0.65, 0.0),
    ("asap", "seg/msd-lung", 1.0, "dice", 0.70, 0.01),
    ("hlip", "seg/msd-lung", 1.0, "dice", 0.69, 0.02),
    ("asap", "seg/msd-lung", 1.0, "hd95", 12.5, 1.0),
    ("hlip", "seg/msd-lung", 1.0, "hd95", 10.25, 0.5),
])


def _sig(rows: list[tuple]) -> pd.DataFrame:
    """(encoder, protocol, regime, metric, p, p_adjusted, significant, test, unit, n)."""
    columns = ["encoder", "protocol", "regime", "metric", "p", "p_adjusted", "significant", "test", "unit", "n"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- the paper's tables

# Second-best per Table II column, read off the printed numbers (ties: every tied row).
TABLE_II_SECOND = [
    {"SimCroP"}, {"HLIP"}, {"HLIP"},            # CT-RATE 1, 10, 100 %: 81.0, 82.5, 83.0
    {"HLIP"}, {"SimCroP"}, {"HLIP"},            # STOIC-2021: 79.0, 83.2, 85.5
    {"HLIP", "SimCroP"}, {"SimCroP"},           # Rad-ChestCT: 73.4 (tie), 75.8
    {"M3AE", "HLIP"}, {"HLIP"},                 # LUNA16: 67.1 (tie), 73.5
    {"fVLM"}, {"SimCroP"},                      # INSPECT: 62.8, 65.5
    {"Merlin"}, {"fVLM"}, {"HLIP"},             # CC-CCII (ACC): 77.2, 86.1, 91.4
]


@pytest.fixture(scope="module")
def paper_latex() -> str:
    return report_command(source="paper", fmt="latex", out=None)


def test_table_ii_bold_is_asap_and_underline_is_the_papers_second_best(paper_latex):
    marks = _marks(paper_latex, "tab:asap-paper-ii")
    assert marks["best"] == {j: {"ASAP"} for j in range(15)}
    assert [marks["second"].get(j, set()) for j in range(15)] == TABLE_II_SECOND
    # the paper's daggers: every ASAP cell except INSPECT 10 % and 100 % (columns 10, 11)
    assert marks["dagger"] == {j: {"ASAP"} for j in range(15) if j not in (10, 11)}


def test_every_paper_table_marks_follow_its_numbers():
    """An independent recomputation of bold / underline for all six tables (dense ranks on printed values)."""
    frame = paper_frame()
    for table in build_tables(frame):
        assert table.paper_layout
        for j, column in enumerate(table.columns):
            rows = frame[(frame["table"] == table.key) & (frame["protocol"] == column.protocol)
                         & (frame["metric"] == column.metric) & (frame["regime"] == column.regime)]
            values = sorted(set(rows["mean"]), reverse=True)
            expect_best = set(rows.loc[rows["mean"] == values[0], "encoder"])
            expect_second = set(rows.loc[rows["mean"] == values[1], "encoder"])
            got = {kind: {table.rows[i].encoder for (i, jj), c in table.cells.items() if jj == j and c.mark == kind}
                   for kind in ("best", "second")}
            assert got == {"best": expect_best, "second": expect_second}, (table.key, column)


def test_ties_in_the_paper_share_marks():
    tables = {t.key: t for t in build_tables(paper_frame())}

    def marked(key: str, protocol: str, metric: str, kind: str) -> set[str]:
        t = tables[key]
        j = next(j for j, c in enumerate(t.columns) if c.protocol == protocol and c.metric == metric)
        return {t.rows[i].encoder for (i, jj), c in t.cells.items() if jj == j and c.mark == kind}

    assert marked("III", "seg/btcv", "dice", "best") == {"asap", "hi-end-mae"}  # both 81.7
    assert marked("III", "seg/btcv", "dice", "second") == {"simcrop"}  # 80.3
    assert marked("V", "rg/ct-rate", "bertscore_f1", "best") == {"hlip"}  # 75.9; ASAP is not best here
    assert marked("V", "rg/ct-rate", "bertscore_f1", "second") == {"asap", "mrm"}  # both 75.8


def test_paper_tables_have_the_papers_shape(paper_latex):
    assert check_latex(paper_latex) == 6
    for tag, n in {"ii": 15, "iii": 12, "iv": 12, "v": 10, "vi": 6, "vii": 12}.items():
        block = paper_latex.split(rf"\label{{tab:asap-paper-{tag}}}")[1]
        spec = re.search(r"\\begin\{tabular\}\{([^\n]*)\}\n", block).group(1)
        assert spec == "@{}l" + "c" * n + "@{}"
    assert "Quoted from the paper" in paper_latex
    assert r"\multicolumn{16}{l}{\textit{3D Med-SSL}}" in paper_latex
    assert "INSPECT" in paper_latex and r"CT-Rate$\rightarrow$AHPH-10K" in paper_latex
    vii = paper_latex.split(r"\label{tab:asap-paper-vii}")[1].split(r"\end{table}")[0]
    assert r"$\mathbf{68.2}$" in vii and "_{" not in vii.split(r"\midrule", 1)[1]  # no std printed in Table VII


# --------------------------------------------------------------------------- measured numbers


def test_fractions_print_as_percent_and_distances_in_mm():
    text = render(RUNS, "latex", metric="auc,dice,hd95")
    assert "$\\mathbf{81.2_{0.4}}$" in text  # 0.8123 -> 81.2, std 0.004 -> 0.4
    assert "$\\underline{80.5_{0.2}}$" in text  # 0.8049 -> 80.5
    hd = {c.text for t in build_tables(RUNS, metric="hd95") for c in t.cells.values()}
    assert hd == {"12.5", "10.3"}  # 10.25 rounds half up
    table = build_tables(RUNS, metric="hd95")[0]
    best = [table.rows[i].encoder for (i, _), c in table.cells.items() if c.mark == "best"]
    assert best == ["hlip"]  # lower is better for HD95
    assert "HD95 in mm" in table.caption("latex")


def test_aggregate_output_is_labelled_run_or_demo():
    frame = RUNS.assign(source="run", synthetic=[True] * 3 + [False] * (len(RUNS) - 3))
    tables = build_tables(frame, metric="auc")
    assert tables[0].sources == ["runs", "demo"]
    assert "synthetic demo cohort" in tables[0].caption("latex")


def test_fractions_above_one_are_refused():
    bad = _frame([("asap", "cls/ct-rate", 1.0, "auc", 84.1, 0.1)])
    with pytest.raises(ValueError, match="fractions"):
        render(bad, "latex")


def test_rounding_is_half_up_on_the_decimal_value():
    assert fmt1(0.8225 * 100) == "82.3" and fmt1(82.25) == "82.3" and fmt1(82.24999) == "82.2"


def test_runs_use_the_paper_layout_when_they_fit():
    tables = build_tables(RUNS)
    assert [t.key for t in tables] == ["II", "III"]
    assert tables[0].paper_layout and [c.header for c in tables[0].columns] == [
        ("CT-RATE", "(AUC)", "1%"), ("CT-RATE", "(AUC)", "100%")]
    assert "Measured with asap-bench" in tables[0].caption("latex")


def test_other_metrics_and_protocols_get_a_generic_table():
    frame = pd.concat([RUNS, _frame([("asap", "cls/ct-rate", 0.01, "balanced_acc", 0.7, 0.01),
                                     ("asap", "prog/stoic-severity", 0.1, "auc", 0.75, 0.02),
                                     ("hlip", "prog/stoic-severity", 0.1, "auc", 0.70, 0.02)])])
    tables = {t.key: t for t in build_tables(frame, metric="all")}
    assert not tables["II"].paper_layout
    assert ("CT-RATE", "(BAcc)", "1%") in [c.header for c in tables["II"].columns]
    assert tables["prog"].columns[0].header == ("STOIC-2021 severity", "(AUC)", "10%")
    assert check_latex(to_latex(list(tables.values()))) == len(tables)


def test_significance_daggers_and_caption():
    sig = _sig([
        ("asap", "cls/ct-rate", 0.01, "auc", 0.001, 0.004, True, "paired bootstrap", "case", 3038),
        ("hlip", "cls/ct-rate", 1.0, "auc", 0.2, 0.4, False, "paired bootstrap", "case", 3038),
        ("asap", "seg/msd-lung", 1.0, "dice", 0.01, 0.02, True, "Wilcoxon signed-rank", "case", 32),
    ])
    text = render(RUNS, "latex", sig, metric="auc,dice")
    assert r"$\mathbf{81.2_{0.4}^{\dagger}}$" in text
    assert r"85.0_{0.0}^{\dagger}" not in text
    assert "paired bootstrap, unit case, n = 3038" in text
    assert "Wilcoxon signed-rank, unit case, n = 32" in text
    assert r"adjusted p $<$ 0.05" in text
    assert check_latex(text) == 2


def test_seed_level_wilcoxon_over_five_seeds_never_marks_a_cell():
    sig = _sig([("asap", "cls/ct-rate", 0.01, "auc", 0.03, 0.03, True, "Wilcoxon signed-rank", "seed", 5)])
    table = build_tables(RUNS, sig, metric="auc")[0]
    assert not any(c.dagger for c in table.cells.values())
    caption = table.caption("markdown")
    assert "cannot reach p < 0.05" in caption and "0.0625" in caption


def test_a_test_flagged_as_unable_to_reach_alpha_is_named_not_marked():
    sig = _sig([("asap", "cls/ct-rate", 0.01, "auc", 1.0, 1.0, True, "Wilcoxon signed-rank", "label", 18)])
    sig["can_be_significant"], sig["min_p"] = False, 1.0
    table = build_tables(RUNS, sig, metric="auc")[0]
    assert not any(c.dagger for c in table.cells.values())
    assert "unit label (n = 18) cannot reach p < 0.05 (smallest attainable p = 1)" in table.caption("csv")
    sig["min_p"] = 0.001
    assert "could not be decided" in build_tables(RUNS, sig, metric="auc")[0].caption("csv")


def test_a_p_value_above_alpha_never_marks_a_cell():
    sig = _sig([("asap", "cls/ct-rate", 0.01, "auc", 0.01, 0.2, True, "paired bootstrap", "case", 100)])
    assert not any(c.dagger for c in build_tables(RUNS, sig, metric="auc")[0].cells.values())
    assert not any(c.dagger for c in build_tables(RUNS, sig, metric="auc", alpha=0.005)[0].cells.values())


def test_without_significance_the_caption_says_so():
    caption = build_tables(RUNS)[0].caption("latex")
    assert "No significance test was supplied" in caption


def test_quoted_and_measured_side_by_side_are_labelled_and_ranked_apart():
    frame = pd.concat([paper_frame(tables=["II"]), RUNS], ignore_index=True)
    table = build_tables(frame, encoders="asap,hlip", metric="auc", regime="1%")[0]
    assert table.mixed and table.sources == ["paper", "runs"]
    by_row = {(table.rows[i].encoder, table.rows[i].source): c for (i, j), c in table.cells.items()}
    assert by_row[("asap", "paper")].mark == "best" and by_row[("asap", "runs")].mark == "best"
    assert by_row[("hlip", "paper")].mark == "second"
    latex = to_latex([table])
    assert "Method & Source &" in latex and "ASAP & paper &" in latex and "ASAP & runs &" in latex
    assert "within each source" in latex and "'paper' rows are quoted from the paper" in latex
    assert check_latex(latex) == 1


def test_filters():
    frame = paper_frame()
    assert {t.key for t in build_tables(frame, family="seg,ext")} == {"III", "VII"}
    vi = build_tables(frame, metric="auc", family="voc,ret")[0]
    assert [c.protocol for c in vi.columns] == ["voc/ct-rate", "voc/ahph"]
    ii = build_tables(frame, family="cls", regime="0.01,10%", encoders=["asap", "random"])[0]
    assert {c.regime for c in ii.columns} == {0.01, 0.1}
    assert {r.encoder for r in ii.rows} == {"asap", "random"}
    with pytest.raises(ValueError, match="no results left"):
        build_tables(frame, encoders="nobody")
    with pytest.raises(ValueError, match="fraction"):
        parse_regime("10")
    assert parse_regime("10 %") == 0.1 and parse_regime("0.01") == 0.01


def test_unknown_encoders_go_to_other_and_are_escaped():
    frame = _frame([("my_enc#1", "cls/ct-rate", 1.0, "auc", 0.9, 0.01), ("asap", "cls/ct-rate", 1.0, "auc", 0.8, 0.01)])
    table = build_tables(frame)[0]
    assert [r.group for r in table.rows] == ["vlp", "other"]
    latex = to_latex([table])
    assert r"my\_enc\#1" in latex and r"\textit{Other}" in latex
    assert check_latex(latex) == 1
    assert latex_escape("a&b%c$d~e^f\\") == r"a\&b\%c\$d\textasciitilde{}e\textasciicircum{}f\textbackslash{}"


def test_markdown_csv_and_json_carry_the_same_cells():
    frame = paper_frame(tables=["II"])
    md = render(frame, "markdown")
    assert md.startswith("**Table II.**") and "**82.2 ± 0.1**†" in md and "*81.0 ± 0.1*" in md
    assert len([l for l in md.splitlines() if l.startswith("| ")]) == 2 + 14 + 2  # header, rule, rows, groups
    rows = list(csv.DictReader(io.StringIO(render(frame, "csv"))))
    assert len(rows) == 210
    asap = next(r for r in rows if r["encoder"] == "asap" and r["protocol"] == "cls/ct-rate" and r["regime"] == "0.01")
    assert asap["mean"] == "82.2" and asap["best"] == "True" and asap["dagger"] == "True" and asap["source"] == "paper"
    payload = json.loads(render(frame, "json"))
    (table,) = payload["tables"]
    assert table["table"] == "II" and len(table["cells"]) == 210 and len(table["columns"]) == 15
    assert "Quoted from the paper" in table["caption"]
    with pytest.raises(ValueError, match="unknown table format"):
        render(frame, "html")


# --------------------------------------------------------------------------- report_command


def _fake_records() -> pd.DataFrame:
    rows = []
    for synthetic in (True, False):
        for encoder, base in (("asap", 0.8), ("hlip", 0.7)):
            for seed in range(3):
                rows.append({"source": "run", "encoder": encoder, "protocol": "cls/ct-rate", "family": "cls",
                             "regime": 1.0, "seed": seed, "metric": "auc", "value": base + 0.01 * seed,
                             "status": "ok", "protocol_fingerprint": "p", "encoder_fingerprint": encoder,
                             "synthetic": synthetic, "path": f"{encoder}{seed}.json"})
    return pd.DataFrame(rows)


def _fake_aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    agg = rows.groupby(["source", "encoder", "protocol", "regime", "metric"], as_index=False)["value"].agg(
        mean="mean", std="std", n_seeds="count")
    return agg


def test_report_command_runs_and_both(tmp_path, monkeypatch):
    import asap_bench.results.store as store
    import asap_bench.stats as stats

    calls = []

    def fake_best_other(frame, **kwargs):
        calls.append((sorted(set(frame["source"])), kwargs))
        return _sig([("asap", "cls/ct-rate", 1.0, "auc", 0.001, 0.001, True, "paired bootstrap", "case", 300)])

    monkeypatch.setattr(store, "load_records", lambda paths: _fake_records())
    monkeypatch.setattr(stats, "aggregate", _fake_aggregate)
    monkeypatch.setattr(stats, "best_other", fake_best_other)
    out = tmp_path / "report" / "tables.tex"
    text = report_command([tmp_path], "both", "latex", None, "cls", None, None, out)
    assert out.read_text() == text
    assert "ASAP & paper &" in text and "ASAP & runs &" in text and "ASAP & demo &" in text
    assert "synthetic demo cohort" in text
    assert r"\mathbf{81.0_{1.0}^{\dagger}}" in text  # measured rows: fractions -> percent, dagger from the test
    assert sorted(c[0][0] for c in calls) == ["demo", "runs"]  # one test per source and table
    assert all(c[1]["only_best"] and c[1]["metrics"] == ["auc"] for c in calls)
    assert check_latex(text) == 1


def test_report_command_checks_its_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown source"):
        report_command(source="web")
    with pytest.raises(ValueError, match="unknown format"):
        report_command(source="paper", fmt="docx")
    with pytest.raises(ValueError, match="unknown family"):
        report_command(source="paper", family="cls,segm")
    with pytest.raises(FileNotFoundError, match="no such record folder"):
        report_command([tmp_path / "nothing"], source="runs")
    text = report_command(source="paper", fmt="md", family="prog")
    assert capsys.readouterr().out == text and text.startswith("**Table IV.**")


def test_report_command_uses_results_runs_by_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(Path("results") / "runs")):
        report_command(source="runs")
    assert cli_report.DEFAULT_RECORDS == Path("results") / "runs"


# --------------------------------------------------------------------------- compiling


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed "
                    "(Debian: apt-get install --no-install-recommends texlive-latex-base texlive-latex-recommended)")
def test_generated_tables_compile_with_pdflatex(tmp_path, paper_latex):
    sig = _sig([("asap", "cls/ct-rate", 0.01, "auc", 0.001, 0.004, True, "paired_bootstrap", "case", 3038)])
    odd = _frame([("my_enc#1&co", "cls/ct-rate", 0.01, "auc", 0.5, 0.1)])
    measured = to_latex(build_tables(pd.concat([paper_frame(tables=["II", "VI"]), RUNS, odd]), sig, metric="all"))
    for name, body in (("paper", paper_latex), ("measured", measured)):
        (tmp_path / f"{name}.tex").write_text(latex_document(body))
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-3000:]
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "Overfull \\hbox" not in log, "a table is wider than the text"
        assert (tmp_path / f"{name}.pdf").stat().st_size > 0
