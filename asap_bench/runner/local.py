"""Running jobs in this process: shared preparation once, then each job, each recorded.

Work is grouped by (encoder, protocol). A group first does the cheap part
(manifest, input spec, fingerprints, split files) so that finished jobs are
recognised without loading a model; only if a job is left does it build the
encoder and extract frozen features (global, and patch tokens for families
that read them), which the feature cache then serves to every seed, regime and
protocol on the same data. Fine-tuning families get the encoder itself, fresh
per job, and a per-job work folder for resumable training state. Every job ends
as a record, ok or failed; a failure never stops the other jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.cache import (TOKENS_FULL, FeatureSet, VolumeCache, blocks, cache_root, create_feature_file,
                          extract_into, feature_key, finish_features, open_features, pool_tokens, remove_abandoned,
                          unique_images)
from ..data.manifest import Manifest, data_fingerprint, file_sha256, files_identity, load_manifest
from ..data.roots import default_splits_dir
from ..data.transforms import input_for
from ..encoders.base import Encoder, encoder_fingerprint, frozen_forward
from ..encoders.card import EncoderCard, InputSpec
from ..encoders.checkpoints import DEFAULT_MIN_FRACTION, CheckpointError, resolve_checkpoint
from ..encoders.fit import EffectiveInput, fit_input
from ..encoders.registry import family_class, get_card
from ..protocol import Protocol
from ..results.record import Provenance, ResultRecord, Timing, now, software, write_record
from ..schema import content_hash
from ..splits import Split, ensure_split
from ..tasks.base import CheckpointRef, EncoderHandle, FamilyNotBuilt, TaskFamily, TaskInputs, get_family
from . import distributed
from .jobs import Job, existing, is_done, job_key, job_lock, sweep_locks

CODE_VERSION = "2"  # bump when a change to the runner or a family alters results


@dataclass
class RunOptions:
    data_root: Path
    out: Path
    device: str = "cpu"
    variant: str = "native"  # encoder size: "native", or "demo" on the demo cohort
    checkpoint: Path | None = None
    force: bool = False
    batch_size: int = 2
    interpolate_pos: bool = False
    min_fraction: float = DEFAULT_MIN_FRACTION
    splits_dir: Path | None = None
    cache_dir: Path | None = None
    progress: bool = True


@dataclass
class Outcome:
    job: Job
    status: str  # ok | cached | failed | skipped
    metric: float | None = None
    seconds: float = 0.0
    message: str = ""
    primary: str | None = None  # the metric ``metric`` is: the protocol's primary one for the data it ran on


def _primary(job: Job, group: Group, metrics: dict[str, float | None] | None) -> dict[str, Any]:
    """An outcome's metric and its name: on the demo cohort the protocol's demo primary metric."""
    name = job.protocol.primary(group.manifest.synthetic)
    return {"metric": metrics.get(name) if metrics else None, "primary": name}


def seed_everything(seed: int) -> None:
    """Same seed, same numbers: every source of randomness a family may touch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def effective_input(protocol: Protocol, card: EncoderCard, variant: str) -> EffectiveInput:
    """What this encoder is fed under this protocol, and the architecture that takes it (``encoders.fit``).

    A reduced variant keeps its own size, unresampled, and sees the whole (demo) volume scaled
    to it: a centre crop to a CPU-sized input would cut most of the synthetic anatomy away.
    The card's ``paper_input.fit``
    makes a paper input tile into the encoder's patches (pad, crop or a patch-embedding
    rebuild); a pair that still does not fit carries its problem lines.
    """
    spec = input_for(protocol.preprocessing, card.input)
    if variant != "native":
        arch = card.architecture_for(variant)
        by_axis = dict(zip(card.input.axis_order, arch["img_size"]))
        spec = spec.model_copy(update={"size": tuple(int(by_axis[a]) for a in "HWD"), "spacing": None,
                                       "resize": "resize"})
    return fit_input(card, variant, spec, paper=protocol.preprocessing.input == "paper",
                     where=f"{card.name} {protocol.id}")


