"""``leaderboard add --verify-rerun K``: rerun K of a bundle's jobs here and compare every metric.

The manifest proves a bundle is intact and its metrics follow from its units; it
cannot prove the units came from the encoder. A rerun does: K jobs chosen at
random (the seed is printed, so the choice can be repeated) run again through
the ordinary runner from the bundle's own card and its checkpoint (which must
match the sealed sha256), on the same data (the data fingerprint must match),
with fresh records and split files. Every metric must match to ``RERUN_TOLERANCE``;
CPU runs of the same job are deterministic.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data.demo import ensure_demo, is_demo_root
from ..data.manifest import file_sha256
from ..data.roots import resolve_data_root
from ..encoders import registry
from ..results.record import ResultRecord
from .bundle import INFO
from .verify import VerifiedBundle

RERUN_TOLERANCE = 1e-6


@dataclass
class RerunOptions:
    jobs: int  # K: how many jobs to rerun
    seed: int | None = None  # the choice's seed; None draws one (printed)
    checkpoint: Path | None = None  # required when the bundle declares a checkpoint
    data_root: Path | None = None  # default: $ASAP_BENCH_DATA, or the demo cohort for a demo bundle
    device: str = "cpu"


def _checkpoint(verified: VerifiedBundle, given: Path | None) -> tuple[Path | None, list[str]]:
    """The checkpoint to rerun with: the one given, byte for byte the one the bundle sealed."""
    declared, where = verified.info.checkpoint, verified.folder / INFO
    if declared is None:
        return None, [f"--checkpoint {given}: {where} declares no checkpoint (random initialisation)"] if given else []
    if given is None:
        return None, [f"{where}: field 'checkpoint.sha256': the rerun needs the checkpoint {declared.file} "
                      f"(sha256 {declared.sha256[:12]}...); pass it with --checkpoint PATH"]
    if not Path(given).is_file():
        return None, [f"{given}: --checkpoint: no such file"]
    got = file_sha256(Path(given))
    if got != declared.sha256:
        return None, [f"{given}: sha256 {got[:12]}... differs from {INFO}'s checkpoint.sha256 "
                      f"{declared.sha256[:12]}...: not the checkpoint the bundle was made with"]
    return Path(given), []


def _data_root(verified: VerifiedBundle, given: Path | None) -> tuple[Path | None, list[str]]:
    """Demo bundles rerun on the demo cohort; real ones on the data root given (or $ASAP_BENCH_DATA)."""
    try:
        root = resolve_data_root(given)
    except FileNotFoundError as err:
        return None, [str(err)]
    if verified.info.synthetic and not is_demo_root(root):
        if given is not None:
            return None, [f"--data-root {root}: real data, but the bundle was made on the demo cohort"]
        root = ensure_demo()
    if not verified.info.synthetic and is_demo_root(root):
        return None, [f"{verified.folder / INFO}: field 'data_root': made on real data ({verified.info.data_root}); "
                      "pass --data-root with the data it was made on"]
    return root, []


def choose(verified: VerifiedBundle, k: int, seed: int) -> list[str]:
    """K record paths drawn with ``seed`` among the jobs of current protocol versions (older ones cannot rerun)."""
    eligible = sorted(rel for rel, (pid, _, _) in verified.jobs.items() if pid not in verified.older)
    return sorted(random.Random(seed).sample(eligible, min(k, len(eligible))))


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=RERUN_TOLERANCE, abs_tol=RERUN_TOLERANCE)


def compare(path: Path, claimed: ResultRecord, again: ResultRecord | None, name: str, why: str = "") -> list[str]:
    """Problems where the rerun of one job disagrees with the bundle's record of it."""
    if again is None or again.status != "ok":
        return [f"{path}: the rerun of {name} failed ({why or 'no record'}); the bundle cannot be checked"]
    problems = []
    for field, mine, theirs in (("data_fingerprint", claimed.provenance.data_fingerprint,
                                 again.provenance.data_fingerprint),
                                ("split_sha256", claimed.provenance.split_sha256, again.provenance.split_sha256)):
        if mine != theirs:
            problems.append(f"{path}: field 'provenance.{field}': {str(mine)[:12]} in the bundle, but "
                            f"{str(theirs)[:12]} on rerun ({name}); rerun on the data the bundle was made on")
    if problems:
        return problems
    return [f"{path}: field 'metrics.{metric}': {claimed.metrics.get(metric)!r} in the bundle, but "
            f"{again.metrics.get(metric)!r} on rerun ({name})"
            for metric in sorted({*claimed.metrics, *again.metrics})
            if not _close(claimed.metrics.get(metric), again.metrics.get(metric))]


def _run(verified: VerifiedBundle, chosen: list[str], options: RerunOptions, checkpoint: Path | None,
         root: Path) -> list[str]:
    """Run the chosen jobs into a temporary folder through the ordinary runner; compare each with the bundle."""
    from ..protocol import shipped_protocols
    from ..runner.jobs import Job, existing
    from ..runner.local import RunOptions, run_jobs

    info, protocols = verified.info, shipped_protocols()
    jobs = [Job(info.encoder, protocols[pid], ratio, seed)
            for pid, ratio, seed in (verified.jobs[rel] for rel in chosen)]
    environment = info.environment
    with tempfile.TemporaryDirectory(prefix="asap-bench-rerun-") as tmp:
        run = RunOptions(data_root=root, out=Path(tmp) / "records", device=options.device, variant=info.variant,
                         checkpoint=checkpoint, batch_size=int(environment.get("batch_size", 2)),
                         interpolate_pos=bool(environment.get("interpolate_pos", False)), min_fraction=0.0,
                         splits_dir=Path(tmp) / "splits", progress=False)
        outcomes = run_jobs(jobs, run, logging.getLogger("asap_bench.rerun"))
        problems = []
        for rel, job, outcome in zip(chosen, jobs, outcomes):
            problems += compare(verified.folder / rel, verified.records[rel], existing(job.record_path(run.out)),
                                job.name, outcome.message)
    return problems


def verify_rerun(verified: VerifiedBundle, options: RerunOptions, echo: Callable[[str], None] = print) -> list[str]:
    """Rerun ``options.jobs`` of the bundle's jobs; the problems (none when every metric matches)."""
    checkpoint, problems = _checkpoint(verified, options.checkpoint)
    root, more = _data_root(verified, options.data_root)
    problems += more
    seed = options.seed if options.seed is not None else secrets.randbelow(1_000_000)
    chosen = choose(verified, options.jobs, seed)
    if not chosen:
        problems.append(f"{verified.folder / INFO}: field 'protocols': no job of a current protocol version to rerun")
    if problems:
        return problems
    echo(f"rerun {len(chosen)} of {len(verified.jobs)} job(s) (seed {seed}; --rerun-seed {seed} repeats the choice):")
    for record in (verified.records[rel] for rel in chosen):
        echo(f"  rerun: {verified.info.encoder} {record.protocol} {record.regime:g} seed {record.seed}")
    try:
        registry.register_card(verified.card)
    except (KeyError, registry.PluginError) as err:
        return [f"{verified.folder / 'card.yaml'}: cannot be built here to rerun: {err.args[0] if err.args else err}"]
    try:
        problems = _run(verified, chosen, options, checkpoint, root)
    finally:
        registry.forget_card(verified.info.encoder)
    if not problems:
        echo(f"rerun: every metric matches to {RERUN_TOLERANCE:g} in {len(chosen)} job(s)")
    return problems
