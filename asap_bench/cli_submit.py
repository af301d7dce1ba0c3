"""``asap-bench submit`` and ``asap-bench leaderboard``: parse options and delegate to ``asap_bench.submit``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli import friendly


@click.command("submit")
@click.argument("card")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Weights file (default: the card's sources).")
@click.option("--task", "tasks", multiple=True, default=("all",), show_default=True,
              help="'all', a family, a glob or ids; repeat or comma-separate.")
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds 0..N-1 (default: each protocol's own, 5).")
@click.option("--smoke", is_flag=True, help="Check the card end to end in minutes: cls/stoic, 1 seed, demo cohort.")
@click.option("--out", type=click.Path(path_type=Path), help="Bundle folder (default: bundles/<encoder>).")
@click.option("--data-root", type=click.Path(path_type=Path),
              help="Prepared data (default: $ASAP_BENCH_DATA or the demo cohort).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--variant", help="Encoder size: native, or demo (default: demo on the demo cohort without weights).")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--interpolate-pos", is_flag=True, help="Resample position embeddings when the input grid differs.")
@click.option("--min-coverage", type=float, default=0.95, show_default=True,
              help="Least share of the module's weights the checkpoint must fill.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly
def submit(card, checkpoint, tasks, seeds, smoke, out, data_root, device, variant, batch_size, interpolate_pos,
           min_coverage, quiet) -> None:
    """Validate CARD (a card YAML, or an encoder name), load its checkpoint safely, smoke-test it, run the
    protocols and write a sealed result bundle for `asap-bench leaderboard add`."""
    from .submit.submission import SubmitOptions, submit as run_submit

    options = SubmitOptions(tasks=tasks, seeds=seeds, smoke=smoke, checkpoint=checkpoint, out=out,
                            data_root=data_root, device=device, variant=variant, batch_size=batch_size,
                            interpolate_pos=interpolate_pos, min_fraction=min_coverage, quiet=quiet)
    _, code = run_submit(card, options, echo=click.echo)  # card, checkpoint and smoke errors are ValueErrors
    sys.exit(code)


@click.group("leaderboard")
def leaderboard() -> None:
    """Verify result bundles, merge them into results/leaderboard, and rank the encoders."""


@leaderboard.command("add")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(path_type=Path), default=Path("results") / "leaderboard", show_default=True)
@click.option("--allow-protocol-version", "allow", multiple=True,
              help="Accept records of an older protocol version: ID@VERSION or ID@FINGERPRINT; repeatable.")
@click.option("--replace", is_flag=True, help="Replace the results of an encoder already on the leaderboard.")
@click.option("--verify-rerun", "rerun_jobs", type=click.IntRange(min=1), metavar="K",
              help="Rerun K randomly chosen jobs from the bundle's card and checkpoint; refuse unless every metric "
                   "matches to 1e-6.")
@click.option("--rerun-seed", type=click.IntRange(min=0), help="Seed of the rerun's choice (default: drawn, printed).")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="For --verify-rerun: the bundle's checkpoint (must match its sealed sha256).")
@click.option("--data-root", type=click.Path(path_type=Path),
              help="For --verify-rerun: the data the bundle was made on (default: $ASAP_BENCH_DATA, or the demo "
                   "cohort for a demo bundle).")
@click.option("--device", default="cpu", show_default=True, help="For --verify-rerun: where the jobs rerun.")
@friendly
def leaderboard_add(bundle, root, allow, replace, rerun_jobs, rerun_seed, checkpoint, data_root, device) -> None:
    """Verify BUNDLE (files, hashes, schema, protocol versions, seeds, metrics vs units) and merge it."""
    from .submit.leaderboard import add
    from .submit.rerun import RerunOptions

    if rerun_jobs is None and (rerun_seed is not None or checkpoint or data_root):
        raise click.UsageError("--rerun-seed, --checkpoint and --data-root go with --verify-rerun K")
    rerun = RerunOptions(rerun_jobs, rerun_seed, checkpoint, data_root, device) if rerun_jobs else None
    verified, board = add(bundle, root=root, allow=[a for value in allow for a in value.split(",") if a.strip()],
                          replace=replace, rerun=rerun, echo=click.echo)
    info = verified.info
    ran = sorted(p for p, e in info.protocols.items() if e.status == "ran")
    click.echo(f"verified {bundle}: {len(verified.records)} records of {len(ran)} protocol(s) x seeds {info.seeds}; "
               f"every file matches its sha256; {verified.recomputed} record(s) recomputed from their units"
               + (f", {verified.not_recomputable} without recomputable units" if verified.not_recomputable else ""))
    for pid, what in sorted(verified.older.items()):
        click.echo(f"  {pid}: accepted at older {what}; ranked as its own setting")
    click.echo(f"added {info.encoder} to {board} ({'replaced' if replace else 'new'})")


@leaderboard.command("show")
@click.option("--root", type=click.Path(path_type=Path), default=Path("results") / "leaderboard", show_default=True)
@click.option("--real", is_flag=True, help="The board of real-data results (default: the demo board).")
@click.option("--family", help="Only these families, e.g. cls,prog.")
@click.option("--alpha", type=float, default=0.05, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@friendly
def leaderboard_show(root, real, family, alpha, fmt) -> None:
    """The ranking (mean rank, best, significantly best / behind after Holm) and per-setting tables."""
    from .submit.leaderboard import board_dir, render_standings, standings

    board = board_dir(root, synthetic=not real)
    ranking, sig, frame = standings(board, alpha=alpha, family=family)
    if fmt == "json":
        payload = {"board": str(board), "ranking": ranking.to_dict("records"),
                   "comparisons": json.loads(sig.drop(columns=["x", "y"], errors="ignore").to_json(orient="records"))}
        click.echo(json.dumps(payload, indent=1, default=str))
        return
    click.echo(render_standings(board, ranking, sig, frame, alpha))