class InputMismatch(ValueError):
    """(Encoder, protocol) pairs whose input the encoder cannot take: the run is refused before any job starts."""


def loads_checkpoint(card: EncoderCard, options: RunOptions) -> bool:
    return card.checkpoint.availability != "none" or options.checkpoint is not None


def input_problems(jobs: list[Job], options: RunOptions) -> list[str]:
    """One line per (encoder, protocol) whose effective input cannot run, from the cards alone (no model)."""
    problems: list[str] = []
    pairs = {(job.encoder, job.protocol.id): job.protocol for job in jobs}
    for (encoder, _), protocol in pairs.items():
        try:
            card = get_card(encoder)
            effective = effective_input(protocol, card, options.variant)
        except Exception:  # an unknown name or a broken card fails its group with its own message
            continue
        problems += effective.problems
        position = effective.position_problem(loads_checkpoint(card, options), options.interpolate_pos)
        if position and not effective.problems:
            problems.append(f"{encoder} {protocol.id}: {position}")
    return problems


def check_inputs(jobs: list[Job], options: RunOptions) -> None:
    """Refuse the run, naming every bad pair, when an encoder cannot take a protocol's input."""
    problems = input_problems(jobs, options)
    if problems:
        raise InputMismatch(f"{len(problems)} encoder/protocol pair(s) cannot run; nothing was started:\n  "
                            + "\n  ".join(problems))


class TargetUnavailable(LookupError):
    """An external-validation target that is private or not prepared: reported, not an error."""


@dataclass
class EncoderEntry:
    card: EncoderCard
    fingerprint: str
    checkpoint: Path | None
    checkpoint_sha256: str | None
    module: Encoder | None = None
    variant: str = "native"  # the size variant the module is built as (a '-fit' one when the input changed it)


@dataclass
class Group:
    """The shared state of one (encoder, protocol): data, input, fingerprints, splits, features."""

    encoder: EncoderEntry
    protocol: Protocol
    family: TaskFamily
    manifest: Manifest
    spec: InputSpec
    data_fp: str
    input_fit: str = ""  # how the input was fitted to the encoder (``EffectiveInput.provenance``)
    target: Manifest | None = None
    target_fp: str | None = None
    files_id: str | None = None  # identity of every input file read (source and target), for the job key
    splits: dict[int, Split] = field(default_factory=dict)
    features: FeatureSet | None = None
    target_features: FeatureSet | None = None


