"""Whether a bundle can join the leaderboard: sealed, complete, current, and internally consistent.

Every reason a bundle is refused names the file and the field. The checks, in order:
the manifest (schema version, every file's sha256, nothing added); ``bundle.json``
and ``card.yaml`` against their schemas and hashes; the protocols' fingerprints
against the current protocols (an older version only where explicitly allowed);
every record against the ResultRecord schema and the bundle's own declarations
(encoder, checkpoint, variant, data); every metric against what its units sidecar
recomputes; and every seed of every (protocol, regime) present. Before any of it,
the bundle must hold only regular files and folders within the size limits
(``bundle.scan_bundle``). A built-in encoder's name is taken only with the
shipped card, and ``load_report.json`` must say what ``bundle.json`` says.

All this proves the bundle is intact and self-consistent, not that its numbers
came from its checkpoint: ``rerun.verify_rerun`` checks that.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pydantic import ValidationError

from ..encoders.card import EncoderCard, encoder_names, load_encoder_card
from ..protocol import Protocol
from ..results.record import ResultRecord
from ..results.recompute import recompute
from ..results.store import UNITS_SUFFIX
from ..schema import SchemaError, content_hash, load_model
from .bundle import (CARD, INFO, LOAD_REPORT, RECORDS, BundleError, BundleInfo, UnsafeFile, check_manifest, read_text,
                     scan_bundle, sha256_of)

RECOMPUTABLE = ("binary", "multilabel", "multiclass", "survival")  # unit layouts results.recompute reads
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Allowance:
    """``--allow-protocol-version ID@VERSION`` or ``ID@FINGERPRINT`` (a prefix of at least 8 hex digits)."""

    protocol: str
    version: int | None = None
    fingerprint: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Allowance":
        pid, sep, what = text.strip().partition("@")
        if not sep or not pid or not what:
            raise ValueError(f"--allow-protocol-version {text!r}: expected ID@VERSION (cls/stoic@1) or "
                             "ID@FINGERPRINT (cls/stoic@58688adb)")
        what = what.lstrip("v")
        if what.isdigit():
            return cls(pid, version=int(what))
        if re.fullmatch(r"[0-9a-f]{8,64}", what):
            return cls(pid, fingerprint=what)
        raise ValueError(f"--allow-protocol-version {text!r}: {what!r} is neither a version number nor a "
                         "fingerprint prefix of at least 8 hex digits")

    def allows(self, protocol: str, version: int, fingerprint: str) -> bool:
        return protocol == self.protocol and (self.version == version if self.version is not None
                                              else fingerprint.startswith(self.fingerprint or "-"))


@dataclass
class VerifiedBundle:
    folder: Path
    info: BundleInfo
    card: EncoderCard
    records: dict[str, ResultRecord]  # relative path -> record
    files: dict[str, str] = field(default_factory=dict)  # manifest: relative path -> sha256
    jobs: dict[str, tuple[str, float, int]] = field(default_factory=dict)  # record path -> (protocol, ratio, seed)
    older: dict[str, str] = field(default_factory=dict)  # protocol -> "version N (fingerprint)" accepted as older
    recomputed: int = 0  # records whose metrics were recomputed from their units
    not_recomputable: int = 0


def _schema_problems(path: Path, err: ValidationError | SchemaError) -> list[str]:
    if isinstance(err, SchemaError):
        return [f"{path}: field '{f}': {m}" for f, m in err.problems]
    return [f"{path}: field '{'.'.join(map(str, e['loc'])) or '<root>'}': {e['msg']}" for e in err.errors()]


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def _check_units(path: Path, record: ResultRecord, files: dict[str, int], folder: Path) -> tuple[list[str], bool]:
    """(problems, recomputed): the sidecar exists, and every metric equals what it recomputes to."""
    if record.units_file is None:
        return [], False
    sidecar = path.parent / record.units_file
    if record.units_file != path.stem + UNITS_SUFFIX or sidecar.relative_to(folder).as_posix() not in files:
        return [f"{path}: field 'units_file': {record.units_file!r} is not this record's sidecar "
                f"{path.stem + UNITS_SUFFIX!r} in the bundle"], False
    if record.units_sha256 is not None and record.units_sha256 != sha256_of(sidecar):
        return [f"{path}: field 'units_sha256' does not match {sidecar.name}"], False
    try:
        units = json.loads(read_text(sidecar))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"{sidecar}: not valid JSON ({err})"], False
    if not isinstance(units, dict) or units.get("task") not in RECOMPUTABLE:
        return [], False
    try:
        again = recompute(units, list(record.metrics))
    except Exception as err:  # units that do not hold what their task says
        return [f"{sidecar}: its units cannot be scored ({type(err).__name__}: {err})"], False
    problems = [f"{path}: field 'metrics.{name}': {value!r} does not match {again.get(name)!r} recomputed from "
                f"{sidecar.name}" for name, value in sorted(record.metrics.items())
                if not _close(value, again.get(name))]
    return problems, True


def _builtin_problems(folder: Path, name: str, card: EncoderCard, info: BundleInfo) -> list[str]:
    """A built-in encoder's name is the shipped card's (and its pinned weights', where the card pins them)."""
    if name not in encoder_names():
        return []
    shipped = load_encoder_card(name)
    if content_hash(card.model_dump(mode="json")) != content_hash(shipped.model_dump(mode="json")):
        return [f"{folder / CARD}: {name!r} is a built-in encoder's name and this card differs from the shipped "
                f"baselines/{name}.yaml; a modified card needs a name of its own"]
    pinned = shipped.checkpoint.sha256
    got = info.checkpoint.sha256 if info.checkpoint else None
    if pinned and got != pinned:
        return [f"{folder / INFO}: field 'checkpoint.sha256': {str(got)[:12]}..., but the built-in {name!r} pins "
                f"its weights to {pinned[:12]}... (baselines/{name}.yaml); other weights need a name of their own"]
    return []


_REPORT_LISTS = ("loaded", "missing", "unexpected", "ignored", "adapted")


def _load_report_problems(folder: Path, info: BundleInfo, files: dict[str, int]) -> list[str]:
    """``load_report.json`` says what ``bundle.json``'s checkpoint block says: file, sha256, fraction, key counts."""
    path, declared = folder / LOAD_REPORT, info.checkpoint
    if LOAD_REPORT not in files:
        return [f"{path}: missing; {INFO} declares a checkpoint, whose key coverage it must hold"] if declared else []
    try:
        report = json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"{path}: not valid JSON ({err})"]
    if declared is None:
        return [] if report is None else [f"{path}: a checkpoint's report, but {INFO} declares no checkpoint "
                                          "(field 'checkpoint': null)"]
    if not isinstance(report, dict):
        return [f"{path}: expected the checkpoint's load report (a mapping), got {type(report).__name__}"]
    problems = []
    for name in _REPORT_LISTS:
        keys = report.get(name)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            problems.append(f"{path}: field '{name}': expected a list of key names")
        elif len(keys) != getattr(declared, name):
            problems.append(f"{path}: field '{name}': {len(keys)} key(s), but {INFO} field 'checkpoint.{name}' "
                            f"says {getattr(declared, name)}")
    fraction = report.get("fraction")
    if not isinstance(fraction, (int, float)) or not math.isclose(fraction, declared.fraction, abs_tol=TOLERANCE):
        problems.append(f"{path}: field 'fraction': {fraction!r}, but {INFO} field 'checkpoint.fraction' says "
                        f"{declared.fraction!r}")
    for name, want in (("sha256", declared.sha256), ("path", declared.file)):
        got = report.get(name)
        if got != want:
            shown = (str(got)[:12] + "...", want[:12] + "...") if name == "sha256" else (repr(got), repr(want))
            problems.append(f"{path}: field '{name}': {shown[0]}, but {INFO} field "
                            f"'checkpoint.{'file' if name == 'path' else name}' says {shown[1]}")
    return problems


