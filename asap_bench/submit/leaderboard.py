"""The leaderboard: verified bundles merged under ``results/leaderboard``, ranked with the statistics module.

Layout (one board for demo-cohort results, one for real data; they never mix)::

    results/leaderboard/<demo|real>/records/<encoder>/<family>__<task>/r<ratio>_s<seed>.json (+ units)
    results/leaderboard/<demo|real>/entries/<encoder>/   bundle.json, card.yaml, load_report.json,
                                                         manifest.json, added.json

``records/`` is an ordinary record folder: ``asap-bench report --records
results/leaderboard/demo/records`` renders it. Joining a board also requires
the bundle to have run on the same data as the encoders already there: the same
data fingerprint and the same split files for every protocol they share.

Only verified files are copied: each record and its sidecar, and the bundle's
metadata, read without following links, hashed again against the manifest as
they are read, and written only to paths inside the board.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from ..results.record import now, read_record, write_atomic
from ..results.store import UNITS_SUFFIX, load_records
from .bundle import CARD, INFO, LOAD_REPORT, MANIFEST, RECORDS, BundleError, UnsafeFile, read_bytes
from .rerun import RerunOptions, verify_rerun
from .verify import Allowance, VerifiedBundle, verify_bundle

DEFAULT_ROOT = Path("results") / "leaderboard"
ENTRIES = "entries"


def board_dir(root: Path, synthetic: bool) -> Path:
    return Path(root) / ("demo" if synthetic else "real")


def entries(board: Path) -> dict[str, dict]:
    """The encoders on a board, with what ``added.json`` says about each."""
    folder = board / ENTRIES
    out = {}
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        added = entry / "added.json"
        out[entry.name] = json.loads(added.read_text(encoding="utf-8")) if added.is_file() else {}
    return out


def _shared_data(board: Path, bundle: VerifiedBundle) -> list[str]:
    """Problems where the bundle ran a protocol on other data or other splits than the board's encoders."""
    seen: dict[tuple, tuple[str, str]] = {}  # (protocol fingerprint, what) -> (value, where)
    records = board / RECORDS
    for path in sorted(records.rglob("*.json")) if records.is_dir() else []:
        if path.name.endswith(UNITS_SUFFIX) or path.relative_to(records).parts[0] == bundle.info.encoder:
            continue
        prov = read_record(path).provenance
        seen.setdefault((prov.protocol_fingerprint, "data_fingerprint"), (prov.data_fingerprint, str(path)))
        if prov.target_data_fingerprint:
            seen.setdefault((prov.protocol_fingerprint, "target_data_fingerprint"),
                            (prov.target_data_fingerprint, str(path)))
        seen.setdefault((prov.protocol_fingerprint, f"split_sha256 seed {path.stem.rsplit('_s', 1)[-1]}"),
                        (prov.split_sha256, str(path)))
    problems = []
    for rel, record in sorted(bundle.records.items()):
        prov = record.provenance
        for what, value in (("data_fingerprint", prov.data_fingerprint),
                            ("target_data_fingerprint", prov.target_data_fingerprint),
                            (f"split_sha256 seed {record.seed}", prov.split_sha256)):
            other = seen.get((prov.protocol_fingerprint, what))
            if other is not None and value is not None and other[0] != value:
                problems.append(f"{bundle.folder / rel}: field 'provenance.{what.split()[0]}': {str(value)[:12]} "
                                f"differs from the board's {str(other[0])[:12]} ({other[1]}); results on other data "
                                "or splits cannot be ranked together")
    return problems


def _copy_plan(verified: VerifiedBundle) -> dict[str, str]:
    """Bundle file -> its place under the incoming folder: the job matrix's records and sidecars, and metadata."""
    plan = {}
    for rel, record in verified.records.items():  # records/<encoder>/<family>__<task>/<file>
        task = PurePosixPath(rel).parent
        for file in [PurePosixPath(rel).name] + ([record.units_file] if record.units_file else []):
            plan[str(task / file)] = f"{RECORDS}/{task.name}/{file}"
    for name in (INFO, CARD, LOAD_REPORT, MANIFEST):
        if name in verified.files or name == MANIFEST:
            plan[name] = f"{ENTRIES}/{name}"
    return plan