class Session:
    """Memoises what jobs share within one run: encoders, manifests, feature sets."""

    def __init__(self, options: RunOptions, log: logging.Logger):
        self.options, self.log = options, log
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._encoders: dict[tuple[str, tuple], EncoderEntry] = {}
        self._ckpt_sha: dict[Path, str] = {}
        self._data_fp: dict[Path, str] = {}
        self._files_id: dict[Path, str] = {}

    # ---- cheap preparation
    def manifest(self, dataset: str, table: str) -> Manifest:
        if (dataset, table) not in self._manifests:
            self._manifests[(dataset, table)] = load_manifest(self.options.data_root, dataset, table)
        return self._manifests[(dataset, table)]

    def data_fingerprint(self, manifest: Manifest) -> str:
        if manifest.path not in self._data_fp:
            self._data_fp[manifest.path] = data_fingerprint(manifest)
        return self._data_fp[manifest.path]

    def files_identity(self, manifest: Manifest) -> str:
        if manifest.path not in self._files_id:
            self._files_id[manifest.path] = files_identity(manifest)
        return self._files_id[manifest.path]

    def encoder_entry(self, name: str, effective: EffectiveInput) -> EncoderEntry:
        """Card (with the size variant ``effective`` builds), checkpoint and fingerprint; no module yet."""
        if effective.problems:
            raise InputMismatch(effective.problems[0])
        card, variant = effective.card, effective.variant
        key = (name, variant, content_hash(card.sizes.get(variant)))
        if key not in self._encoders:
            path = sha = None
            if loads_checkpoint(card, self.options):
                path = resolve_checkpoint(card, self.options.checkpoint)
                if path not in self._ckpt_sha:
                    self._ckpt_sha[path] = file_sha256(path)
                sha = self._ckpt_sha[path]
            position = effective.position_problem(path is not None, self.options.interpolate_pos)
            if position:
                raise InputMismatch(f"{name}: {position}")
            self._encoders[key] = EncoderEntry(card, encoder_fingerprint(card, variant, sha), path, sha,
                                               variant=variant)
        return self._encoders[key]

    def group(self, encoder: str, protocol: Protocol, family: TaskFamily) -> Group:
        manifest = self.manifest(protocol.data.dataset, protocol.data.table)
        effective = effective_input(protocol, get_card(encoder), self.options.variant)
        entry = self.encoder_entry(encoder, effective)
        group = Group(entry, protocol, family, manifest, effective.spec, self.data_fingerprint(manifest),
                      input_fit=effective.provenance(entry.checkpoint is not None))
        if protocol.transfer is not None:
            target = protocol.transfer.target
            try:
                group.target = self.manifest(target.dataset, target.table)
            except FileNotFoundError:
                from ..data.cards import load_card

                access = load_card(target.dataset).access
                raise TargetUnavailable(f"target unavailable: {target.dataset} ({access}) is not prepared under "
                                        f"{self.options.data_root}") from None
            group.target_fp = self.data_fingerprint(group.target)
        group.files_id = content_hash([self.files_identity(group.manifest),
                                       self.files_identity(group.target) if group.target is not None else None])
        return group

    def split(self, group: Group, seed: int) -> Split:
        if seed not in group.splits:
            directory = self.options.splits_dir or default_splits_dir(self.options.data_root)
            group.splits[seed] = ensure_split(group.manifest, group.protocol, seed, directory)
        return group.splits[seed]

    # ---- heavy preparation
    def build(self, entry: EncoderEntry, seed: int = 0) -> Encoder:
        """A fresh module of ``entry`` with its checkpoint's weights, on the run's device.

        Random-init weights are drawn from ``seed``: 0 for frozen features (the same in
        every run), the job seed for fine-tuning.
        """
        seed_everything(seed)
        module = family_class(entry.card.family)(entry.card, entry.variant)
        if entry.checkpoint is not None:
            from ..encoders.checkpoints import UnreadableCheckpoint, load_weights

            try:
                report = load_weights(module, entry.checkpoint, min_fraction=self.options.min_fraction,
                                      adapt=self.options.interpolate_pos, sha256=entry.checkpoint_sha256)
            except CheckpointError as error:
                if self.options.variant == "native" or isinstance(error, UnreadableCheckpoint):
                    raise
                raise CheckpointError(f"{error}\n(the '{self.options.variant}' variant is a reduced architecture "
                                      "for CPU tests; published weights need --variant native)") from None
            self.log.info("loaded %s", report.summary())
        return module.to(self.options.device)

    def module(self, entry: EncoderEntry) -> Encoder:
        """The frozen module shared by feature extraction, built once per run."""
        if entry.module is None:
            entry.module = self.build(entry).eval()
        return entry.module

    def features(self, group: Group, manifest: Manifest) -> FeatureSet:
        """Frozen features of ``manifest``: a sound cache entry if there is one (a damaged one is named and
        discarded), else extracted into a temp folder that a failure or an interrupt removes."""
        root = self.options.cache_dir or cache_root()
        tokens = None
        if group.family.needs == "tokens":
            tokens = group.family.token_grid(group.protocol) or TOKENS_FULL
        key = distributed.agree(feature_key(group.encoder.fingerprint, group.spec, manifest, tokens))
        folder = root / "features" / key
        found = open_features(folder, manifest) if distributed.rank() == 0 else None
        if distributed.agree(found is not None):
            return found if found is not None else FeatureSet.open(folder, manifest)
        module = self.module(group.encoder)
        volumes = VolumeCache(manifest, group.spec, root)
        name = group.encoder.card.name

        def encode(batch: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
            out = frozen_forward(module, torch.from_numpy(batch))
            features = out.global_embedding.cpu().numpy()
            if tokens is None:
                return features
            if out.patch_tokens is None or out.grid is None:
                raise ValueError(f"encoder {name!r} gives no patch tokens; {group.protocol.id} needs them")
            pooled = pool_tokens(out.patch_tokens, out.grid, tokens)
            return {"global": features, "tokens": pooled.cpu().numpy().astype(np.float16)}

        meta = {"encoder": name, "encoder_fingerprint": group.encoder.fingerprint, "tokens": tokens,
                "dataset": manifest.dataset, "table": manifest.table_name, "manifest_sha256": manifest.sha256,
                "input": group.spec.model_dump(mode="json"), "device": self.options.device}
        images = unique_images(manifest)
        # one temp folder all ranks share (named by rank 0), or a private one in a single process
        tmp = folder.parent / f".{key}.tmp-{distributed.agree(os.getpid())}"
        try:
            if distributed.rank() == 0:
                remove_abandoned(folder)
                token_shape = None
                if tokens is not None:  # one probe forward gives the pooled token shape
                    token_shape = encode(volumes.get(images[0])[None])["tokens"].shape[1:]
                create_feature_file(tmp, len(images), module.embed_dim, token_shape)
            distributed.barrier()
            started = time.perf_counter()
            n_blocks = len(blocks(len(images), self.options.batch_size))
            mine = range(distributed.rank(), n_blocks, distributed.world())
            with _progress(len(images), f"extract {group.encoder.card.name} {manifest.dataset}/{manifest.table_name}",
                           self.options.progress and distributed.rank() == 0) as bar:
                forwards = extract_into(tmp, manifest, encode, volumes, self.options.batch_size, mine, bar.update)
            forwards = distributed.total(forwards)
            distributed.barrier()
            if distributed.rank() == 0:
                finish_features(folder, tmp, images, {**meta, "forward_passes": forwards, "unique_images": len(images),
                                                      "processes": distributed.world(),
                                                      "extract_seconds": round(time.perf_counter() - started, 3)})
        except BaseException:
            # rank 0 named the folder and alone removes it: rows other ranks still write land in an unlinked file
            if distributed.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        distributed.barrier()
        return FeatureSet.open(folder, manifest)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="vol", leave=False)