def _stray_records(folder: Path, files: dict[str, int], expected: dict[str, tuple]) -> list[str]:
    """Files under ``records/`` that are neither a record of the job matrix nor its units sidecar."""
    def known(name: str) -> bool:
        return name in expected or (name.endswith(UNITS_SUFFIX) and name[: -len(UNITS_SUFFIX)] + ".json" in expected)
    return [f"{folder / name}: not part of the bundle's job matrix ({INFO} field 'protocols')"
            for name in sorted(files) if name.startswith(f"{RECORDS}/") and not known(name)]


def _record_problems(path: Path, record: ResultRecord, info: BundleInfo, pid: str, ratio: float,
                     seed: int) -> list[str]:
    """Where one record disagrees with what the bundle declares: encoder, job, checkpoint, variant, data."""
    problems: list[str] = []
    prov, entry = record.provenance, info.protocols[pid]
    checks = [
        ("encoder", record.encoder, info.encoder),
        ("protocol", record.protocol, pid),
        ("seed", record.seed, seed),
        ("status", record.status, "ok"),
        ("provenance.encoder", prov.encoder, info.encoder),
        ("provenance.encoder_variant", prov.encoder_variant, info.variant),
        ("provenance.protocol_fingerprint", prov.protocol_fingerprint, entry.fingerprint),
        ("provenance.protocol_version", prov.protocol_version, entry.version),
        ("provenance.checkpoint_sha256", prov.checkpoint_sha256,
         info.checkpoint.sha256 if info.checkpoint else None),
        ("provenance.synthetic", prov.synthetic, info.synthetic),
    ]
    data = info.data.get(f"{prov.dataset}/{prov.table}")
    checks.append(("provenance.data_fingerprint", prov.data_fingerprint, data.data_fingerprint if data else None))
    for name, got, want in checks:
        if got != want:
            extra = f" ({record.error.splitlines()[0][:160]})" if name == "status" and record.error else ""
            problems.append(f"{path}: field '{name}': {got!r}, expected {want!r}{extra}")
    if not math.isclose(record.regime, ratio, abs_tol=1e-12):
        problems.append(f"{path}: field 'regime': {record.regime!r}, expected {ratio!r}")
    return problems