def _copy_verified(verified: VerifiedBundle, name: str, dest: Path, board: Path) -> None:
    """Copy one bundle file, read without following links and checked against its sealed hash, into the board."""
    source = verified.folder / name
    try:
        data = read_bytes(source)
    except UnsafeFile as err:
        raise BundleError(verified.folder, [str(err)]) from None
    digest = verified.files.get(name)
    if name != MANIFEST and hashlib.sha256(data).hexdigest() != digest:
        raise BundleError(verified.folder, [f"{source}: changed while the bundle was being added; add it again"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    real_board, real_dest = os.path.realpath(board), os.path.realpath(dest.parent)
    if os.path.commonpath([real_board, real_dest]) != real_board:
        raise BundleError(verified.folder, [f"{dest}: outside the board {board}; nothing is written there"])
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def add(bundle: str | Path, *, root: str | Path = DEFAULT_ROOT, allow: Iterable[str] = (),
        replace: bool = False, rerun: RerunOptions | None = None,
        echo: Callable[[str], None] = print) -> tuple[VerifiedBundle, Path]:
    """Verify ``bundle`` (and, with ``rerun``, rerun some of its jobs) and merge it into the board.

    Returns (the verified bundle, the board folder).
    """
    verified = verify_bundle(bundle, [Allowance.parse(a) for a in allow])
    name = verified.info.encoder
    board = board_dir(Path(root), verified.info.synthetic)
    entry, records = board / ENTRIES / name, board / RECORDS / name
    if (entry.exists() or records.exists()) and not replace:
        when = entries(board).get(name, {}).get("added", "earlier")
        raise BundleError(bundle, [f"{entry}: encoder {name!r} is already on the leaderboard (added {when}); "
                                   "give the encoder another name, or pass --replace to replace its results"])
    problems = _shared_data(board, verified)
    if problems:
        raise BundleError(bundle, problems)
    if rerun is not None:
        problems = verify_rerun(verified, rerun, echo)
        if problems:
            raise BundleError(bundle, problems)

    incoming = board / f".incoming-{name}-{os.getpid()}"
    shutil.rmtree(incoming, ignore_errors=True)
    try:
        for source, dest in sorted(_copy_plan(verified).items()):
            _copy_verified(verified, source, incoming / dest, board)
        (incoming / RECORDS).mkdir(parents=True, exist_ok=True)
        write_atomic(incoming / ENTRIES / "added.json", json.dumps(
            {"added": now(), "bundle": Path(bundle).resolve().name, "records": len(verified.records),
             "older_protocol_versions": verified.older}, indent=1) + "\n")
        for old in (entry, records):  # --replace: the entry goes first, so a crash never leaves a stale entry
            shutil.rmtree(old, ignore_errors=True)
        records.parent.mkdir(parents=True, exist_ok=True)
        entry.parent.mkdir(parents=True, exist_ok=True)
        os.replace(incoming / RECORDS, records)
        os.replace(incoming / ENTRIES, entry)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return verified, board


# --------------------------------------------------------------------------- show

def board_frame(board: Path) -> pd.DataFrame:
    """The board's records as a frame; a protocol run under an older version becomes its own setting."""
    from ..protocol import shipped_protocols

    records = board / RECORDS
    if not records.is_dir():
        raise FileNotFoundError(f"no leaderboard at {board} (add a bundle with `asap-bench leaderboard add`)")
    frame = load_records(records, strict=True)
    if frame.empty:
        raise ValueError(f"the leaderboard at {board} holds no records")
    current = {pid: p.fingerprint for pid, p in shipped_protocols().items()}
    versions: dict[str, int] = {}
    for name in entries(board):
        info = json.loads((board / ENTRIES / name / INFO).read_text(encoding="utf-8"))
        versions.update({e["fingerprint"]: e["version"] for e in info.get("protocols", {}).values()})
    older = [fp != current.get(pid) for pid, fp in zip(frame["protocol"], frame["protocol_fingerprint"])]
    frame.loc[older, "protocol"] = [f"{pid}@v{versions.get(fp, '?')}-{fp[:8]}" for pid, fp in
                                    zip(frame.loc[older, "protocol"], frame.loc[older, "protocol_fingerprint"])]
    return frame


def _primary(frame: pd.DataFrame) -> pd.DataFrame:
    from ..protocol import shipped_protocols

    protocols = shipped_protocols()
    demo = [isinstance(s, (bool, np.bool_)) and bool(s) for s in frame["synthetic"]]
    primary = [protocols[p.split("@")[0]].primary(d) if p.split("@")[0] in protocols else None
               for p, d in zip(frame["protocol"], demo)]
    return frame[frame["metric"] == pd.Series(primary, index=frame.index)]


def standings(board: Path, *, alpha: float = 0.05, family: str | None = None,
              n_boot: int = 2000) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ranking, per-setting comparisons, primary-metric records) of a board.

    Settings are (protocol, regime) on each protocol's primary metric. The ranking
    holds the mean rank over the settings every encoder has (``stats.mean_ranks``)
    and, from ``stats.best_other`` with Holm's correction over all settings, how
    often each encoder is the best, significantly so, or significantly behind the best.
    """
    from .. import stats

    frame = _primary(board_frame(board))
    if family:
        frame = frame[frame["family"].isin([f.strip() for f in family.split(",")])]
    frame = frame[frame["status"] == "ok"]
    if frame.empty:
        raise ValueError(f"no successful records on the leaderboard at {board} for these filters")
    encoders = sorted(frame["encoder"].unique())
    ranks = stats.mean_ranks(frame) if len(encoders) > 1 else pd.Series({encoders[0]: 1.0})
    sig = stats.best_other(frame, alpha=alpha, n_boot=n_boot)
    agg = stats.aggregate(frame)
    rows = []
    for encoder in encoders:
        mine = sig[sig["encoder"] == encoder] if len(sig) else sig
        best = mine[mine["better"].astype(bool)] if len(mine) else mine
        rows.append({"encoder": encoder,
                     "mean_rank": float(ranks.get(encoder, math.nan)),
                     "settings": int((agg["encoder"] == encoder).sum()),
                     "best": int(len(best)),
                     "best_sig": int(best["significant"].astype(bool).sum()) if len(best) else 0,
                     "behind_sig": int((~mine["better"].astype(bool) & mine["significant"].astype(bool)).sum())
                     if len(mine) else 0})
    ranking = pd.DataFrame(rows).sort_values(["mean_rank", "encoder"], na_position="last").reset_index(drop=True)
    ranking.insert(0, "rank", np.arange(1, len(ranking) + 1))
    return ranking, sig, frame


def render_standings(board: Path, ranking: pd.DataFrame, sig: pd.DataFrame, frame: pd.DataFrame,
                     alpha: float = 0.05) -> str:
    """The ranking table, then the paper-style per-setting tables (markdown, daggers from the same tests)."""
    from ..cli import _table
    from ..report.tables import render
    from ..stats import aggregate

    shown = ranking.assign(mean_rank=ranking["mean_rank"].map(lambda v: "-" if math.isnan(v) else f"{v:.2f}"))
    correction = (sig["correction"].iloc[0] if len(sig) and "correction" in sig
                  else "no setting holds two encoders, no tests")
    lines = [f"leaderboard {board} ({len(ranking)} encoders, {frame.groupby(['protocol', 'regime']).ngroups} "
             f"settings: each protocol's primary metric per regime)", "",
             _table(shown.to_dict("records"), list(shown.columns)), "",
             "mean_rank: mean over the settings every encoder has (1 = best); best: settings with the highest mean; "
             f"best_sig / behind_sig: better than the runner-up / worse than the best, p < {alpha:g} after Holm "
             f"({correction}), paired per setting at the finest unit (stats.best_other).", ""]
    aggregated = aggregate(frame).assign(source=lambda d: ["demo" if s else "runs" for s in d["synthetic"]])
    dagger = sig[sig["better"].astype(bool)] if len(sig) else None
    lines.append(render(aggregated, "markdown", dagger, metric="all", alpha=alpha))
    return "\n".join(lines)
