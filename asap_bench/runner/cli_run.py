"""`asap-bench run`: resolve the options, run the jobs, print the summary, log to a file."""

from __future__ import annotations

import logging
import os
import signal
import statistics
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from ..data.roots import resolve_data_root
from ..protocol import select_protocols
from ..results.record import ensure_writable
from .jobs import expand
from .local import Outcome, RunOptions, check_inputs, run_jobs


def default_out(data_root: Path, synthetic: bool) -> Path:
    return Path("results") / "runs" / ("demo" if synthetic else data_root.resolve().name)


def _new_log_file(folder: Path, stem: str) -> Path:
    """``<stem>.log``, created here and now (exclusively), or ``<stem>-2.log``, ...: never another run's log."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = folder / (f"{stem}.log" if n == 1 else f"{stem}-{n}.log")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free log file name for {stem}")


def setup_log(out: Path, quiet: bool, rank: int = 0) -> tuple[logging.Logger, Path]:
    """One log file per run (process and rank) under <out>/logs, and warnings on the console unless quiet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = _new_log_file(out / "logs", f"run-{stamp}-{os.getpid()}" + (f"-rank{rank}" if rank else ""))
    log = logging.getLogger("asap_bench")
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.setLevel(logging.DEBUG)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if not quiet:
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        log.addHandler(console)
    log.propagate = False
    return log, path


def summarise(outcomes: list[Outcome]) -> list[dict]:
    """One row per (encoder, task, regime): job counts by status and the primary metric over seeds."""
    rows: dict[tuple, dict] = {}
    values: dict[tuple, list[float]] = defaultdict(list)
    for o in outcomes:
        key = (o.job.encoder, o.job.protocol.id, o.job.ratio)
        row = rows.setdefault(key, {"encoder": key[0], "task": key[1], "regime": f"{key[2]:g}",
                                    "metric": o.job.protocol.primary_metric, "ok": 0, "cached": 0, "failed": 0,
                                    "skipped": 0, "todo": 0, "note": ""})
        if o.primary:  # the metric the job reported: on the demo cohort its demo primary
            row["metric"] = o.primary
        status = o.status if o.status in row else "todo"
        row[status] += 1
        if o.metric is not None:
            values[key].append(o.metric)
        if o.message and not row["note"]:
            row["note"] = o.message[:90]
    for key, row in rows.items():
        vals = values.get(key, [])
        row["mean"] = f"{statistics.fmean(vals):.4f}" if vals else "-"
        row["std"] = f"{statistics.stdev(vals):.4f}" if len(vals) > 1 else "-"
    return list(rows.values())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so it unwinds as Ctrl-C does."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler, torchrun, ``kill``) stops the run as Ctrl-C does: locks are released and
    the interrupted job's training state is kept for the rerun to resume."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def writable_out(out: Path) -> None:
    """Refuse an output folder that cannot take records before any job runs, naming it."""
    try:
        ensure_writable(out)
    except OSError as error:
        reason = "it exists and is not a folder" if isinstance(error, FileExistsError) else error.strerror or error
        raise ValueError(f"--out {out}: not a writable folder ({reason})") from None


def _failures(outcomes: list[Outcome], log_path: Path, shown: int = 10) -> list[str]:
    """What each failed job said, whole (the table's note column is cut short)."""
    failed = [o for o in outcomes if o.status == "failed"]
    lines = [f"failed: {o.job.name}: {o.message}" for o in failed[:shown]]
    if len(failed) > shown:
        lines.append(f"... and {len(failed) - shown} more failed job(s); see {log_path}")
    return lines


def _quiet_libraries() -> None:
    """Text models load from local folders in a second; transformers' per-load weight bars are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _encoder_names(encoders: list[str]) -> list[str]:
    """Names as given; a card file (``my-encoder.yaml``) is registered for this process and runs under its name."""
    from ..encoders.registry import register_card

    return [register_card(Path(e)).name if e.endswith((".yaml", ".yml")) else e for e in encoders]


def execute(encoders: list[str], tasks: tuple[str, ...], seeds: list[int] | None, ratios: list[float] | None,
            checkpoint: Path | None, data_root: Path | None, out: Path | None, device: str, variant: str | None,
            batch_size: int, interpolate_pos: bool, force: bool, dry_run: bool, quiet: bool, slurm=None) -> int:
    from ..cli import _table
    from ..data.demo import is_demo_root
    from . import distributed

    root = resolve_data_root(data_root)
    synthetic = is_demo_root(root)
    out = out or default_out(root, synthetic)
    # reduced encoders on the demo cohort, unless real weights are given
    variant = variant or ("demo" if synthetic and checkpoint is None else "native")
    options = RunOptions(data_root=root, out=out, device=device, variant=variant,
                         checkpoint=checkpoint, force=force, batch_size=batch_size, interpolate_pos=interpolate_pos,
                         progress=not quiet)
    jobs = expand(_encoder_names(encoders), select_protocols(tasks), seeds, ratios)
    check_inputs(jobs, options)  # every (encoder, protocol) input fits, before anything is written or submitted
    if distributed.launched_by_torchrun():
        options.device = distributed.init(device)
        quiet = quiet or distributed.rank() > 0
        options.progress = not quiet
    writable_out(out)
    log, log_path = setup_log(out, quiet, distributed.rank())
    _quiet_libraries()
    log.info("run: %d jobs, data %s (%s), variant %s, device %s, %d process(es)", len(jobs), root,
             "demo" if synthetic else "real", options.variant, options.device, distributed.world())
    start = time.perf_counter()
    with sigterm_interrupts():
        if slurm is not None and not dry_run:
            from .launch import run_slurm

            slurm.folder = slurm.folder or out / "slurm"
            outcomes = run_slurm(jobs, options, slurm)
        else:
            outcomes = run_jobs(jobs, options, log, dry_run=dry_run)
    if distributed.rank() > 0:
        distributed.shutdown()
        return 0
    rows = summarise(outcomes)
    columns = ["encoder", "task", "regime", "metric", "mean", "std", "ok", "cached", "failed", "skipped", "note"]
    if dry_run:
        columns = ["encoder", "task", "regime", "cached", "todo", "failed", "skipped", "note"]
    click.echo(_table(rows, columns))
    for line in _failures(outcomes, log_path):
        click.echo(line)
    counts = defaultdict(int)
    for o in outcomes:
        counts[o.status] += 1
    verb = "would run" if dry_run else "ran"
    click.echo(f"\n{len(jobs)} jobs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); {verb} in "
               f"{time.perf_counter() - start:.1f} s on {'the demo cohort' if synthetic else root}; "
               f"records under {out}; log {log_path}")
    for o in outcomes:
        log.info("%s: %s %s", o.job.name, o.status, o.message)
    distributed.shutdown()
    return 1 if counts["failed"] else 0