def verify_bundle(folder: str | Path, allow: Iterable[Allowance] = (),
                  protocols: dict[str, Protocol] | None = None) -> VerifiedBundle:
    """Check everything a bundle claims; raise BundleError listing every problem, or return the verified bundle."""
    from ..protocol import shipped_protocols

    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(folder, [f"{folder}: no such bundle folder"])
    current = protocols if protocols is not None else shipped_protocols()
    allow = list(allow)
    scan = scan_bundle(folder)
    if scan.problems:  # links and special files: refused before any file of the bundle is opened
        raise BundleError(folder, scan.problems)
    files = scan.files
    manifest, problems = check_manifest(folder, files)
    if manifest is None:  # without a readable manifest of a known version nothing else can be trusted
        raise BundleError(folder, problems)
    for name in (INFO, CARD):
        if name not in files:
            raise BundleError(folder, problems + [f"{folder / name}: missing"])

    try:
        info = BundleInfo.model_validate_json(read_text(folder / INFO))
    except ValidationError as err:
        raise BundleError(folder, problems + _schema_problems(folder / INFO, err)) from None
    except UnicodeDecodeError as err:
        raise BundleError(folder, problems + [f"{folder / INFO}: not a text file ({err})"]) from None
    try:
        card = load_model(EncoderCard, folder / CARD)
    except SchemaError as err:
        raise BundleError(folder, problems + _schema_problems(folder / CARD, err)) from None

    where = folder / INFO
    if card.name != info.encoder:
        problems.append(f"{folder / CARD}: field 'name': {card.name!r}, but {INFO} is for encoder {info.encoder!r}")
    if sha256_of(folder / CARD) != info.card_sha256:
        problems.append(f"{where}: field 'card_sha256' does not match {CARD}")
    if content_hash(card.model_dump(mode="json")) != info.card_fingerprint:
        problems.append(f"{where}: field 'card_fingerprint' does not match the card in {CARD}")
    if info.smoke:
        problems.append(f"{where}: field 'smoke': true; a --smoke bundle checks a card and is never a submission "
                        "(run asap-bench submit without --smoke)")
    if info.jobs.get("failed"):
        problems.append(f"{where}: field 'jobs.failed': {info.jobs['failed']} job(s) failed; rerun the same submit "
                        "command into this folder to complete them")

    problems += _builtin_problems(folder, info.encoder, card, info)
    problems += _load_report_problems(folder, info, files)

    verified = VerifiedBundle(folder, info, card, {}, files=dict(manifest["files"]))
    for pid, entry in sorted(info.protocols.items()):
        field_name = f"{where}: field 'protocols.{pid}"
        if pid not in current:
            problems.append(f"{field_name}': protocol {pid!r} is not one of this asap-bench's protocols")
            continue
        now = current[pid]
        if not info.synthetic and entry.status == "ran" and not set(range(now.seeds)) <= set(entry.seeds):
            problems.append(f"{field_name}.seeds': {entry.seeds}, but {pid} asks for seeds 0..{now.seeds - 1}; "
                            "the real-data leaderboard takes every seed of a protocol")
        if entry.fingerprint == now.fingerprint:
            continue
        if any(a.allows(pid, entry.version, entry.fingerprint) for a in allow):
            verified.older[pid] = f"version {entry.version} ({entry.fingerprint[:12]})"
            continue
        problems.append(f"{field_name}.fingerprint': {pid} was run under version {entry.version} (fingerprint "
                        f"{entry.fingerprint[:12]}), but the current protocol is version {now.version} (fingerprint "
                        f"{now.fingerprint[:12]}); rerun it, or pass --allow-protocol-version {pid}@{entry.version} "
                        "to add it as a result of that older version")

    expected: dict[str, tuple[str, float, int]] = {}
    for pid, entry in info.protocols.items():
        if entry.status == "ran":
            slug = pid.replace("/", "__")
            for ratio in entry.regimes:
                for seed in entry.seeds:
                    expected[f"{RECORDS}/{info.encoder}/{slug}/r{float(ratio)!r}_s{seed}.json"] = (pid, ratio, seed)
    ran = [pid for pid, e in info.protocols.items() if e.status == "ran"]
    if not ran:
        problems.append(f"{where}: field 'protocols': no protocol ran (all skipped); there is nothing to add")

    problems += _stray_records(folder, files, expected)
    verified.jobs = {rel: job for rel, job in expected.items() if rel in files}
    for rel, (pid, ratio, seed) in sorted(verified.jobs.items()):
        path = folder / rel
        try:
            record = ResultRecord.model_validate_json(read_text(path))
        except ValidationError as err:
            problems += _schema_problems(path, err)
            continue
        except UnicodeDecodeError as err:
            problems.append(f"{path}: not a text file ({err})")
            continue
        except UnsafeFile as err:  # replaced by a link or a special file since the scan
            problems.append(str(err))
            continue
        verified.records[rel] = record
        problems += _record_problems(path, record, info, pid, ratio, seed)
        if record.status == "ok":
            unit_problems, recomputed = _check_units(path, record, files, folder)
            problems += unit_problems
            verified.recomputed += recomputed
            verified.not_recomputable += not recomputed
    for rel, (pid, ratio, seed) in sorted(expected.items()):
        if rel not in files:
            problems.append(f"{folder / rel}: missing: {pid} regime {ratio:g} seed {seed} is in the job matrix "
                            f"({INFO} fields 'protocols.{pid}.regimes' and '.seeds'); every seed must be present")
    if problems:
        raise BundleError(folder, problems)
    return verified
