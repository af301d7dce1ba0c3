"""`asap-bench leaderboard add / show`: what a bundle must prove, and what a tampered one cannot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from asap_bench import protocol as protocols_module
from asap_bench.cli import main
from asap_bench.encoders import registry
from asap_bench.submit.bundle import write_manifest

REPO = Path(__file__).resolve().parents[1]
TASK = "cls/stoic"


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundles(demo_root, tmp_path_factory):
    """Bundles of two encoders (the built-in random init and a card file of the same family), and one made
    under a bumped version of the protocol; cls/stoic, 2 seeds (1 for the older version), demo cohort."""
    folder = tmp_path_factory.mktemp("bundles")
    card = yaml.safe_load((REPO / "baselines" / "random.yaml").read_text())
    card.update(name="random-wide", table_label="Random wide",
                sizes={"demo": {**card["sizes"]["demo"], "embed_dim": 64}})
    card_path = folder / "random-wide.yaml"
    card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    before = dict(registry._REGISTERED)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ASAP_BENCH_DATA", str(demo_root))
        patch.setenv("ASAP_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "submission-cache"))
        for name, spec in (("random", "random"), ("random-wide", card_path)):
            result = _invoke("submit", spec, "--task", TASK, "--seeds", 2, "--out", folder / name, "--quiet")
            assert result.exit_code == 0, result.output
        current = protocols_module.shipped_protocols()
        bumped = {**current, TASK: current[TASK].model_copy(update={"version": current[TASK].version + 1})}
        patch.setattr(protocols_module, "shipped_protocols", lambda: bumped)
        result = _invoke("submit", card_path, "--task", TASK, "--seeds", 1, "--out", folder / "older", "--quiet")
        assert result.exit_code == 0, result.output
    registry._REGISTERED.clear()
    registry._REGISTERED.update(before)
    return folder


@pytest.fixture
def copy(bundles, tmp_path):
    """A private copy of a bundle, to tamper with."""
    def make(name: str) -> Path:
        return Path(shutil.copytree(bundles / name, tmp_path / "copies" / name))
    return make


def _record(bundle: Path, encoder: str, ratio: float = 0.1, seed: int = 1) -> Path:
    return bundle / "records" / encoder / "cls__stoic" / f"r{ratio!r}_s{seed}.json"


def test_add_then_show_ranks_with_paired_significance(bundles, tmp_path):
    root = tmp_path / "board"
    for name in ("random", "random-wide"):
        result = _invoke("leaderboard", "add", bundles / name, "--root", root)
        assert result.exit_code == 0, result.output
        assert f"verified {bundles / name}: 6 records" in result.output and "6 record(s) recomputed" in result.output
    board = root / "demo"
    assert sorted(p.name for p in (board / "records").iterdir()) == ["random", "random-wide"]
    assert json.loads((board / "entries" / "random-wide" / "added.json").read_text())["records"] == 6

    shown = _invoke("leaderboard", "show", "--root", root, "--format", "json")
    assert shown.exit_code == 0, shown.output
    payload = json.loads(shown.output)
    ranking = {row["encoder"]: row for row in payload["ranking"]}
    assert set(ranking) == {"random", "random-wide"} and {r["rank"] for r in ranking.values()} == {1, 2}
    assert sum(r["mean_rank"] for r in ranking.values()) == pytest.approx(3.0)  # ranks 1 and 2 in every setting
    assert all(r["settings"] == 3 for r in ranking.values())
    comparisons = payload["comparisons"]
    tied = {c["regime"] for c in comparisons if c["mean"] == c["other_mean"]}  # a tie marks no best
    assert sum(r["best"] for r in ranking.values()) == 3 - len(tied)
    assert len(comparisons) == 6 and all(c["correction"] == "Holm over 6 tests" for c in comparisons)
    assert all(c["p_adjusted"] >= c["p"] for c in comparisons if c["p"] is not None)
    assert {c["unit"] for c in comparisons} == {"case (bootstrap)"}  # AUC: paired bootstrap over test cases

    text = _invoke("leaderboard", "show", "--root", root)
    assert text.exit_code == 0 and "mean_rank" in text.output and "| random-wide |" in text.output
    report = _invoke("report", "--records", board / "records", "--format", "csv")
    assert report.exit_code == 0 and "random-wide" in report.output


def test_duplicate_name_is_refused_unless_replaced(bundles, tmp_path):
    root = tmp_path / "board"
    assert _invoke("leaderboard", "add", bundles / "random", "--root", root).exit_code == 0
    again = _invoke("leaderboard", "add", bundles / "random", "--root", root)
    assert again.exit_code == 1 and "encoder 'random' is already on the leaderboard" in again.output
    replaced = _invoke("leaderboard", "add", bundles / "random", "--root", root, "--replace")
    assert replaced.exit_code == 0 and "(replaced)" in replaced.output


def test_one_changed_metric_is_refused(copy, tmp_path):
    bundle = copy("random")
    path = _record(bundle, "random")
    record = json.loads(path.read_text())
    record["metrics"]["auc"] = round(record["metrics"]["auc"] + 0.05, 6)
    path.write_text(json.dumps(record, indent=1))
    root = tmp_path / "board"
    result = _invoke("leaderboard", "add", bundle, "--root", root)
    assert result.exit_code == 1
    assert f"{path}: sha256 differs from manifest.json's" in result.output
    assert f"{path}: field 'metrics.auc': {record['metrics']['auc']!r} does not match" in result.output

    write_manifest(bundle)  # resealed: the hashes agree, the units still do not
    result = _invoke("leaderboard", "add", bundle, "--root", root)
    assert result.exit_code == 1 and "1 problem(s)" in result.output
    assert f"{path}: field 'metrics.auc'" in result.output and "recomputed from r0.1_s1.units.json" in result.output
    assert not (root / "demo" / "entries").exists()


def test_incomplete_or_foreign_bundles_are_refused(copy, tmp_path):
    bundle = copy("random")
    missing = _record(bundle, "random", 1.0, 1)
    missing.unlink()
    missing.with_name("r1.0_s1.units.json").unlink()
    write_manifest(bundle)
    result = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "board")
    assert result.exit_code == 1
    assert f"{missing}: missing: cls/stoic regime 1 seed 1 is in the job matrix" in result.output

    bundle = copy("random-wide")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["bundle_schema_version"] = 2
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "board")
    assert result.exit_code == 1
    assert "manifest.json: field 'bundle_schema_version': got 2, this asap-bench reads version 1" in result.output

    write_manifest(bundle)
    path = _record(bundle, "random-wide", 0.01, 0)
    record = json.loads(path.read_text())
    record["schema_version"] = 2
    record["provenance"]["checkpoint_sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    (bundle / "extra.txt").write_text("added later")
    result = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "board")
    assert result.exit_code == 1
    assert f"{bundle / 'extra.txt'}: not listed in manifest.json" in result.output
    assert f"{path}: field 'schema_version'" in result.output


def test_older_protocol_version_needs_explicit_permission(bundles, tmp_path):
    root = tmp_path / "board"
    bumped = protocols_module.shipped_protocols()[TASK].version + 1  # the version the "older" bundle ran under
    assert _invoke("leaderboard", "add", bundles / "random", "--root", root).exit_code == 0
    refused = _invoke("leaderboard", "add", bundles / "older", "--root", root)
    assert refused.exit_code == 1
    assert f"bundle.json: field 'protocols.cls/stoic.fingerprint': cls/stoic was run under version {bumped}" \
        in refused.output
    assert f"--allow-protocol-version cls/stoic@{bumped}" in refused.output
    wrong = _invoke("leaderboard", "add", bundles / "older", "--root", root, "--allow-protocol-version",
                    f"cls/stoic@{bumped + 1}")
    assert wrong.exit_code == 1
    allowed = _invoke("leaderboard", "add", bundles / "older", "--root", root,
                      "--allow-protocol-version", f"cls/stoic@{bumped}")
    assert allowed.exit_code == 0, allowed.output
    assert f"cls/stoic: accepted at older version {bumped}" in allowed.output

    shown = _invoke("leaderboard", "show", "--root", root, "--format", "json")
    assert shown.exit_code == 0, shown.output
    ranking = {row["encoder"]: row for row in json.loads(shown.output)["ranking"]}
    assert ranking["random-wide"]["settings"] == ranking["random"]["settings"] == 3  # never pooled together
    assert json.loads(shown.output)["comparisons"] == []  # no setting holds both
    text = _invoke("leaderboard", "show", "--root", root)
    assert text.exit_code == 0 and f"cls/stoic@v{bumped}-" in text.output


def test_results_on_other_data_do_not_join_the_board(bundles, copy, tmp_path):
    root = tmp_path / "board"
    assert _invoke("leaderboard", "add", bundles / "random", "--root", root).exit_code == 0
    bundle = copy("random-wide")  # as if run on another copy of STOIC: consistent, sealed, but other data
    info = json.loads((bundle / "bundle.json").read_text())
    info["data"]["stoic/volumes"]["data_fingerprint"] = "f" * 64
    (bundle / "bundle.json").write_text(json.dumps(info))
    for path in (bundle / "records").rglob("r*_s?.json"):
        record = json.loads(path.read_text())
        record["provenance"]["data_fingerprint"] = "f" * 64
        path.write_text(json.dumps(record))
    write_manifest(bundle)
    result = _invoke("leaderboard", "add", bundle, "--root", root)
    assert result.exit_code == 1 and "6 problem(s)" in result.output
    assert "field 'provenance.data_fingerprint': ffffffffffff differs from the board's" in result.output
    assert not (root / "demo" / "records" / "random-wide").exists()


def test_real_data_board_takes_every_seed_of_a_protocol(copy, tmp_path):
    bundle = copy("random")  # relabelled as real data, consistently: only the seed count is wrong
    info = json.loads((bundle / "bundle.json").read_text())
    info["synthetic"] = False
    (bundle / "bundle.json").write_text(json.dumps(info))
    for path in (bundle / "records").rglob("r*_s?.json"):
        record = json.loads(path.read_text())
        record["provenance"]["synthetic"] = False
        path.write_text(json.dumps(record))
    write_manifest(bundle)
    result = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "board")
    assert result.exit_code == 1 and "1 problem(s)" in result.output
    assert "bundle.json: field 'protocols.cls/stoic.seeds': [0, 1], but cls/stoic asks for seeds 0..4" in result.output