def _provenance(group: Group | None, job: Job, options: RunOptions, split: Split | None,
                extra: dict[str, Any] | None = None) -> Provenance:
    protocol = job.protocol
    base: dict[str, Any] = {
        "protocol_id": protocol.id, "protocol_version": protocol.version, "protocol_fingerprint": protocol.fingerprint,
        "encoder": job.encoder, "encoder_variant": options.variant, "dataset": protocol.data.dataset,
        "table": protocol.data.table, "software": software(), "device": options.device,
    }
    if group is not None:
        base.update({
            "split_sha256": split.sha256 if split else None, "encoder_fingerprint": group.encoder.fingerprint,
            "checkpoint_sha256": group.encoder.checkpoint_sha256, "manifest_sha256": group.manifest.sha256,
            "data_fingerprint": group.data_fp, "synthetic": group.manifest.synthetic,
            "input_spec": group.spec.model_dump(mode="json"), "input_fit": group.input_fit,
            "feature_key": group.features.key if group.features else None,
        })
        if group.target is not None:
            base.update({"target_dataset": group.target.dataset, "target_data_fingerprint": group.target_fp})
    return Provenance(**{**base, **(extra or {})})


FIT_FIELDS = ("data", "split", "preprocessing", "head")  # what a fine-tuned model depends on besides the job
SHARED_FITS = ".shared-fits"


