"""Scale-out: torchrun with 2 gloo processes gives the single-process bytes; submitit runs units."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.data.cache import entries

TASK = "cls/stoic"


def _records(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): json.loads(p.read_text())["metrics"] for p in sorted(out.rglob("r*_s*.json"))
            if not p.name.endswith(".units.json")}


def _features(cache: Path) -> dict[str, np.ndarray]:
    return {e["key"]: np.load(e["path"] / "global.npy") for e in entries(cache) if e["kind"] == "features"}


def test_torchrun_two_processes_match_one(demo_root, tmp_path):
    base = [sys.executable, "-m", "asap_bench", "run", "--encoder", "random", "--task", TASK, "--seeds", "2",
            "--data-root", str(demo_root), "--quiet", "--batch-size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([*base, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600,
                            env={**env, "ASAP_BENCH_CACHE": str(tmp_path / "c1")})
    assert single.returncode == 0, single.stdout + single.stderr
    double = subprocess.run([*base, "--out", str(tmp_path / "two"), "--launcher", "torchrun", "--nproc", "2"],
                            capture_output=True, text=True, timeout=600,
                            env={**env, "ASAP_BENCH_CACHE": str(tmp_path / "c2")})
    assert double.returncode == 0, double.stdout + double.stderr
    assert "6 ok" in double.stdout  # the summary comes once, from rank 0, covering every job
    one, two = _features(tmp_path / "c1"), _features(tmp_path / "c2")
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    meta = [e for e in entries(tmp_path / "c2") if e["kind"] == "features"][0]
    assert meta["processes"] == 2 and meta["forward_passes"] == meta["unique_images"]
    assert _records(tmp_path / "one") == _records(tmp_path / "two")


def test_slurm_launcher_with_submitit_local_executor(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    args = ["run", "--encoder", "random", "--task", f"{TASK},cls/rad-chestct", "--seeds", "1",
            "--data-root", str(demo_root), "--out", str(tmp_path / "runs"), "--quiet",
            "--launcher", "slurm", "--slurm-cluster", "local", "--slurm-time", "20"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = _records(tmp_path / "runs")
    assert len(records) == 5  # stoic 3 regimes + rad-chestct 2
    logs = list((tmp_path / "runs" / "slurm").rglob("*_log.out"))
    assert len(logs) == 2  # one submitted job per (encoder, task)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "5 cached" in again.output
