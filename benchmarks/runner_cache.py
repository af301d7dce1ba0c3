"""Benchmark: frozen features are extracted once and reused by every regime and seed.

Runs the classification protocols (3 regimes x 5 seeds where the protocol has
them) for one encoder on the demo cohort with a fresh cache, then again. Prints
encoder forward passes per unique volume (the goal is exactly 1.0) and the wall
time of the second runs as a ratio of the first:
  - rerun: every record is valid, so nothing is done;
  - --force: every probe is refit, but features come from the cache.

    python benchmarks/runner_cache.py [--encoder random] [--task 'cls/*'] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="random")
    parser.add_argument("--task", default="cls/*")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        env = {**os.environ, "ASAP_BENCH_CACHE": str(scratch / "cache")}
        env.pop("ASAP_BENCH_DATA", None)
        subprocess.run([sys.executable, "-m", "asap_bench", "demo", "build"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        command = [sys.executable, "-m", "asap_bench", "run", "--encoder", args.encoder, "--task", args.task,
                   "--seeds", str(args.seeds), "--out", str(scratch / "runs"), "--quiet"]
        cold = timed(command, env)
        rerun = timed(command, env)
        forced = timed([*command, "--force"], env)
        metas = [json.loads(p.read_text()) for p in (scratch / "cache" / "features").glob("*/meta.json")]
        forwards = sum(m["forward_passes"] for m in metas)
        unique = sum(m["unique_images"] for m in metas)
        records = [p for p in (scratch / "runs").rglob("r*_s*.json") if not p.name.endswith(".units.json")]
    print(f"encoder {args.encoder}, tasks {args.task}, {args.seeds} seeds: {len(records)} jobs, "
          f"{len(metas)} feature sets")
    print(f"forward passes per unique volume: {forwards}/{unique} = {forwards / unique:.3f}")
    print(f"first run {cold:.1f} s; rerun {rerun:.1f} s (ratio {rerun / cold:.3f}); "
          f"--force with cached features {forced:.1f} s (ratio {forced / cold:.3f})")


if __name__ == "__main__":
    main()
