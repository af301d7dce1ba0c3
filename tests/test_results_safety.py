"""What the runner writes is never lost: ok records survive failed reruns, sidecars always match their record,
an unwritable --out or a full disk is a clear error, a killed demo build leaves a cohort, interrupted training
state is kept and failed state removed, concurrent runs compute each job once, and files get the user's mode."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.results.record import Provenance, ResultRecord, Timing, read_record, read_units, write_record
from asap_bench.results.store import load_records, load_units
from asap_bench.runner import local
from asap_bench.tasks import base
from asap_bench.tasks.base import TaskFamily, TaskInputs, TaskResult

TESTS = Path(__file__).parent
JOB = Path("random") / "cls__stoic" / "r1.0_s0.json"
UNHANDLED = {"sigterm": signal.SIG_DFL}  # the handler outside a run


class Scripted(TaskFamily):
    """A job with no features to extract, steered by the environment: it counts its runs, keeps training
    state in its work folder, and fails, interrupts itself with SIGTERM, or blocks until told to go."""

    name = "cls"
    needs = "volumes"

    def run(self, inputs: TaskInputs) -> TaskResult:
        runs = os.environ.get("ASAP_TEST_RUNS")
        if runs:
            with open(runs, "a", encoding="utf-8") as handle:
                handle.write(f"seed {inputs.seed} pid {os.getpid()}\n")
        inputs.work_dir.mkdir(parents=True, exist_ok=True)
        state = inputs.work_dir / "state.json"
        resumed = state.is_file()
        state.write_text(json.dumps({"step": 1}))
        mode = os.environ.get("ASAP_TEST_MODE", "")
        if mode == "fail":
            raise FloatingPointError("loss became NaN at step 3")
        if mode == "sigterm":
            if signal.getsignal(signal.SIGTERM) is UNHANDLED["sigterm"]:  # it would end this test session, not the run
                raise RuntimeError("the run does not handle SIGTERM")
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("SIGTERM did not interrupt the job")
        if mode == "block":
            Path(os.environ["ASAP_TEST_STARTED"]).touch()
            _wait_for(lambda: Path(os.environ["ASAP_TEST_GO"]).exists())
        score = float(os.environ.get("ASAP_TEST_SCORE", "0.5"))
        ids = list(inputs.split.test)
        return TaskResult({"auc": score}, notes={"resumed": str(resumed)}, sizes={"test": len(ids)},
                          units={"kind": "case", "ids": ids, "scores": [score] * len(ids)})


def _wait_for(condition, seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A 40-patient STOIC table (no image is ever read) and the scripted family in place of 'cls'."""
    from conftest import write_table

    root = tmp_path / "data"
    rows = [{"case_id": f"stoic_{i:03d}", "patient_id": f"p{i:03d}", "image": "x.nii.gz", "covid": i % 2,
             "severe": 0} for i in range(40)]
    write_table(root, "stoic", "volumes", rows)
    (root / "stoic" / "x.nii.gz").write_bytes(b"not read")
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ASAP_TEST_RUNS", str(tmp_path / "runs.txt"))
    monkeypatch.delenv("ASAP_TEST_MODE", raising=False)
    monkeypatch.setitem(base.FAMILIES, "cls", "test_results_safety:Scripted")
    monkeypatch.syspath_prepend(str(TESTS))
    return {"root": root, "out": tmp_path / "out", "runs": tmp_path / "runs.txt", "tmp": tmp_path}


def _args(env, *extra, seeds: str = "1") -> list[str]:
    return ["run", "--encoder", "random", "--task", "cls/stoic", "--ratios", "1", "--seeds", seeds,
            "--data-root", str(env["root"]), "--out", str(env["out"]), "--quiet", *extra]


def _run(env, *extra, seeds: str = "1"):
    return CliRunner().invoke(main, _args(env, *extra, seeds=seeds))


def _runs(env) -> int:
    return len(env["runs"].read_text().splitlines()) if env["runs"].exists() else 0


def _sidecar(path: Path) -> Path:
    return path.with_name(path.stem + ".units.json")


