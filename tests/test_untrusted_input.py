"""Files from outside never run code: planted training state, checkpoints with extras, damaged checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from asap_bench.cli import main
from asap_bench.encoders import registry
from asap_bench.encoders.checkpoints import CheckpointError, load_weights, read_state_dict
from asap_bench.protocol import get_protocol
from asap_bench.results.record import read_record
from asap_bench.runner import local
from asap_bench.runner.jobs import Job
from asap_bench.tasks import segmentation as seg
from asap_bench.tasks.unetr import EncoderUNETR


class Payload:
    """Unpickling this runs a shell command: what an attacker plants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Config:
    """A harmless class of the saving script's own: not on the allow-list, so still refused."""

    def __init__(self):
        self.lr = 1e-4


# ---------------------------------------------------------------- training state in the work folder

def tiny_seg_protocol():
    protocol = get_protocol("seg/fumpe")
    params = {**protocol.head.params, "demo_max_steps": 1, "demo_val_every": 1, "demo_val_cases": 1,
              "demo_feature_size": 8}
    return protocol.model_copy(update={"head": protocol.head.model_copy(update={"params": params})})


def test_planted_training_state_never_runs(demo_root, tmp_path, monkeypatch, caplog):
    """A pickle planted where the runner keeps a job's training state is refused; the job trains afresh."""
    marker = tmp_path / "pwned"
    planted: list[Path] = []
    real_work_dir = local.work_dir

    def planting(job, key, options):
        folder = real_work_dir(job, key, options)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"fingerprint": "x", "step": 1, "x": Payload(marker)}, folder / seg.CHECKPOINT)
        planted.append(folder / seg.CHECKPOINT)
        return folder

    monkeypatch.setattr(local, "work_dir", planting)
    options = local.RunOptions(data_root=demo_root, out=tmp_path / "runs", variant="demo",
                               cache_dir=tmp_path / "cache", progress=False)
    job = Job("random", tiny_seg_protocol(), 1.0, 0)
    with caplog.at_level(logging.WARNING):
        outcomes = local.run_jobs([job], options, logging.getLogger("test.untrusted"))
    assert not marker.exists()
    assert len(planted) == 1 and planted[0].name == seg.CHECKPOINT
    assert [o.status for o in outcomes] == ["ok"], outcomes
    record = read_record(job.record_path(options.out))
    assert record.status == "ok" and "resumed" not in record.notes and record.selected["steps"] == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(planted[0]) in m and "training starts from step 0" in m for m in warned), warned


def _trainer(work: Path, fingerprint: str = "fp") -> seg.Trainer:
    """A Trainer around a tiny UNETR; restore and save need no data."""
    card = registry.get_card("random")
    card = card.model_copy(update={"architecture": card.architecture_for("demo")})
    torch.manual_seed(0)
    model = EncoderUNETR(registry.family_class(card.family)(card, "native"), 2, feature_size=8)
    settings = {**seg.DEFAULTS, "checkpoint_every": 1}
    return seg.Trainer(model, settings, None, ["a"], [], 2, [1], 0, torch.device("cpu"), work, fingerprint,
                       tuple(model.img_size), -1.0, logging.getLogger("test.untrusted"))


def _take_a_step(trainer: seg.Trainer) -> None:
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, 0.01)
    trainer.optimizer.step()
    trainer.step, trainer.best_val, trainer.best_step = 3, 0.5, 3
    trainer.best_state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.history, trainer.losses = [{"step": 3, "loss": 1.0, "val_dice": 0.5}], [0.9]


def test_training_state_is_weights_only_and_round_trips(tmp_path):
    trainer = _trainer(tmp_path)
    _take_a_step(trainer)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    trainer.save()
    state = torch.load(trainer.state_path, weights_only=True)  # tensors and plain values only
    assert state["step"] == 3
    after_save = (random.random(), np.random.random(), np.random.normal(), torch.rand(1))

    again = _trainer(tmp_path)
    assert again.restore() and again.step == 3 and again.best_val == 0.5 and again.losses == [0.9]
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    ours, theirs = trainer.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert set(ours) == set(theirs) and all(torch.equal(ours[i]["exp_avg"], theirs[i]["exp_avg"]) for i in ours)
    assert (random.random(), np.random.random(), np.random.normal(), torch.rand(1)) == after_save


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "forged shapes", "pickled payload", "another job"])
def test_unusable_training_state_is_ignored_and_training_starts_fresh(tmp_path, caplog, damage):
    made = _trainer(tmp_path)
    _take_a_step(made)
    made.save()
    path = made.state_path
    marker = tmp_path / "pwned"
    if damage == "truncated":
        _truncate(path)
    elif damage == "garbage":
        path.write_bytes(b"\x80\x02not a pickle at all")
    elif damage == "forged shapes":  # every tensor fits but the last: a load would stop half-way
        state = torch.load(path, weights_only=True)
        state["model"][list(state["model"])[-1]] = torch.zeros(1)
        torch.save(state, path)
    elif damage == "pickled payload":
        with open(path, "wb") as handle:
            pickle.dump({"fingerprint": "fp", "x": Payload(marker)}, handle, protocol=2)
    else:
        made.fingerprint = "another"
        made.save()
    fresh = _trainer(tmp_path)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        assert fresh.restore() is False
    assert not marker.exists()
    assert fresh.step == 0 and fresh.best_state is None and not fresh.optimizer.state_dict()["state"]
    for name, tensor in fresh.model.state_dict().items():  # nothing half-applied
        assert torch.equal(tensor, before[name]), name
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# ---------------------------------------------------------------- checkpoints with the saving script's args