def fit_key(group: Group, job: Job, split: Split, files: str) -> str:
    """The identity of a fine-tuned model: an ext protocol and its source share it.

    An external validation inherits its source's data, split, preprocessing and head, so
    for the same encoder, regime and seed it would train the very same model again.
    """
    raw = job.protocol.model_dump(mode="json")
    return content_hash({"fit": {f: raw[f] for f in FIT_FIELDS}, "encoder": group.encoder.fingerprint,
                         "split": split.sha256, "data": group.data_fp, "files": files,
                         "input": {**group.spec.model_dump(mode="json"), "fit": group.input_fit},
                         "ratio": repr(float(job.ratio)), "seed": job.seed, "code": CODE_VERSION})


def _fit_partners(jobs: list[Job]) -> set[tuple]:
    """Jobs whose model another job of this run would train again (same encoder, split owner, regime, seed)."""
    count: dict[tuple, int] = {}
    for job in jobs:
        count[_fit_ident(job)] = count.get(_fit_ident(job), 0) + 1
    return {ident for ident, n in count.items() if n > 1}


def _fit_ident(job: Job) -> tuple:
    return job.encoder, job.protocol.split_owner, float(job.ratio), job.seed


def _key(group: Group, job: Job, split: Split) -> str:
    return job_key(job, encoder_fingerprint=group.encoder.fingerprint, split_sha256=split.sha256,
                   data_fingerprint=group.data_fp, target_fingerprint=group.target_fp,
                   input_spec={**group.spec.model_dump(mode="json"), "fit": group.input_fit}, code=CODE_VERSION,
                   files=group.files_id)


def _failed(job: Job, options: RunOptions, group: Group | None, split: Split | None, error: BaseException,
            started: str, t0: float, key: str = "") -> Outcome:
    """Record the failure; beside the job's ok record if it has one, which stays (see ``write_record``)."""
    message = f"{type(error).__name__}: {error}"
    path = job.record_path(options.out)
    record = ResultRecord(job_key=key, encoder=job.encoder, protocol=job.protocol.id, family=job.protocol.family,
                          regime=job.ratio, seed=job.seed, status="failed", error=message,
                          provenance=_provenance(group, job, options, split),
                          timing=Timing(started=started, finished=now(), seconds=round(time.perf_counter() - t0, 3)))
    summary = message.splitlines()[0]
    if _writes_records(group):
        try:
            if write_record(path, record) != path:
                summary = f"rerun failed, the ok record is kept: {summary}"
        except OSError as problem:
            summary = f"{summary}; {_not_written(path, problem)}"
    return Outcome(job, "failed", seconds=time.perf_counter() - t0, message=summary)


def _not_written(path: Path, problem: OSError) -> str:
    return f"record not written: {path}: {problem.strerror or problem}"


