"""``asap-bench submit``: card and checkpoint in, a sealed result bundle out.

The order is cheapest first: the card is validated, the checkpoint loaded
safely with its key coverage printed, one forward pass checked on demo volumes,
and only then are the protocols run, through the ordinary runner, into the
bundle's ``records/``. A rerun into the same folder resumes: finished jobs are
recognised by their keys and not run again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.demo import ensure_demo, is_demo_root
from ..data.manifest import file_sha256
from ..data.roots import resolve_data_root
from ..encoders.checkpoints import DEFAULT_MIN_FRACTION
from ..protocol import select_protocols
from ..results.record import FAILED_SUFFIX, UNITS_SUFFIX, now, read_record, software, write_atomic
from ..runner.cli_run import setup_log, summarise
from ..runner.jobs import expand
from ..runner.local import RunOptions, run_jobs
from ..schema import content_hash
from .bundle import (CARD, INFO, LOAD_REPORT, MANIFEST, RECORDS, BundleInfo, CheckpointInfo, DataEntry,
                     ProtocolEntry, write_manifest)
from .smoke import load_checked, resolve_card, smoke_forward

SMOKE_TASKS = ("cls/stoic",)  # one small protocol on frozen global features


@dataclass
class SubmitOptions:
    tasks: tuple[str, ...] = ("all",)
    seeds: int | None = None  # None: each protocol's own count (5)
    smoke: bool = False
    checkpoint: Path | None = None
    out: Path | None = None
    data_root: Path | None = None
    device: str = "cpu"
    variant: str | None = None
    batch_size: int = 2
    interpolate_pos: bool = False
    min_fraction: float = DEFAULT_MIN_FRACTION
    quiet: bool = False


def _prepare_out(out: Path, encoder: str) -> None:
    """An empty or new folder, or an earlier bundle of this encoder to resume; never someone else's folder."""
    if out.exists() and any(out.iterdir()) and not ((out / INFO).exists() or (out / RECORDS).is_dir()):
        raise ValueError(f"--out {out} exists, is not empty and is not a bundle; choose a new folder")
    others = sorted(p.name for p in (out / RECORDS).iterdir() if p.is_dir() and p.name != encoder) \
        if (out / RECORDS).is_dir() else []
    if others:
        raise ValueError(f"--out {out} is a bundle of {', '.join(others)}, not of {encoder!r}; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # resealed at the end


def _owner(path: Path) -> Path:
    """The record a file belongs to: itself, or the record whose sidecar or failed rerun it is."""
    for suffix in (UNITS_SUFFIX, FAILED_SUFFIX):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)] + ".json")
    return path


def _prune(records: Path, keep: set[Path]) -> list[Path]:
    """Remove records (and sidecars) of an earlier run that are not in this job matrix."""
    removed = []
    for path in sorted(records.rglob("*.json")) if records.is_dir() else []:
        if _owner(path).resolve() not in keep:
            path.unlink()
            removed.append(path)
    return removed


