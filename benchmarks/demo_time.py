"""Benchmark: wall time of the headline demo, against a baseline checkout measured in the same session.

Runs ``asap-bench run --encoder E --task all --seeds 5`` on a fresh demo cohort and a
fresh cache, once with the working tree and once with ``--baseline REF`` (a git commit,
checked out into a temporary worktree and run from it with the same interpreter), one
after the other on the same machine. Prints each run's wall time, their ratio, and the
seconds per family summed from the records' own job timings (the slowest families first,
with their share), so a change of budgets or a speed-up shows where the time went.

    python benchmarks/demo_time.py [--encoder random] [--seeds 5] [--baseline b91c8df] [--task all]

The goal stated in docs/demo.md: the headline demo within 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_demo(source: Path, scratch: Path, encoder: str, seeds: int, task: str) -> tuple[float, dict[str, float], int]:
    """Wall seconds, job seconds per family and the number of records of one cold demo run from ``source``."""
    env = {**os.environ, "ASAP_BENCH_CACHE": str(scratch / "cache"), "PYTHONPATH": str(source)}
    env.pop("ASAP_BENCH_DATA", None)
    subprocess.run([sys.executable, "-m", "asap_bench", "demo", "build"], env=env, cwd=source, check=True,
                   stdout=subprocess.DEVNULL)
    command = [sys.executable, "-m", "asap_bench", "run", "--encoder", encoder, "--task", task, "--seeds", str(seeds),
               "--out", str(scratch / "runs"), "--quiet"]
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=source, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    families: dict[str, float] = defaultdict(float)
    records = [p for p in (scratch / "runs").rglob("r*_s*.json")
               if not p.name.endswith((".units.json", ".failed.json"))]
    for path in records:
        record = json.loads(path.read_text())
        families[record["protocol"].split("/")[0]] += float(record["timing"]["seconds"])
    return wall, dict(families), len(records)


def shares(families: dict[str, float]) -> str:
    total = sum(families.values()) or 1.0
    return ", ".join(f"{f} {s:.0f} s ({100 * s / total:.0f} %)"
                     for f, s in sorted(families.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="random")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--task", default="all")
    parser.add_argument("--baseline", default=None, help="git commit to compare against (none: working tree only)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        sources = {"current": REPO}
        if args.baseline:
            tree = scratch / "baseline-tree"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            sources = {"baseline": tree, **sources}
        try:
            for name, source in sources.items():
                results[name] = run_demo(source, scratch / name, args.encoder, args.seeds, args.task)
                wall, families, n = results[name]
                print(f"{name} ({source}): {n} jobs in {wall:.1f} s wall; job time by family: {shares(families)}",
                      flush=True)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(scratch / "baseline-tree")],
                               check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if "baseline" in results:
        ratio = results["current"][0] / results["baseline"][0]
        print(f"current / baseline wall time: {ratio:.3f} ({args.encoder}, --task {args.task}, --seeds {args.seeds}, "
              f"{os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
