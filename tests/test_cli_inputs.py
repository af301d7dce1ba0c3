"""Inputs the command line refuses before any job runs, and gaps the report names instead of hiding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.results.record import read_record, write_record

RUN = ["run", "--encoder", "random", "--task", "cls/stoic", "--quiet"]


@pytest.mark.parametrize("args, says", [
    (["--ratios", "0.5"], "0.5 is not a label regime of the selected protocols (their regimes: 0.01, 0.1, 1)"),
    (["--ratios", "2"], "expected label fractions in (0, 1]"),
    (["--ratios", "0"], "expected label fractions in (0, 1]"),
    (["--ratios", "one"], "expected comma-separated fractions"),
    (["--seeds", "0"], "'--seeds': 0 is not in the range x>=1"),
    (["--seed-list", "-1"], "--seed-list: expected non-negative seeds, got '-1'"),
    (["--seed-list", "1,1"], "--seed-list: seed listed twice"),
    (["--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["--nproc", "0"], "'--nproc': 0 is not in the range x>=1"),
])
def test_run_refuses_bad_options_before_anything_is_written(demo_root, tmp_path, args, says):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*RUN, "--data-root", str(demo_root), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # no log, no record, no folder


def test_an_encoder_typo_fails_before_records_are_written_under_it(demo_root, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--encoder", "randm", "--task", "cls/stoic", "--data-root",
                                       str(demo_root), "--out", str(out), "--quiet"])
    assert result.exit_code == 1
    assert "unknown encoder 'randm'; did you mean 'random'?" in result.output
    assert not out.exists()
    missing_card = CliRunner().invoke(main, ["run", "--encoder", str(tmp_path / "mine.yaml"), "--task", "cls/stoic",
                                             "--data-root", str(demo_root), "--out", str(out), "--quiet"])
    assert missing_card.exit_code == 2 and "mine.yaml does not exist" in missing_card.output
    assert not out.exists()


def test_protocols_validate_reports_both_files_of_one_id(tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "protocols" / "cls" / "stoic.yaml"
    if not shipped.is_file():  # an installed package keeps its protocols in the package
        from asap_bench.resources import resource_dir

        shipped = resource_dir("protocols") / "cls" / "stoic.yaml"
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("stoic.yaml", "stoic-copy.yaml"):
        shutil.copy(shipped, folder / name)
    result = CliRunner().invoke(main, ["protocols", "validate", str(folder)])
    assert result.exit_code == 1
    failures = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 2, result.output
    for name, other in (("stoic.yaml", "stoic-copy.yaml"), ("stoic-copy.yaml", "stoic.yaml")):
        assert any(str(folder / name) + ":" in line and "duplicate id 'cls/stoic'" in line and other in line
                   for line in failures), result.output
    assert "0 valid, 2 invalid" in result.output


def test_report_names_every_incomplete_cell(demo_root, tmp_path):
    out = tmp_path / "runs"
    env = {"ASAP_BENCH_CACHE": str(tmp_path / "cache")}
    ran = CliRunner(env=env).invoke(main, [*RUN, "--seeds", "2", "--ratios", "0.01,1", "--data-root", str(demo_root),
                                           "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    folder = out / "random" / "cls__stoic"
    for seed in (0, 1):  # every seed of the 1 % regime failed, as an out-of-memory run leaves it
        path = folder / f"r0.01_s{seed}.json"
        record = read_record(path)
        path.unlink()
        (folder / f"r0.01_s{seed}.units.json").unlink()
        write_record(path, record.model_copy(update={"status": "failed", "metrics": {}, "units_file": None,
                                                     "units_sha256": None, "error": "RuntimeError: out of memory"}))
    (folder / "r1.0_s1.json").unlink()  # and one seed of 100 % is missing
    (folder / "r1.0_s1.units.json").unlink()
    result = CliRunner().invoke(main, ["report", "--records", str(out), "--format", "markdown", "--no-significance"])
    assert result.exit_code == 0, result.output
    assert "2 incomplete cell(s)" in result.stderr
    assert "demo: random cls/stoic regime 0.01: failed seeds [0, 1] (RuntimeError: out of memory)" in result.stderr
    assert "demo: random cls/stoic regime 1: missing seeds [1]" in result.stderr
    scoped = CliRunner().invoke(main, ["report", "--records", str(out), "--format", "markdown", "--regime", "100%",
                                       "--no-significance"])
    assert scoped.exit_code == 0, scoped.output
    assert "1 incomplete cell(s)" in scoped.stderr and "regime 0.01" not in scoped.stderr  # the filters scope it