def _official(name: str, path: Path, legacy: bool = False, args: object = None) -> torch.nn.Module:
    """A checkpoint laid out as the official training scripts save it: weights, optimiser, epoch, args."""
    torch.manual_seed(0)
    encoder = registry.build_encoder(name, "demo")
    key = encoder.card.checkpoint.container_key
    weights = encoder.state_dict()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    args = argparse.Namespace(lr=1e-4, epochs=100, batch_size=4, roi=[96, 96, 96], data="luna") if args is None else args
    torch.save({key: weights, "optimizer": optimizer.state_dict(), "epoch": 3, "args": args}, path,
               _use_new_zipfile_serialization=not legacy)
    return encoder


@pytest.mark.parametrize("name", ["asap", "pcrlv2"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_official_checkpoint_with_argparse_namespace_loads(tmp_path, name, legacy):
    path = tmp_path / f"{name}.pth"
    saved = _official(name, path, legacy)
    assert saved.card.checkpoint.container_key in ("model", "state_dict")
    before = set(map(str, torch.serialization.get_safe_globals()))
    torch.manual_seed(1)
    fresh = registry.build_encoder(name, "demo")
    report = load_weights(fresh, path)
    assert report.allowed_globals == ["argparse.Namespace"]
    assert "allowed_globals (1): argparse.Namespace" in report.summary()
    for key, tensor in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    # allowed for that one load only: the process-wide allow-list is unchanged
    assert set(map(str, torch.serialization.get_safe_globals())) == before
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_plain_state_dict_reports_no_allowed_globals(tmp_path):
    encoder = registry.build_encoder("asap", "demo")
    torch.save({"model": encoder.state_dict()}, tmp_path / "plain.pth")
    assert load_weights(encoder, tmp_path / "plain.pth").allowed_globals == []


@pytest.mark.parametrize("args", [Config(), argparse.Namespace(config=Config()), argparse.Namespace(root=Path("x"))],
                         ids=["own class", "own class inside Namespace", "Path inside Namespace"])
def test_any_other_class_is_still_refused(tmp_path, args):
    path = tmp_path / "other.pth"
    _official("asap", path, args=args)
    with pytest.raises(CheckpointError, match="other.pth: refused: the file holds pickled objects") as info:
        load_weights(registry.build_encoder("asap", "demo"), path)
    assert "\n" not in str(info.value) and "GLOBAL" in str(info.value)


def test_payload_inside_namespace_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _official("asap", path, args=argparse.Namespace(lr=1e-4, hook=Payload(marker)))
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(registry.build_encoder("asap", "demo"), path)
    assert not marker.exists()


# ---------------------------------------------------------------- empty and damaged checkpoints

def _saved(tmp_path: Path, fmt: str) -> Path:
    state = {"stem.weight": torch.randn(64, 64), "stem.bias": torch.randn(64), "head.weight": torch.randn(8, 64)}
    if fmt == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / f"weights-{fmt}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "half":
        path.write_bytes(data[:len(data) // 2])
    elif how == "first bytes":
        path.write_bytes(data[:3])
    elif how == "inside the pickle":  # cut inside a class name of the object's pickle
        path.write_bytes(data[:data.index(b"_rebuild_tensor") + 5])
    elif how == "no data records":
        source = path.with_suffix(".whole")
        path.rename(source)
        with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w") as out:
            for name in archive.namelist():
                if "/data/" not in name:
                    out.writestr(name, archive.read(name))


CASES = [(fmt, how) for fmt in ("zip", "legacy", "safetensors") for how in ("empty", "half", "first bytes")]
CASES += [("legacy", "inside the pickle"), ("zip", "no data records")]


@pytest.mark.parametrize("fmt,how", CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, fmt, how):
    path = _saved(tmp_path, fmt)
    _damage(path, how)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert ("empty (0 bytes)" if how == "empty" else "truncated or damaged") in message, message
    assert "refused" not in message


@pytest.mark.parametrize("how", ["empty", "half"])
def test_run_with_a_damaged_checkpoint_fails_its_jobs_naming_the_file(demo_root, tmp_path, monkeypatch, how):
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    path = _saved(tmp_path, "zip")
    _damage(path, how)
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, ["run", "--encoder", "random", "--checkpoint", str(path), "--task", "cls/stoic",
                                       "--seed-list", "0", "--ratios", "1", "--data-root", str(demo_root),
                                       "--out", str(out), "--quiet"])
    assert result.exit_code != 0
    assert str(path) in result.output and "Traceback" not in result.output, result.output
    record = json.loads((out / "random" / "cls__stoic" / "r1.0_s0.json").read_text())
    assert record["status"] == "failed"
    assert record["error"].startswith(f"UnreadableCheckpoint: {path}: ") and "\n" not in record["error"], record["error"]