def run_jobs(jobs: list[Job], options: RunOptions, log: logging.Logger, dry_run: bool = False) -> list[Outcome]:
    """Run (or, dry, classify) every job; returns one outcome per job, in order.

    Raises ``InputMismatch`` before any job starts when an encoder cannot take a protocol's input.
    """
    check_inputs(jobs, options)
    session = Session(options, log)
    partners = _fit_partners(jobs)
    outcomes: list[Outcome] = []
    seen: dict[Path, ResultRecord | None] = {}  # each job's record when it was found to need a run
    groups: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.encoder, job.protocol.id), []).append(job)
    for (encoder, _), members in groups.items():
        protocol = members[0].protocol
        started, t0 = now(), time.perf_counter()
        try:
            family = get_family(protocol)
        except FamilyNotBuilt as reason:
            outcomes += [Outcome(job, "skipped", message=str(reason)) for job in members]
            continue
        except Exception as error:  # a family (e.g. a plug-in's) that cannot be imported fails its jobs only
            log.error("%s %s: task family cannot be loaded: %s", encoder, protocol.id, error)
            outcomes += [Outcome(job, "failed", message=f"{type(error).__name__}: {error}".splitlines()[0])
                         if dry_run else _failed(job, options, None, None, error, started, t0) for job in members]
            continue
        try:
            group = session.group(encoder, protocol, family)
        except TargetUnavailable as reason:
            outcomes += [Outcome(job, "skipped", message=str(reason)) for job in members]
            continue
        except FileNotFoundError as missing:
            outcomes += [Outcome(job, "skipped", message=f"data not prepared: {str(missing).splitlines()[0]}")
                         for job in members]
            continue
        except Exception as error:  # a card, checkpoint or manifest problem fails this group only
            log.error("%s %s: %s", encoder, protocol.id, error)
            outcomes += [Outcome(job, "failed", message=f"{type(error).__name__}: {error}".splitlines()[0])
                         if dry_run else _failed(job, options, None, None, error, started, t0) for job in members]
            continue
        todo: list[tuple[Job, Split, str]] = []
        for job in members:
            try:
                split = session.split(group, job.seed)
            except Exception as error:
                outcomes.append(_failed(job, options, group, None, error, started, t0) if not dry_run
                                else Outcome(job, "failed", message=str(error).splitlines()[0]))
                continue
            key = _key(group, job, split)
            record = existing(job.record_path(options.out))
            seen[job.record_path(options.out)] = record
            if is_done(job.record_path(options.out), record, key) and not options.force:
                outcomes.append(Outcome(job, "cached", seconds=record.timing.seconds,
                                        **_primary(job, group, record.metrics)))
            else:
                state = "todo" if record is None else ("stale" if record.status == "ok" else "retry")
                todo.append((job, split, key))
                if dry_run:
                    outcomes.append(Outcome(job, state))
        distributed.barrier()  # every rank has decided what is left before any rank writes a record
        if dry_run or not todo:
            continue
        try:
            if family.needs in ("global", "tokens"):
                group.features = session.features(group, group.manifest)
                if group.target is not None:
                    group.target_features = session.features(group, group.target)
        except Exception as error:
            log.error("%s %s: feature extraction failed: %s", encoder, protocol.id, error)
            log.debug(traceback.format_exc())
            outcomes += [_failed(job, options, group, split, error, started, t0, key) for job, split, key in todo]
            continue
        shared = family.needs == "volumes"  # data-parallel: every rank runs each job together
        for index, (job, split, key) in enumerate(todo):
            if shared or index % distributed.world() == distributed.rank():
                outcomes.append(_run_locked(job, group, split, key, options, log, seen[job.record_path(options.out)],
                                            session if shared else None, shared and _fit_ident(job) in partners))
    if not dry_run:
        sweep_locks(options.out)
        if distributed.rank() == 0:  # models kept for a partner job are spent once the run is over
            shutil.rmtree(options.out / SHARED_FITS, ignore_errors=True)
    if distributed.world() > 1:
        gathered = distributed.gather(outcomes)
        if gathered is None:
            return []
        # shared outcomes (cached, skipped) come from every rank; a run job's from one
        ident = lambda job: (job.encoder, job.protocol.id, job.ratio, job.seed)  # noqa: E731
        unique = {}
        for outcome in gathered:
            unique.setdefault(ident(outcome.job), outcome)
        order = {ident(job): i for i, job in enumerate(jobs)}
        outcomes = sorted(unique.values(), key=lambda o: order[ident(o.job)])
    return outcomes


def _writes_records(group: Group | None) -> bool:
    """A data-parallel job is recorded by rank 0 alone; a job dealt to one rank by that rank."""
    return group is None or group.family.needs != "volumes" or distributed.rank() == 0


def work_dir(job: Job, key: str, options: RunOptions) -> Path:
    """The job's training-state folder, named by its key: a rerun of the same job resumes from it."""
    record = job.record_path(options.out)
    return record.parent / f".{record.stem}.work-{key[:16]}"


