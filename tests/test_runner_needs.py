"""What the runner provides for each kind of family: pooled patch tokens, and fresh encoders with a
resumable work folder for fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.data.cache import entries
from asap_bench.tasks import base

TESTS = Path(__file__).parent


@pytest.fixture
def env(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(base.FAMILIES, "rg", "families_for_tests:TokenMean")
    monkeypatch.setitem(base.FAMILIES, "seg", "families_for_tests:FineTune")
    monkeypatch.syspath_prepend(str(TESTS))
    return {"root": demo_root, "out": tmp_path / "runs", "cache": tmp_path / "cache"}


def _run(env, task, *extra):
    return CliRunner().invoke(main, ["run", "--encoder", "random", "--task", task, "--seeds", "2", "--data-root",
                                     str(env["root"]), "--out", str(env["out"]), "--quiet", *extra])


def test_token_family_gets_pooled_tokens_once_and_records_its_text_model(env):
    result = _run(env, "rg/ctrg")
    assert result.exit_code == 0, result.output
    records = sorted(env["out"].glob("random/rg__ctrg/r*_s*.json"))
    records = [json.loads(p.read_text()) for p in records if not p.name.endswith(".units.json")]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records), records
    assert records[0]["provenance"]["text_model"] == "tiny"
    features = [e for e in entries(env["cache"]) if e["kind"] == "features"]
    assert len(features) == 1 and features[0]["tokens"] == [2, 2, 2]
    assert (features[0]["path"] / "tokens.npy").is_file()


def test_token_entry_is_separate_from_the_global_one(env, monkeypatch):
    monkeypatch.setitem(base.FAMILIES, "cls", "families_for_tests:MeanDifference")
    assert _run(env, "cls/stoic", "--ratios", "1").exit_code == 0
    assert _run(env, "rg/ctrg").exit_code == 0
    kinds = sorted(str(e.get("tokens")) for e in entries(env["cache"]) if e["kind"] == "features")
    assert kinds == ["None", "[2, 2, 2]"]


def test_fine_tuning_family_builds_fresh_seeded_encoders_and_resumes(env, monkeypatch):
    monkeypatch.setenv("ASAP_TEST_STOP_AT", "4")  # the first job is interrupted at step 4, the run stops
    first = _run(env, "seg/msd-lung", "--ratios", "1")
    assert first.exit_code == 1 and "Aborted" in first.output, first.output
    folder = env["out"] / "random" / "seg__msd-lung"
    assert not list(folder.glob("r1.0_s*.json"))  # an interruption is not a failure: nothing is recorded
    assert len(list(folder.glob(".r1.0_s0.work-*"))) == 1  # training state kept for the rerun
    monkeypatch.delenv("ASAP_TEST_STOP_AT")
    second = _run(env, "seg/msd-lung", "--ratios", "1")
    assert second.exit_code == 0, second.output
    records = {s: json.loads((folder / f"r1.0_s{s}.json").read_text()) for s in (0, 1)}
    assert all(r["status"] == "ok" for r in records.values())
    assert records[0]["notes"]["starts"] == "0,4"  # resumed at step 4, not from scratch
    assert records[1]["notes"]["starts"] == "0"
    assert records[0]["selected"]["weight_sum"] != records[1]["selected"]["weight_sum"]  # seeded by the job
    assert records[0]["selected"]["input_size"] == [64, 64, 32]  # the demo ViT's size
    assert not list(folder.glob(".r1.0_s*.work-*"))  # spent once recorded


def test_a_card_file_runs_under_its_own_name(env, tmp_path):
    import yaml

    from asap_bench.encoders.registry import forget_card
    from asap_bench.resources import resource_dir

    card = yaml.safe_load((resource_dir("baselines") / "random.yaml").read_text())
    card["name"] = "my-vit"
    path = tmp_path / "my-vit.yaml"
    path.write_text(yaml.safe_dump(card))
    try:
        result = CliRunner().invoke(main, ["run", "--encoder", str(path), "--task", "cls/stoic", "--ratios", "1",
                                           "--seed-list", "0", "--data-root", str(env["root"]), "--out",
                                           str(env["out"]), "--quiet", "--dry-run"])
    finally:
        forget_card("my-vit")
    assert result.exit_code == 0, result.output
    assert "my-vit" in result.output and str(path) not in result.output


def test_a_family_that_cannot_be_imported_fails_its_jobs_not_the_run(env, monkeypatch):
    monkeypatch.setitem(base.FAMILIES, "cls", "families_for_tests:MeanDifference")
    monkeypatch.setitem(base.FAMILIES, "rg", "no_such_module_anywhere:Family")
    result = _run(env, "rg/ctrg,cls/stoic", "--ratios", "1")
    assert result.exit_code == 1, result.output
    assert "ModuleNotFoundError" in result.output
    assert json.loads((env["out"] / "random" / "rg__ctrg" / "r1.0_s0.json").read_text())["status"] == "failed"
    assert json.loads((env["out"] / "random" / "cls__stoic" / "r1.0_s1.json").read_text())["status"] == "ok"
