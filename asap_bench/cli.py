"""The ``asap-bench`` command line: parses options and delegates; no logic lives here."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
import yaml

from . import __version__
from .data.cache_kinds import KINDS as CACHE_KINDS

# Errors a user can cause with bad input: reported as one clear message, exit 1.
def _user_errors():
    from .data.manifest import ManifestError
    from .encoders.registry import PluginError
    from .schema import SchemaError
    from .splits import SplitError

    return (SchemaError, ManifestError, SplitError, PluginError, KeyError, FileNotFoundError, ValueError)


def friendly(func):
    """Turn expected input errors into a message and exit code 1 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except _user_errors() as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(str(message)) from None

    return wrapper


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _echo_yaml(model) -> None:
    """A validated model as YAML, fields in schema order and every default resolved."""
    click.echo(yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, allow_unicode=True).rstrip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asap-bench")
def main() -> None:
    """Benchmark 3D chest-CT encoders on the 22 ASAP tasks and 5 external validations."""


# --------------------------------------------------------------------------- protocols

@main.group()
def protocols() -> None:
    """List, show and validate task protocols."""


@protocols.command("list")
@click.option("--family", help="Only this family (cls, seg, prog, rg, voc, ret, vqa, ext).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@friendly
def protocols_list(family: str | None, fmt: str) -> None:
    """List the shipped protocols."""
    from .protocol import shipped_protocols

    rows = [
        {"id": p.id, "family": p.family, "version": p.version, "dataset": p.data.dataset,
         "regimes": ",".join(f"{r:g}" for r in p.regimes), "metric": p.primary_metric, "access": p.access,
         "fingerprint": p.fingerprint[:12]}
        for p in shipped_protocols().values() if family in (None, p.family)
    ]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(_table(rows, ["id", "family", "version", "dataset", "regimes", "metric", "access", "fingerprint"]))
    click.echo(f"\n{len(rows)} protocols")


@protocols.command("show")
@click.argument("protocol_id")
@friendly
def protocols_show(protocol_id: str) -> None:
    """Print a protocol with every default resolved, and its fingerprint."""
    from .protocol import get_protocol

    protocol = get_protocol(protocol_id)
    click.echo(f"# fingerprint: {protocol.fingerprint}")
    _echo_yaml(protocol)


@protocols.command("validate")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
def protocols_validate(paths: tuple[Path, ...]) -> None:
    """Validate protocol files or folders (default: the shipped protocols).

    Every file is checked; the command exits non-zero if any fails and names
    the file, the field and what was expected.
    """
    from .protocol import check_references, load_protocol_file, protocol_files, shipped_protocols, shipped_raw
    from .schema import SchemaError, read_yaml

    files = [f for p in paths for f in (protocol_files(p) if p.is_dir() else [p])] or protocol_files()
    given = {f"{f.parent.name}/{f.stem}": f for f in files}
    lookup = lambda pid: read_yaml(given[pid]) if pid in given else shipped_raw(pid)  # noqa: E731
    loaded, path_of, failures = {}, {}, 0
    by_id: dict[str, list[Path]] = {}
    for path in files:
        try:
            protocol = load_protocol_file(path, lookup)
        except SchemaError as err:
            failures += 1
            click.echo(f"FAIL {err}", err=True)
            continue
        by_id.setdefault(protocol.id, []).append(path)
        loaded[protocol.id], path_of[protocol.id] = protocol, path
    for pid, paths_with_id in by_id.items():  # one id, one file: a second would silently shadow the first
        if len(paths_with_id) > 1:
            loaded.pop(pid, None)
            for path in paths_with_id:
                failures += 1
                others = ", ".join(str(o) for o in paths_with_id if o != path)
                click.echo(f"FAIL {path}: field 'id': duplicate id {pid!r}, also in {others}", err=True)
    # cross-file references resolve against the shipped set plus the files given
    known = {**shipped_protocols(), **loaded} if paths else loaded
    for pid in list(loaded):
        try:
            check_references({**known, pid: loaded[pid]}, {**{k: Path("?") for k in known}, **path_of})
        except SchemaError as err:
            failures += 1
            loaded.pop(pid)
            click.echo(f"FAIL {err}", err=True)
    for pid in sorted(loaded):
        click.echo(f"ok   {path_of[pid]}  ({pid}, {loaded[pid].fingerprint[:12]})")
    click.echo(f"{len(loaded)} valid, {failures} invalid")
    if failures:
        sys.exit(1)


# --------------------------------------------------------------------------- datasets

@main.group()
def datasets() -> None:
    """Dataset cards and prepared data."""


@datasets.command("list")
@friendly
def datasets_list() -> None:
    """List the dataset cards."""
    from .data.cards import dataset_names, load_card

    rows = []
    for name in dataset_names():
        card = load_card(name)
        rows.append({"name": name, "title": card.title, "modality": card.modality, "access": card.access,
                     "tables": ",".join(card.tables)})
    click.echo(_table(rows, ["name", "title", "modality", "access", "tables"]))


@datasets.command("show")
@click.argument("name")
@friendly
def datasets_show(name: str) -> None:
    """Print a dataset card, with each table's manifest columns."""
    from .data.cards import load_card

    card = load_card(name)
    _echo_yaml(card)
    for table_name, table in card.tables.items():
        click.echo(f"# {table_name}.csv columns: {', '.join(table.columns())}")


def _key_values(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. negatives_per_series=20 or spacing=[1,1,2.5]")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


@datasets.command("prepare")
@click.argument("name")
@click.option("--source", type=click.Path(path_type=Path), help="The official download, as unpacked.")
@click.option("--out", type=click.Path(path_type=Path), help="The prepared data root (one folder per dataset).")
@click.option("--resume", is_flag=True, help="Keep files converted by an earlier, interrupted run.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Adapter option: spacing=[x,y,z] (rad-chestct, cc-ccii), negatives_per_series=N|-1 (luna16), "
                   "mask_variable=NAME (fumpe), time_column=NAME and event_column=NAME (inspect).")
@friendly
def datasets_prepare(name: str, source: Path | None, out: Path | None, resume: bool, settings: tuple[str, ...]) -> None:
    """Turn a dataset's official download into the manifest format every protocol reads."""
    from .data.adapters import get_adapter, prepare, private_message

    if get_adapter(name).prepare is None:
        raise click.ClickException(private_message(name))
    if source is None or out is None:
        raise click.UsageError("prepare needs --source RAW and --out ROOT")
    try:
        summary = prepare(name, source, out, {**_key_values(settings), "resume": resume})
    except ImportError as err:  # an optional reader (SimpleITK, pydicom, h5py) is not installed
        raise click.ClickException(str(err)) from None
    for note in summary["notes"]:
        click.echo(f"note: {note}")
    for table, rows in summary["tables"].items():
        click.echo(f"{name}/{table}.csv: {rows} rows  fingerprint {summary['fingerprints'][table][:16]}")
    click.echo(f"prepared {summary['folder']}; check it with `asap-bench datasets verify {out}`")


@datasets.command("verify")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--dataset", "names", multiple=True, help="Only these datasets (default: every prepared one).")
@click.option("--content", is_flag=True, help="Fingerprints include every file's sha256 (reads all bytes).")
@click.option("--no-open", is_flag=True, help="Only check that files exist; do not read them.")
@click.option("--json", "as_json", is_flag=True, help="The full report as JSON.")
@friendly
def datasets_verify(root: Path, names: tuple[str, ...], content: bool, no_open: bool, as_json: bool) -> None:
    """Check a prepared root: tables, files, geometry, masks and labels; exit 1 on any problem."""
    from .data.verify import verify_root

    report = verify_root(root, list(names) or None, open_files=not no_open, content=content)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for dataset, tables in report.checked.items():
            for table, rows in tables.items():
                click.echo(f"{dataset}/{table}: {rows} rows  fingerprint {report.fingerprints[dataset][table]}")
        for warning in report.warnings:
            click.echo(f"warning: {warning}")
        for problem in report.problems:
            click.echo(f"problem: {problem}", err=True)
        click.echo(f"{report.files} files read, {len(report.problems)} problem(s), {len(report.warnings)} warning(s)")
    if not report.ok:
        sys.exit(1)


@datasets.command("download")
@click.argument("name", type=click.Choice(["ct-rate", "radgenome"]))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where the raw download goes.")
@click.option("--include", "patterns", multiple=True, help="Only files matching these patterns (default: the "
              "label, report and metadata tables).")
@click.option("--volumes", is_flag=True, help="Also the volumes (CT-RATE: about 12 TB).")
@click.option("--token", envvar="HF_TOKEN", help="Hub token for the gated repository (default: $HF_TOKEN).")
@friendly
def datasets_download(name: str, out: Path, patterns: tuple[str, ...], volumes: bool, token: str | None) -> None:
    """Fetch a hub-hosted dataset's official files (needs network and accepted terms)."""
    from .data.download import DownloadError, download

    try:
        path = download(name, out, patterns=list(patterns) or None, volumes=volumes, token=token)
    except DownloadError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"downloaded into {path}; next: asap-bench datasets prepare {name} --source {path} --out ROOT")


# --------------------------------------------------------------------------- run

def _seed_list(seeds: int | None, seed_list: str | None) -> list[int] | None:
    if seed_list is not None:
        try:
            values = [int(s) for s in seed_list.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {seed_list!r}", param_hint="--seed-list")
        bad = [v for v in values if v < 0]
        if not values or bad:
            raise click.BadParameter(f"expected non-negative seeds, got {seed_list!r}", param_hint="--seed-list")
        if len(set(values)) != len(values):
            raise click.BadParameter(f"seed listed twice in {seed_list!r}", param_hint="--seed-list")
        return values
    return list(range(seeds)) if seeds is not None else None


def _ratio_list(ratios: str | None, tasks: tuple[str, ...]) -> list[float] | None:
    """``--ratios``: label fractions in (0, 1], each a regime of at least one selected protocol."""
    if ratios is None:
        return None
    try:
        values = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated fractions such as 0.01,1, got {ratios!r}",
                                 param_hint="--ratios") from None
    out_of_range = [v for v in values if not 0 < v <= 1]
    if not values or out_of_range:
        raise click.BadParameter(f"expected label fractions in (0, 1] such as 0.01,0.1,1, got {ratios!r}",
                                 param_hint="--ratios")
    from .protocol import select_protocols

    regimes = sorted({r for p in select_protocols(tasks) for r in p.regimes})
    unknown = [v for v in values if not any(abs(v - r) < 1e-12 for r in regimes)]
    if unknown:
        raise click.BadParameter(f"{', '.join(f'{v:g}' for v in unknown)} is not a label regime of the selected "
                                 f"protocols (their regimes: {', '.join(f'{r:g}' for r in regimes)})",
                                 param_hint="--ratios")
    return values


def _check_encoders(names: list[str]) -> None:
    """Every name is a known encoder or a card file, before any record is written under it."""
    from .encoders.registry import get_card

    for name in names:
        if name.endswith((".yaml", ".yml")):
            if not Path(name).is_file():
                raise click.BadParameter(f"card file {name} does not exist", param_hint="--encoder")
        else:
            get_card(name)  # unknown names raise KeyError with the closest matches


@main.command()
@click.option("--encoder", "encoders", multiple=True, required=True,
              help="Encoder name or card YAML; repeat or comma-separate for several.")
@click.option("--task", "tasks", multiple=True, default=("all",), show_default=True,
              help="'all', a family (cls), a glob ('seg/*') or ids; repeat or comma-separate.")
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds 0..N-1 (default: each protocol's own, 5).")
@click.option("--seed-list", help="Explicit seeds, e.g. 0,3,7.")
@click.option("--ratios", help="Only these regimes, e.g. 0.01,1.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Weights file (default: the card's sources).")
@click.option("--data-root", type=click.Path(path_type=Path), help="Prepared data (default: $ASAP_BENCH_DATA or the demo cohort).")
@click.option("--out", type=click.Path(path_type=Path), help="Records folder (default: results/runs/<data>).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--variant", help="Encoder size: native, or demo (default: demo on the demo cohort, else native).")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="Volumes per extraction batch.")
@click.option("--interpolate-pos", is_flag=True, help="Resample position embeddings when the input grid differs.")
@click.option("--force", is_flag=True, help="Rerun jobs that already have a valid record.")
@click.option("--dry-run", is_flag=True, help="Print the job matrix and what is already done; run nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-job lines; the summary only.")
@click.option("--launcher", type=click.Choice(["local", "torchrun", "slurm"]), default="local", show_default=True,
              help="torchrun: data-parallel in --nproc processes; slurm: one job per (encoder, task) via submitit.")
@click.option("--nproc", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes for --launcher torchrun.")
@click.option("--slurm-partition", help="SLURM partition.")
@click.option("--slurm-gpus", type=click.IntRange(min=0), default=0, show_default=True, help="GPUs per SLURM job.")
@click.option("--slurm-time", type=click.IntRange(min=1), default=240, show_default=True,
              help="Minutes per SLURM job (requeued on timeout).")
@click.option("--slurm-cpus", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--slurm-mem-gb", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--slurm-folder", type=click.Path(path_type=Path), help="submitit logs (default: <out>/slurm).")
@click.option("--slurm-cluster", type=click.Choice(["slurm", "local", "debug"]), default="slurm", hidden=True)
@click.pass_context
@friendly
def run(ctx, encoders, tasks, seeds, seed_list, ratios, checkpoint, data_root, out, device, variant, batch_size,
        interpolate_pos, force, dry_run, quiet, launcher, nproc, slurm_partition, slurm_gpus, slurm_time, slurm_cpus,
        slurm_mem_gb, slurm_folder, slurm_cluster) -> None:
    """Run encoder(s) x task(s) x regimes x seeds, resumably; one JSON record per job."""
    from .runner.cli_run import execute
    from .runner.distributed import launched_by_torchrun
    from .runner.launch import SlurmOptions, torchrun_command

    names = [n.strip() for e in encoders for n in e.split(",") if n.strip()]
    _check_encoders(names)
    seed_values = _seed_list(seeds, seed_list)
    ratio_list = _ratio_list(ratios, tasks)
    if launcher == "torchrun" and not launched_by_torchrun():
        import subprocess

        forwarded = _forward_args(ctx, drop={"launcher", "nproc"})
        sys.exit(subprocess.run(torchrun_command(forwarded, nproc)).returncode)
    slurm = None
    if launcher == "slurm":
        slurm = SlurmOptions(folder=slurm_folder, partition=slurm_partition, gpus=slurm_gpus, cpus=slurm_cpus,
                             mem_gb=slurm_mem_gb, minutes=slurm_time, cluster=slurm_cluster)
    code = execute(names, tasks, seed_values, ratio_list, checkpoint, data_root, out, device,
                   variant, batch_size, interpolate_pos, force, dry_run, quiet, slurm)
    sys.exit(code)


def _forward_args(ctx: click.Context, drop: set[str]) -> list[str]:
    """The options of this invocation as command-line arguments, to re-run it under a launcher."""
    args: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in drop or param.name not in ctx.params:
            continue
        value, flag = ctx.params[param.name], param.opts[0]
        if param.is_flag:
            args += [flag] if value else []
        elif param.multiple:
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, str(value)]
    return args


# --------------------------------------------------------------------------- report

@main.command()
@click.option("--format", "fmt", type=click.Choice(["latex", "markdown", "md", "csv", "json", "html"]),
              default="latex", show_default=True)
@click.option("--source", type=click.Choice(["runs", "paper", "both"]), default="runs", show_default=True,
              help="Measured records, the numbers quoted from the ASAP paper, or both side by side (labelled).")
@click.option("--records", "records_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Record folders (default: results/runs).")
@click.option("--metric", help="Metrics, comma-separated, or 'all' (default: the paper's / primary).")
@click.option("--family", help="Families, e.g. cls,seg.")
@click.option("--regime", help="Regimes, e.g. 0.01,1 or 1%,100%.")
@click.option("--encoders", help="Encoders, comma-separated.")
@click.option("--out", type=click.Path(path_type=Path), help="Output file (default: stdout; html: results/report/).")
@click.option("--figures", type=click.Path(path_type=Path), help="Also write figures (PNG + PDF) into this folder.")
@click.option("--alpha", type=float, default=0.05, show_default=True)
@click.option("--no-significance", is_flag=True, help="Skip the paired tests.")
@click.option("--compare", metavar="A,B", help="Compare two encoders over every setting both have (Wilcoxon on a "
              "unit-free scale, mean ranks; --figures: critical-difference diagram) instead of the tables.")
@friendly
def report(fmt, source, records_dirs, metric, family, regime, encoders, out, figures, alpha, no_significance,
           compare) -> None:
    """Paper-style tables (LaTeX, markdown, csv, json), the html leaderboard page, figures."""
    from .report.cli_report import report_command

    report_command(records_dirs, source, fmt, metric, family, regime, encoders, out, significance=not no_significance,
                   alpha=alpha, figures=figures, compare=compare)


# --------------------------------------------------------------------------- cache

@main.group()
def cache() -> None:
    """The content-keyed caches: volumes, segmentation volumes, features, text embeddings."""


@cache.command("ls")
@friendly
def cache_ls() -> None:
    """List cache entries: kind, key, what they hold, size, and whether they are whole."""
    from .data.cache import cache_root, entries

    rows = [{"kind": e["kind"], "key": e["key"][:12], "encoder": e.get("encoder", "-"),
             "data": f"{e.get('dataset', '?')}/{e.get('table', '?')}", "MB": f"{e['bytes'] / 2**20:.1f}",
             "created": e.get("created", ""), "state": e["state"]} for e in entries()]
    click.echo(_table(rows, ["kind", "key", "encoder", "data", "MB", "created", "state"]))
    damaged = sum(r["state"] != "ok" for r in rows)
    click.echo(f"\n{len(rows)} entries under {cache_root()}"
               + (f"; {damaged} damaged (rebuilt when next needed, or `asap-bench cache clear`)" if damaged else ""))


@cache.command("clear")
@click.option("--kind", type=click.Choice(CACHE_KINDS), help="Only this kind.")
@friendly
def cache_clear(kind: str | None) -> None:
    """Remove cache entries, damaged ones included (the demo cohort is kept)."""
    from .data.cache import cache_root, clear

    click.echo(f"removed {clear(kind=kind)} entries from {cache_root()}")


# --------------------------------------------------------------------------- encoders

@main.group()
def encoders() -> None:
    """Encoder cards: the built-in encoders and those installed plug-ins add."""


@encoders.command("list")
@friendly
def encoders_list() -> None:
    """List every encoder, grouped as the paper's tables are."""
    from .encoders.registry import all_encoder_names, get_card

    cards = sorted((get_card(n) for n in all_encoder_names()), key=lambda c: (c.order, c.name))
    rows = [{"name": c.name, "group": c.group_title, "family": c.family, "embed_dim": c.embed_dim,
             "input": "x".join(map(str, c.input.size)), "checkpoint": c.checkpoint.availability,
             "status": c.status.level} for c in cards]
    click.echo(_table(rows, ["name", "group", "family", "embed_dim", "input", "checkpoint", "status"]))
    click.echo(f"\n{len(rows)} encoders")


@encoders.command("show")
@click.argument("name")
@friendly
def encoders_show(name: str) -> None:
    """Print an encoder card (NAME or a card YAML path)."""
    from .encoders.registry import get_card

    card = get_card(name)
    _echo_yaml(card)


@encoders.command("check")
@click.argument("names", nargs=-1)
@click.option("--task", "tasks", multiple=True, default=("all",), show_default=True,
              help="'all', a family (cls), a glob ('seg/*') or ids; repeat or comma-separate.")
@click.option("--variant", type=click.Choice(["native", "demo", "both"]), default="both", show_default=True)
@click.option("--all-pairs", is_flag=True, help="One row per (encoder, protocol, variant) instead of a summary.")
@friendly
def encoders_check(names: tuple[str, ...], tasks: tuple[str, ...], variant: str, all_pairs: bool) -> None:
    """Build every encoder (NAME ..., default all) at the effective input of every protocol, on the meta device.

    No data, weights or compute: a meta tensor of the input the harness would feed goes
    through each encoder; shapes, the token grid's cover of the (padded) input, UNETR's
    hidden states and a published-size checkpoint's fit are checked. Exits 1 naming every
    failing pair. Whether a run needs --interpolate-pos is shown, not failed.
    """
    from .encoders.check import check_encoders, summary_rows
    from .encoders.registry import all_encoder_names
    from .protocol import select_protocols

    chosen = list(names) or all_encoder_names()
    _check_encoders(chosen)
    variants = ("native", "demo") if variant == "both" else (variant,)
    rows = check_encoders(chosen, select_protocols(tasks), variants)
    if all_pairs:
        table = [{**vars(r), "status": "ok" if r.ok else "FAILED"} for r in rows]
        click.echo(_table(table, ["encoder", "protocol", "variant", "input", "grid", "status", "adaptation"]))
    else:
        click.echo(_table(summary_rows(rows), ["encoder", "variant", "protocols", "input", "grid", "status",
                                               "adaptation"]))
    failed = [r for r in rows if not r.ok]
    click.echo(f"\n{len(rows)} pairs ({len(chosen)} encoders x {len(rows) // max(len(chosen) * len(variants), 1)} "
               f"protocols x {len(variants)} variant(s)): {len(rows) - len(failed)} ok, {len(failed)} failed")
    if failed:
        for row in failed:
            click.echo(f"failed: {row.variant}: {row.problem}", err=True)
        sys.exit(1)


# --------------------------------------------------------------------------- demo

@main.group()
def demo() -> None:
    """The synthetic demo cohort, the default data when no data root is configured."""


@demo.command("build")
@click.option("--out", type=click.Path(path_type=Path), help="Target folder (default: the cache folder).")
@click.option("--force", is_flag=True, help="Build again even if a complete cohort is there.")
@friendly
def demo_build(out: Path | None, force: bool) -> None:
    """Generate the demo cohort (deterministic; every protocol's data at 64x64x32)."""
    import time

    from .data.demo import build_demo, default_demo_root

    start = time.perf_counter()
    root = build_demo(out or default_demo_root(), force=force)
    marker = json.loads((root / "demo.json").read_text())
    rows = [{"dataset": d, "table": t, "rows": n} for d, tables in marker["datasets"].items() for t, n in tables.items()]
    click.echo(_table(rows, ["dataset", "table", "rows"]))
    click.echo(f"\ndemo cohort (generator v{marker['generator_version']}) at {root} "
               f"[{time.perf_counter() - start:.1f} s]")


# --------------------------------------------------------------------------- splits

@main.group()
def splits() -> None:
    """Patient-grouped splits and nested label regimes, written as hashed JSON files."""


@splits.command("make")
@click.argument("tasks", nargs=-1)
@click.option("--data-root", type=click.Path(path_type=Path), help="Prepared data root (default: $ASAP_BENCH_DATA or the demo cohort).")
@click.option("--splits-dir", type=click.Path(path_type=Path), help="Where split files go (default: <data-root>/_splits).")
@click.option("--seeds", type=int, help="Number of seeds (default: each protocol's own, 5).")
@click.option("--force", is_flag=True, help="Remake split files made from other inputs.")
@friendly
def splits_make(tasks: tuple[str, ...], data_root: Path | None, splits_dir: Path | None,
                seeds: int | None, force: bool) -> None:
    """Make (or reuse) the split files of TASKS (ids, a family, a glob or 'all')."""
    from .data.manifest import load_manifest
    from .data.roots import default_splits_dir, resolve_data_root
    from .protocol import select_protocols
    from .splits import ensure_split

    root = resolve_data_root(data_root)
    directory = splits_dir or default_splits_dir(root)
    rows, failures = [], 0
    for protocol in select_protocols(tasks):
        try:
            manifest = load_manifest(root, protocol.data.dataset, protocol.data.table)
            for seed in range(seeds or protocol.seeds):
                split = ensure_split(manifest, protocol, seed, directory, force=force)
                sizes = "/".join(str(len(split.regimes[r])) for r in split.regimes)
                rows.append({"task": protocol.id, "seed": seed, "train": len(split.train), "val": len(split.val),
                             "test": len(split.test), "regimes": sizes or "-", "sha256": split.sha256[:12]})
        except _user_errors() as err:
            failures += 1
            rows.append({"task": protocol.id, "seed": "-", "train": "FAILED", "val": str(err).splitlines()[0]})
    click.echo(_table(rows, ["task", "seed", "train", "val", "test", "regimes", "sha256"]))
    click.echo(f"\nsplit files under {directory}")
    if failures:
        raise click.ClickException(f"{failures} task(s) failed")


# --------------------------------------------------------------------------- submit, leaderboard

def _register_submission_commands() -> None:
    from .cli_submit import leaderboard, submit

    main.add_command(submit)
    main.add_command(leaderboard)


_register_submission_commands()