def run_one(job: Job, group: Group, split: Split, key: str, options: RunOptions, log: logging.Logger,
            session: Session | None = None, share_fit: bool = False) -> Outcome:
    """Run one job and record it; ``session`` is needed by fine-tuning families (fresh encoders)."""
    started, t0 = now(), time.perf_counter()
    work = None
    try:
        seed_everything(job.seed)
        inputs = TaskInputs(job.protocol, group.manifest, split, job.ratio, job.seed, group.features,
                            group.target, group.target_features, options.device, log,
                            cache_dir=options.cache_dir or cache_root(),
                            checkpoint=CheckpointRef(group.encoder.card, group.encoder.checkpoint,
                                                     group.encoder.checkpoint_sha256))
        if group.family.needs == "volumes":
            if session is None:
                raise ValueError(f"{job.name}: a fine-tuning family needs the session to build encoders")
            work = work_dir(job, key, options)
            entry = group.encoder
            inputs.encoder = EncoderHandle(entry.card, lambda: session.build(entry, job.seed).train())
            inputs.spec = group.spec
            inputs.work_dir = work
            if share_fit:
                files = content_hash([session.files_identity(group.manifest), None])
                inputs.shared_fit = options.out / SHARED_FITS / f"{fit_key(group, job, split, files)}.pt"
        result = group.family.run(inputs)
        bad = [k for k, v in result.metrics.items() if v is not None and not np.isfinite(v)]
        if bad:
            raise FloatingPointError(f"metrics {bad} are not finite; a NaN metric must be None with a reason in notes")
        seconds = time.perf_counter() - t0
        record = ResultRecord(job_key=key, encoder=job.encoder, protocol=job.protocol.id, family=job.protocol.family,
                              regime=job.ratio, seed=job.seed, status="ok", metrics=result.metrics, notes=result.notes,
                              selected=result.selected, sizes=result.sizes,
                              provenance=_provenance(group, job, options, split, result.provenance),
                              timing=Timing(started=started, finished=now(), seconds=round(seconds, 3)))
    except Exception as error:  # NaN loss, out of memory, a corrupt volume, a malformed result: this job only
        log.error("%s failed: %s", job.name, error)
        log.debug(traceback.format_exc())
        if work is not None and _writes_records(group):
            shutil.rmtree(work, ignore_errors=True)  # a failure, not an interruption: there is nothing to resume
        return _failed(job, options, group, split, error, started, t0, key)
    if _writes_records(group):
        path = job.record_path(options.out)
        try:
            write_record(path, record, result.units)
        except OSError as problem:  # a full disk or a lost permission fails this job; training state is kept
            log.error("%s: %s", job.name, _not_written(path, problem))
            return Outcome(job, "failed", seconds=seconds, message=_not_written(path, problem))
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)  # the record holds the result; training state is spent
    return Outcome(job, "ok", seconds=seconds, **_primary(job, group, result.metrics))


def _run_locked(job: Job, group: Group, split: Split, key: str, options: RunOptions, log: logging.Logger,
                seen: ResultRecord | None, session: Session | None = None, share_fit: bool = False) -> Outcome:
    """``run_one`` under the job's lock; a record that another run wrote meanwhile is taken as it is.

    An interruption (Ctrl-C, SIGTERM) unwinds through here with the lock released and no
    record written, so the training state stays for the rerun to resume.
    """
    shared = group.family.needs == "volumes" and distributed.world() > 1  # one lock, taken by rank 0
    path = job.record_path(options.out)

    def waiting() -> None:
        log.warning("%s: another run is computing it; waiting for it", job.name)

    with job_lock(job, options.out, waiting) if not shared or distributed.rank() == 0 else contextlib.nullcontext():
        fresh = existing(path)
        done = is_done(path, fresh, key) and (not options.force or fresh != seen)
        if distributed.agree(done) if shared else done:
            return Outcome(job, "cached", seconds=fresh.timing.seconds if fresh else 0.0,
                           message="computed by another run", **_primary(job, group, fresh.metrics if fresh else None))
        return run_one(job, group, split, key, options, log, session, share_fit)
