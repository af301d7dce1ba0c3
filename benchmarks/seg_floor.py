"""Benchmark: the segmentation floor on the demo cohort, training at a demo budget against the untrained model.

Segmentation fine-tunes the encoder's own ViT, so no frozen-feature oracle applies; what a
wired-up family must show is that training helps. Every protocol runs twice for encoder
``random`` (demo variant, regime 1.0): at the budget (the shipped ``demo_*`` settings, or
those given here), and as a copy with ``demo_max_steps: 0`` (the model as built). The two
are compared with the harness's own per-case paired test, ``stats.case_wilcoxon`` on the
protocol's demo primary metric. Each half is one run, so an external validation reuses the
model its source protocol trained (one fit per seed).

    python benchmarks/seg_floor.py [--set demo_max_steps=40 --set demo_feature_size=16 ...] [--task seg/acdc,...]

Prints one line per protocol: trained and untrained mean, n cases, p, and the job seconds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from asap_bench import stats
from asap_bench.protocol import Protocol, get_protocol
from asap_bench.results.record import read_record, read_units
from asap_bench.runner.jobs import expand
from asap_bench.runner.local import RunOptions, run_jobs

ENCODER = "random"


def with_params(protocol: Protocol, params: dict) -> Protocol:
    """The same protocol with some head parameters replaced (e.g. a demo budget)."""
    data = protocol.model_dump(mode="json")
    data["head"]["params"].update(params)
    return Protocol.model_validate(data)


def untrained(protocol: Protocol) -> Protocol:
    """The same protocol scoring the model as built: ``demo_max_steps: 0``."""
    return with_params(protocol, {"demo_max_steps": 0})


def _run(protocols: list[Protocol], root: Path, out: Path, seeds: list[int], cache: Path | None,
         log: logging.Logger) -> dict[str, dict]:
    """Per protocol: units by seed, and the seconds of its jobs."""
    jobs = expand([ENCODER], protocols, seeds, [1.0])
    options = RunOptions(data_root=Path(root), out=Path(out), variant="demo", progress=False, cache_dir=cache)
    results: dict[str, dict] = {p.id: {"units": {}, "seconds": []} for p in protocols}
    for outcome in run_jobs(jobs, options, log):
        if outcome.status not in ("ok", "cached"):
            raise RuntimeError(f"{outcome.job.name}: {outcome.status}: {outcome.message}")
        path = outcome.job.record_path(Path(out))
        entry = results[outcome.job.protocol.id]
        entry["units"][outcome.job.seed] = read_units(path, read_record(path))
        entry["seconds"].append(round(outcome.seconds, 1))
    return results


def seg_floors(root: Path, out_dir: Path, protocol_ids: list[str], seeds: list[int],
               cache: Path | None = None, params: dict | None = None) -> list[dict]:
    """Per protocol: trained vs step-0 mean of the demo primary metric, the paired test, n cases, seconds."""
    log = logging.getLogger("asap_bench.seg_floor")
    shipped = [with_params(get_protocol(pid), params or {}) for pid in protocol_ids]
    started = time.perf_counter()
    trained = _run(shipped, root, Path(out_dir) / "trained", seeds, cache, log)
    step0 = _run([untrained(p) for p in shipped], root, Path(out_dir) / "step0", seeds, cache, log)
    rows = []
    for protocol in shipped:
        metric = protocol.primary(True)
        a, b = trained[protocol.id], step0[protocol.id]
        test = stats.case_wilcoxon(a["units"], b["units"], metric)
        rows.append({"protocol": protocol.id, "metric": metric, "good_mean": float(test.x.mean()),
                     "bad_mean": float(test.y.mean()), "higher_is_better": stats.higher_is_better(metric),
                     "unit": test.unit, "n": test.n, "p": test.p, "test": "case Wilcoxon",
                     "seconds": a["seconds"], "step0_seconds": b["seconds"]})
    log.info("segmentation floors in %.1f s", time.perf_counter() - started)
    return rows


def _value(text: str):
    import yaml

    return yaml.safe_load(text)


def main() -> None:
    import argparse
    import tempfile

    from asap_bench.data.demo import build_demo
    from asap_bench.protocol import shipped_protocols

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=None, help="comma-separated protocol ids (default: seg/* and their ext)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a head parameter to replace")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--data-root", type=Path, default=None, help="a built demo cohort (default: build one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    protocols = shipped_protocols()
    ids = args.task.split(",") if args.task else sorted(
        pid for pid, p in protocols.items()
        if p.family == "seg" or (p.family == "ext" and protocols[p.transfer.source].family == "seg"))
    params = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_root or build_demo(Path(scratch) / "demo")
        rows = seg_floors(root, Path(scratch) / "runs", ids, [int(s) for s in args.seeds.split(",")],
                          Path(scratch) / "cache", params)
    print(f"{'protocol':20s} {'metric':6s} {'trained':>8s} {'untrained':>9s} {'n':>3s} {'p':>9s}  "
          "job seconds (trained, untrained)")
    for r in rows:
        print(f"{r['protocol']:20s} {r['metric']:6s} {r['good_mean']:8.4f} {r['bad_mean']:9.4f} {r['n']:3d} "
              f"{r['p']:9.2e}  {r['seconds']} {r['step0_seconds']}")


if __name__ == "__main__":
    main()
