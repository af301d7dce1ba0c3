"""The runner on the demo cohort: matrix, records, resume, caches, failures, determinism, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.data.cache import entries, feature_key
from asap_bench.data.manifest import load_manifest
from asap_bench.encoders.base import encoder_fingerprint
from asap_bench.encoders.registry import get_card
from asap_bench.results.record import read_record
from asap_bench.runner import local
from asap_bench.tasks import base

TESTS = Path(__file__).parent
TASKS = "cls/stoic,cls/inspect-pe,ext/inspect-rspect,seg/msd-lung"


@pytest.fixture
def env(demo_root, tmp_path, monkeypatch):
    """A private cache and output folder, and the test family in place of the real 'cls'."""
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(base.FAMILIES, "cls", "families_for_tests:MeanDifference")
    monkeypatch.delitem(base.FAMILIES, "seg", raising=False)  # the matrix below counts seg as not built
    monkeypatch.syspath_prepend(str(TESTS))
    return {"root": demo_root, "out": tmp_path / "runs", "splits": tmp_path / "splits"}


def _run(env, *extra, tasks=TASKS):
    args = ["run", "--encoder", "random", "--task", tasks, "--seeds", "2", "--data-root", str(env["root"]),
            "--out", str(env["out"]), "--quiet", *extra]
    return CliRunner().invoke(main, args)


def _records(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted(out.rglob("r*_s*.json"))
            if not p.name.endswith(".units.json")}


def test_dry_run_prints_matrix_and_skips_unbuilt_families(env, monkeypatch):
    monkeypatch.setattr(local, "default_splits_dir", lambda root: env["splits"])
    result = _run(env, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "seg/msd-lung" in result.output and "task family 'seg' is not implemented yet" in result.output
    assert "18 jobs (4 skipped, 14 todo)" in result.output
    assert not env["out"].joinpath("random").exists()


def test_run_records_provenance_then_resumes_without_work(env, monkeypatch):
    monkeypatch.setattr(local, "default_splits_dir", lambda root: env["splits"])
    first = _run(env)
    assert first.exit_code == 0, first.output
    records = _records(env["out"])
    assert len(records) == 14  # stoic 3 regimes + inspect-pe 2 + ext 2, x 2 seeds
    record = records["random/cls__stoic/r0.1_s1.json"]
    assert record["status"] == "ok" and 0 <= record["metrics"]["auc"] <= 1
    prov = record["provenance"]
    for field in ("protocol_fingerprint", "split_sha256", "encoder_fingerprint", "data_fingerprint",
                  "manifest_sha256", "feature_key"):
        assert len(prov[field]) == 64, field
    assert prov["synthetic"] is True and prov["checkpoint_sha256"] is None and prov["encoder_variant"] == "demo"
    assert prov["software"]["torch"] and prov["software"]["asap_bench"]
    ext = records["random/ext__inspect-rspect/r1.0_s0.json"]
    assert ext["provenance"]["target_dataset"] == "rspect" and ext["provenance"]["target_data_fingerprint"]
    units = json.loads((env["out"] / "random/cls__stoic" / record["units_file"]).read_text())
    assert len(units["ids"]) == record["sizes"]["test"]
    # features were extracted once per (encoder, input, manifest): stoic, inspect, rspect
    features = [e for e in entries(env["out"].parent / "cache") if e["kind"] == "features"]
    assert len(features) == 3 and all(e["forward_passes"] == e["unique_images"] for e in features)

    # a second run does no work: no model is built, nothing is extracted, records untouched
    monkeypatch.setattr(local.Session, "module", lambda *a: pytest.fail("a model was built on a rerun"))
    mtimes = {p: p.stat().st_mtime_ns for p in env["out"].rglob("r*.json")}
    second = _run(env)
    assert second.exit_code == 0 and "14 cached" in second.output
    assert mtimes == {p: p.stat().st_mtime_ns for p in env["out"].rglob("r*.json")}

    listed = CliRunner().invoke(main, ["cache", "ls"])
    assert listed.exit_code == 0 and listed.output.count("features ") == 3 and "inspect/volumes" in listed.output
    cleared = CliRunner().invoke(main, ["cache", "clear", "--kind", "features"])
    assert cleared.exit_code == 0 and "removed 3 entries" in cleared.output
    assert not [e for e in entries(env["out"].parent / "cache") if e["kind"] == "features"]


def test_same_seed_same_numbers_different_seeds_differ(env, tmp_path, monkeypatch):
    monkeypatch.setattr(local, "default_splits_dir", lambda root: env["splits"])
    assert _run(env, tasks="cls/stoic").exit_code == 0
    again = dict(env, out=tmp_path / "again")
    assert _run(again, "--force", tasks="cls/stoic").exit_code == 0
    a, b = _records(env["out"]), _records(again["out"])
    assert {k: v["metrics"] for k, v in a.items()} == {k: v["metrics"] for k, v in b.items()}
    assert a["random/cls__stoic/r0.01_s0.json"]["metrics"] != a["random/cls__stoic/r0.01_s1.json"]["metrics"]


def test_failures_are_recorded_and_do_not_stop_the_run(env, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(env["root"], data, symlinks=True)
    inspect = load_manifest(data, "inspect")
    broken = data / "inspect" / inspect.frame["image"].iloc[3]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated volume
    monkeypatch.setenv("ASAP_TEST_FAIL_SEED", "1")  # and a NaN loss in every seed-1 job
    result = CliRunner().invoke(main, ["run", "--encoder", "random", "--task", "cls/stoic,cls/inspect-pe",
                                       "--seeds", "2", "--data-root", str(data), "--out", str(env["out"]), "--quiet"])
    assert result.exit_code == 1
    records = _records(env["out"])
    failed = {k: v["error"] for k, v in records.items() if v["status"] == "failed"}
    inspect_failures = [e for k, e in failed.items() if "inspect" in k]
    assert len(inspect_failures) == 4 and all(str(broken) in e for e in inspect_failures)
    assert all("NaN at step 3" in e for k, e in failed.items() if "stoic" in k)
    assert {k for k, v in records.items() if v["status"] == "ok"} == {
        f"random/cls__stoic/r{r}_s0.json" for r in ("0.01", "0.1", "1.0")}
    assert "failed" in result.output and "NaN" in result.output

    # fixing the cause and rerunning retries the failed jobs only
    monkeypatch.delenv("ASAP_TEST_FAIL_SEED")
    rerun = CliRunner().invoke(main, ["run", "--encoder", "random", "--task", "cls/stoic", "--seeds", "2",
                                      "--data-root", str(data), "--out", str(env["out"]), "--quiet"])
    assert rerun.exit_code == 0 and "3 cached" in rerun.output and "3 ok" in rerun.output


def test_cache_keys_follow_every_part(demo_root):
    manifest = load_manifest(demo_root, "stoic")
    card = get_card("random")
    spec = card.input
    fp = encoder_fingerprint(card, "demo", None)
    key = feature_key(fp, spec, manifest)
    assert key == feature_key(fp, spec, manifest)
    assert key != feature_key(encoder_fingerprint(card, "demo", "0" * 64), spec, manifest)  # other weights
    assert key != feature_key(fp, spec.model_copy(update={"hu_window": (-1000.0, 400.0)}), manifest)
    other = load_manifest(demo_root, "inspect")
    assert key != feature_key(fp, spec, other)


def test_sigkill_mid_run_then_rerun_leaves_one_valid_record_per_job(env, tmp_path):
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from asap_bench.tasks import base; "
              "base.FAMILIES['cls'] = 'families_for_tests:Slow'; from asap_bench.cli import main; main()")
    args = [sys.executable, "-c", script, "run", "--encoder", "random", "--task", "cls/stoic", "--seeds", "3",
            "--data-root", str(env["root"]), "--out", str(env["out"]), "--quiet"]
    environ = {**os.environ, "ASAP_BENCH_CACHE": str(tmp_path / "cache"), "ASAP_TEST_JOB_SECONDS": "0.4"}
    process = subprocess.Popen(args, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(env["out"].rglob("r*_s*.json"))) < 6:  # a few records + sidecars
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(_records(env["out"]))
    assert 0 < done_before < 9, "the kill must land in the middle of the run"
    finished = subprocess.run(args, env=environ, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    records = _records(env["out"])
    assert len(records) == 9 and all(r["status"] == "ok" for r in records.values())
    for path in env["out"].rglob("r*_s*.json"):
        read_record(path) if not path.name.endswith(".units.json") else json.loads(path.read_text())
    leftovers = [p for p in env["out"].rglob("*") if p.name.endswith(".tmp")]
    leftovers += [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    assert not leftovers
    assert f"{done_before} cached" in finished.stdout


def test_abandoned_extraction_is_cleaned_up(tmp_path):
    from asap_bench.data.cache import remove_abandoned

    folder = tmp_path / "features" / "abc"
    dead = tmp_path / "features" / ".abc.tmp-99999999"
    alive = tmp_path / "features" / f".abc.tmp-{os.getpid()}"
    for path in (dead, alive):
        path.mkdir(parents=True)
    remove_abandoned(folder)
    assert not dead.exists() and alive.exists()


def test_absent_private_target_is_unavailable_not_an_error(env, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(env["root"], data, symlinks=True, ignore=shutil.ignore_patterns("ahph"))
    monkeypatch.setattr(local, "default_splits_dir", lambda root: env["splits"])
    result = CliRunner().invoke(main, ["run", "--encoder", "random", "--task", "ext/ct-rate-ahph", "--seeds", "1",
                                       "--data-root", str(data), "--out", str(env["out"]), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "target unavailable: ahph (private) is not prepared" in result.output and "3 skipped" in result.output