def submit(card_spec: str | Path, options: SubmitOptions, echo: Callable[[str], None] = print) -> tuple[Path, int]:
    """Validate, smoke-test, run, and write the bundle; returns (bundle folder, exit code)."""
    from ..cli import _table

    source = resolve_card(card_spec)
    card = source.card
    echo(f"card: {card.name} (family {card.family}, {source.where}) is valid")

    root = resolve_data_root(options.data_root)
    synthetic = is_demo_root(root)
    if options.smoke and not synthetic:
        raise ValueError(f"--smoke runs on the demo cohort; {root} is real data (drop --data-root, or drop --smoke)")
    has_weights = options.checkpoint is not None or card.checkpoint.availability != "none"
    variant = options.variant or ("demo" if synthetic and not has_weights else "native")
    out = Path(options.out or Path("bundles") / (card.name + ("-smoke" if options.smoke else "")))

    encoder, report, checkpoint = load_checked(card, variant, options.checkpoint, min_fraction=options.min_fraction,
                                               adapt=options.interpolate_pos)
    echo("checkpoint: " + (report.summary() if report else "none (random initialisation)"))
    smoke_root = root if synthetic else ensure_demo()
    forward = smoke_forward(encoder, smoke_root)
    del encoder
    _prepare_out(out, card.name)
    echo(f"smoke forward ({variant}): input {forward['input_shape']} -> global {forward['global_shape']}"
         + (f", tokens {forward['patch_tokens_shape']} on grid {forward['grid']}" if forward["grid"] else "")
         + (f", {forward['hidden_states']} hidden states" if forward["hidden_states"] else "")
         + f" in {forward['seconds']:.2f} s: ok")

    tasks = SMOKE_TASKS if options.smoke and options.tasks in ((), ("all",)) else options.tasks
    seeds = [0] if options.smoke else list(range(options.seeds)) if options.seeds is not None else None
    protocols = select_protocols(tasks)
    jobs = expand([card.name], protocols, seeds)
    run = RunOptions(data_root=root, out=out / RECORDS, device=options.device, variant=variant,
                     checkpoint=checkpoint, batch_size=options.batch_size, interpolate_pos=options.interpolate_pos,
                     min_fraction=options.min_fraction, progress=not options.quiet)
    log, log_path = setup_log(out, options.quiet)
    log.info("submit %s: %d jobs, data %s, variant %s", card.name, len(jobs), root, variant)
    started = time.perf_counter()
    outcomes = run_jobs(jobs, run, log)
    removed = _prune(out / RECORDS, {job.record_path(out / RECORDS).resolve() for job in jobs})
    echo(_table(summarise(outcomes), ["encoder", "task", "regime", "metric", "mean", "std", "ok", "cached",
                                      "failed", "skipped", "note"]))

    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "cached", "failed", "skipped")}
    skipped = {o.job.protocol.id: o.message for o in outcomes if o.status == "skipped"}
    entries = {p.id: ProtocolEntry(version=p.version, fingerprint=p.fingerprint, regimes=list(p.regimes),
                                   seeds=sorted({j.seed for j in jobs if j.protocol.id == p.id}),
                                   status="skipped" if p.id in skipped else "ran", reason=skipped.get(p.id, ""))
               for p in protocols}
    data: dict[str, DataEntry] = {}
    for job in jobs:
        path = job.record_path(out / RECORDS)
        if path.is_file():
            prov = read_record(path).provenance
            if prov.data_fingerprint:
                data[f"{prov.dataset}/{prov.table}"] = DataEntry(manifest_sha256=prov.manifest_sha256,
                                                                 data_fingerprint=prov.data_fingerprint)
    write_atomic(out / CARD, source.text)
    load = {**dataclasses.asdict(report), "path": Path(report.path).name} if report else None  # no local paths
    write_atomic(out / LOAD_REPORT, json.dumps(load, indent=1) + "\n")
    info = BundleInfo(
        encoder=card.name, created=now(), card_sha256=file_sha256(out / CARD),
        card_fingerprint=content_hash(card.model_dump(mode="json")), family=card.family, plugin=source.plugin,
        checkpoint=None if report is None else CheckpointInfo(
            file=Path(report.path).name, sha256=report.sha256, fraction=report.fraction, loaded=len(report.loaded),
            missing=len(report.missing), unexpected=len(report.unexpected), ignored=len(report.ignored),
            adapted=len(report.adapted)),
        variant=variant, synthetic=synthetic, data_root="demo" if synthetic else root.resolve().name,
        smoke=options.smoke, seeds=sorted({j.seed for j in jobs}), tasks=list(tasks), protocols=entries,
        data=data, environment={**software(), "device": options.device, "torch_threads": torch.get_num_threads(),
                     "batch_size": options.batch_size, "interpolate_pos": options.interpolate_pos},
        jobs={"ok": counts["ok"] + counts["cached"], "failed": counts["failed"], "skipped": counts["skipped"]},
        smoke_forward=forward)
    write_atomic(out / INFO, info.model_dump_json(indent=1) + "\n")
    manifest = write_manifest(out)
    echo(f"\nbundle {out}: {len(manifest['files'])} files sealed in {MANIFEST} ({counts['ok']} jobs run, "
         f"{counts['cached']} reused, {counts['failed']} failed, {counts['skipped']} skipped; "
         f"{time.perf_counter() - started:.1f} s); log {log_path}"
         + (f"; removed {len(removed)} record file(s) of an earlier run outside this job matrix" if removed else ""))
    if counts["failed"]:
        echo(f"{counts['failed']} job(s) failed: the leaderboard will refuse this bundle until a rerun "
             "(the same command) completes them")
    elif options.smoke:
        echo("smoke bundle: the card works end to end; submit without --smoke for the leaderboard")
    return out, 1 if counts["failed"] else 0