def _die_on_replace(monkeypatch, target: Path, error: BaseException) -> None:
    """``os.replace`` onto ``target`` raises ``error`` (a full disk, or a kill at that instant)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == target:
            raise error
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


# --------------------------------------------------------------------------- ok records survive failed reruns

@pytest.mark.parametrize("rerun", ["--force", "stale key"])
def test_a_failed_rerun_never_replaces_an_ok_record(tiny, monkeypatch, rerun):
    assert _run(tiny).exit_code == 0
    path = tiny["out"] / JOB
    record, units = path.read_bytes(), _sidecar(path).read_bytes()

    monkeypatch.setenv("ASAP_TEST_MODE", "fail")
    if rerun == "stale key":
        monkeypatch.setattr(local, "CODE_VERSION", local.CODE_VERSION + "-changed")
    second = _run(tiny, *([rerun] if rerun == "--force" else []))
    assert second.exit_code == 1 and "1 failed" in second.output, second.output
    assert path.read_bytes() == record and _sidecar(path).read_bytes() == units  # untouched, sidecar too
    assert "rerun failed, the ok record is kept" in second.output
    failure = read_record(path.with_name("r1.0_s0.failed.json"))
    assert failure.status == "failed" and "NaN at step 3" in failure.error and failure.units_file is None
    frame = load_records(tiny["out"])  # the report keeps the ok result and reads no failure
    assert list(frame["status"]) == ["ok"] and list(frame["value"]) == [0.5] and not frame.attrs["problems"]

    monkeypatch.setenv("ASAP_TEST_MODE", "")
    monkeypatch.setenv("ASAP_TEST_SCORE", "0.75")
    third = _run(tiny, *([rerun] if rerun == "--force" else []))
    assert third.exit_code == 0 and "1 ok" in third.output, third.output
    fixed = read_record(path)
    assert fixed.status == "ok" and fixed.metrics["auc"] == 0.75
    assert not path.with_name("r1.0_s0.failed.json").exists()  # replaced by an ok result: the failure is gone
    assert load_units(_sidecar(path))["scores"][0] == 0.75


def test_a_record_never_reads_a_sidecar_it_was_not_written_with(tiny, monkeypatch):
    assert _run(tiny).exit_code == 0
    path = tiny["out"] / JOB
    monkeypatch.setenv("ASAP_TEST_SCORE", "0.9")
    with monkeypatch.context() as patch:  # killed between the sidecar and the record
        _die_on_replace(patch, path, KeyboardInterrupt())
        assert _run(tiny, "--force").exit_code == 1

    record = read_record(path)
    assert record.metrics["auc"] == 0.5 and json.loads(_sidecar(path).read_text())["scores"][0] == 0.9
    with pytest.raises(ValueError, match="r1.0_s0.units.json"):
        load_units(_sidecar(path))
    with pytest.raises(ValueError, match="r1.0_s0.units.json"):
        read_units(path, record)

    # and the job is not taken as done: a plain rerun computes it again, record and sidecar agree
    rerun = _run(tiny)
    assert rerun.exit_code == 0 and "1 ok" in rerun.output, rerun.output
    assert read_record(path).metrics["auc"] == 0.9 == load_units(_sidecar(path))["scores"][0]


def test_a_sidecar_without_its_record_is_removed_by_the_next_write(tiny, monkeypatch):
    path = tiny["out"] / JOB
    with monkeypatch.context() as patch:  # the first run dies between its sidecar and its record
        _die_on_replace(patch, path, KeyboardInterrupt())
        assert _run(tiny).exit_code == 1
    assert _sidecar(path).exists() and not path.exists()
    monkeypatch.setenv("ASAP_TEST_MODE", "fail")
    assert _run(tiny).exit_code == 1
    assert read_record(path).status == "failed"
    assert not _sidecar(path).exists()  # nothing points to it: gone with the next write of the job


# --------------------------------------------------------------------------- unwritable --out, full disk

def _unwritable(kind: str, tmp_path: Path, monkeypatch) -> Path:
    if kind == "a file":
        out = tmp_path / "out"
        out.write_text("a file, not a folder\n")
    elif kind == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif kind == "read-only":
        out = tmp_path / "out"
        out.mkdir()
        out.chmod(0o555)
        probe = out / "probe"
        try:
            probe.write_text("")
            probe.unlink()  # root: chmod does not stop writes, so refuse them the way the kernel would
            real = os.open

            def refuse(name, flags, *args, **kwargs):
                if str(name).startswith(str(out)) and flags & os.O_CREAT:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
                return real(name, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", refuse)
        except PermissionError:
            pass
    else:  # a full disk
        out = tmp_path / "out"
        real = os.replace

        def full(src, dst, *args, **kwargs):
            if str(dst).startswith(str(out)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", full)
    return out


@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only", "a full disk"])
def test_an_unwritable_out_is_one_line_naming_it_before_any_job(tiny, monkeypatch, kind):
    out = _unwritable(kind, tiny["tmp"], monkeypatch)
    result = CliRunner().invoke(main, _args(dict(tiny, out=out)))
    if out.is_dir():
        out.chmod(0o755)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: --out {out}: not a writable folder ("), lines
    assert _runs(tiny) == 0


def test_a_record_that_cannot_be_written_fails_its_job_and_the_run_goes_on(tiny, monkeypatch):
    path = tiny["out"] / JOB
    _die_on_replace(monkeypatch, path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)))
    result = _run(tiny, seeds="2")
    assert result.exit_code == 1, result.output
    assert f"record not written: {path}: No space left on device" in result.output
    assert "1 ok" in result.output and "1 failed" in result.output
    assert read_record(path.with_name("r1.0_s1.json")).status == "ok" and not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- temp folders

def test_a_failed_job_leaves_no_training_state(tiny, monkeypatch):
    monkeypatch.setenv("ASAP_TEST_MODE", "fail")
    assert _run(tiny).exit_code == 1
    folder = (tiny["out"] / JOB).parent
    assert read_record(folder / JOB.name).status == "failed"
    assert not list(folder.glob(".r1.0_s0.work-*"))  # a failure is not an interruption: nothing to resume


def test_sigterm_keeps_the_training_state_and_the_rerun_resumes(tiny, monkeypatch):
    monkeypatch.setitem(UNHANDLED, "sigterm", signal.getsignal(signal.SIGTERM))
    monkeypatch.setenv("ASAP_TEST_MODE", "sigterm")  # the job sends SIGTERM to its own process
    done = _run(tiny)
    assert done.exit_code == 1 and "Aborted" in done.output, done.output
    assert signal.getsignal(signal.SIGTERM) is UNHANDLED["sigterm"]  # restored after the run
    folder = (tiny["out"] / JOB).parent
    assert not (folder / JOB.name).exists()  # an interruption is not a failure
    assert len(list(folder.glob(".r1.0_s0.work-*/state.json"))) == 1
    assert not (tiny["out"] / ".locks").exists()
    monkeypatch.setenv("ASAP_TEST_MODE", "")
    rerun = _run(tiny)
    assert rerun.exit_code == 0, rerun.output
    assert read_record(folder / JOB.name).notes["resumed"] == "True"
    assert not list(folder.glob(".r1.0_s0.work-*"))


# --------------------------------------------------------------------------- demo build killed at any step

class Killed(BaseException):
    pass


def _fake_generate(label: str):
    def generate(folder: Path, workers: int = 1) -> dict:
        (folder / "stoic").mkdir(parents=True)
        (folder / "stoic" / "volumes.csv").write_text(label)
        return {"stoic": {"volumes": 1}}

    return generate


def _kill_at(monkeypatch, demo, step: int) -> list[str]:
    """Every file-system step of the swap counts; the ``step``-th and all after it never happen (a kill)."""
    calls: list[str] = []
    for owner, name in ((demo.os, "replace"), (demo.os, "rename"), (demo.shutil, "rmtree"), (demo, "_exchange")):
        real = getattr(owner, name, None)
        if real is None:
            continue

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) >= step:
                raise Killed(f"killed at step {step} ({_name})")
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_killed_demo_rebuild_leaves_the_old_or_the_new_cohort(tmp_path, monkeypatch, exchange):
    from asap_bench.data import demo

    out = tmp_path / "cohort"
    monkeypatch.setattr(demo, "generate", _fake_generate("old"))
    demo.build_demo(out)
    if not exchange:  # a file system without RENAME_EXCHANGE
        monkeypatch.setattr(demo, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.EINVAL, "no")))
    seen = set()
    for step in range(1, 20):
        with monkeypatch.context() as patch:
            patch.setattr(demo, "generate", _fake_generate("new"))
            calls = _kill_at(patch, demo, step)
            try:
                demo.build_demo(out, force=True)
                finished = True
            except Killed:
                finished = False
        if exchange:  # one atomic swap: a complete cohort at every instant
            assert demo._is_current(out), (step, calls)
        rebuilt = []
        monkeypatch.setattr(demo, "generate", lambda folder, workers=1: rebuilt.append(folder) or
                            _fake_generate("rebuilt")(folder))
        demo.build_demo(out)  # the next ordinary call finds (or puts back) a complete cohort, without a rebuild
        assert not rebuilt and demo._is_current(out), (step, calls)
        label = (out / "stoic" / "volumes.csv").read_text()
        assert label in ("old", "new"), (step, calls)
        seen.add(label)
        if label == "new":  # start the next kill from the old cohort again
            monkeypatch.setattr(demo, "generate", _fake_generate("old"))
            demo.build_demo(out, force=True)
        if finished:
            break
    assert finished and seen == {"old", "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "cohort.lock"]


# --------------------------------------------------------------------------- concurrent runs

def _script() -> str:
    return (f"import sys, time; sys.path.insert(0, {str(TESTS)!r}); time.strftime = lambda *a: '20240101-000000'; "
            "from asap_bench.tasks import base; base.FAMILIES['cls'] = 'test_results_safety:Scripted'; "
            "from asap_bench.cli import main; main()")


def test_two_concurrent_runs_compute_a_job_once_and_log_separately(tiny, monkeypatch):
    """A subprocess runs the job and blocks inside it; this process runs the same job meanwhile."""
    started, go = tiny["tmp"] / "started", tiny["tmp"] / "go"
    for name, value in (("ASAP_TEST_MODE", "block"), ("ASAP_TEST_STARTED", started), ("ASAP_TEST_GO", go)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(time, "strftime", lambda *a: "20240101-000000")  # both runs start in the same second
    first = subprocess.Popen([sys.executable, "-c", _script(), *_args(tiny)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)

    def release_once_the_second_waits() -> None:  # it says so in its log, or (without a lock) runs the job itself
        logs = lambda: (tiny["out"] / "logs").glob("*.log")  # noqa: E731
        _wait_for(lambda: any("another run is computing it" in p.read_text() for p in logs()) or _runs(tiny) > 1)
        go.touch()

    try:
        assert _wait_for(lambda: started.exists() or first.poll() is not None)
        assert first.poll() is None, first.communicate()[0]
        releaser = threading.Thread(target=release_once_the_second_waits, daemon=True)
        releaser.start()
        second = _run(tiny)
        out_first, _ = first.communicate(timeout=300)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and second.exit_code == 0, out_first + second.output
    assert _runs(tiny) == 1, tiny["runs"].read_text()
    assert "1 ok" in out_first and "1 cached" in second.output, out_first + second.output
    logs = sorted((tiny["out"] / "logs").glob("*.log"))
    assert len(logs) == 2, logs  # the same second, two processes: two logs
    assert read_record(tiny["out"] / JOB).status == "ok"
    left = sorted(str(p.relative_to(tiny["out"])) for p in tiny["out"].rglob("*") if p.is_file())
    assert left == [*(str(p.relative_to(tiny["out"])) for p in logs), str(JOB), str(_sidecar(JOB))]


def test_log_names_are_unique_within_the_same_second(tiny, monkeypatch):
    from asap_bench.runner import cli_run

    monkeypatch.setattr(cli_run.time, "strftime", lambda *a: "20240101-000000")
    paths = {cli_run.setup_log(tiny["out"], quiet=True)[1] for _ in range(3)}
    assert len(paths) == 3


# --------------------------------------------------------------------------- file mode

def _record() -> ResultRecord:
    prov = Provenance(protocol_id="cls/stoic", protocol_version=1, protocol_fingerprint="0" * 64, encoder="random",
                      encoder_variant="demo", dataset="stoic", table="volumes", software={}, device="cpu")
    return ResultRecord(job_key="k", encoder="random", protocol="cls/stoic", family="cls", regime=1.0, seed=0,
                        status="ok", metrics={"auc": 0.5}, provenance=prov,
                        timing=Timing(started="", finished="", seconds=0.0))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_records_get_the_users_file_mode(tmp_path, umask, mode):
    path = tmp_path / "r1.0_s0.json"
    before = os.umask(umask)
    try:
        write_record(path, _record(), {"ids": ["a"], "scores": [0.5]})
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE(_sidecar(path).stat().st_mode) == mode
    assert read_units(path, read_record(path)) == {"ids": ["a"], "scores": [0.5]}
