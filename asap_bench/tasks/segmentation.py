"""Segmentation family: UNETR fine-tuning from the encoder's own ViT, sliding-window scoring.

One job: build the encoder (checkpoint weights loaded by the encoder layer), put
MONAI's UNETR decoder around it (``unetr.EncoderUNETR``), train on
positive/negative-sampled crops of the regime's training volumes with Dice-CE and
AdamW for a fixed number of steps, keep the weights of the best validation Dice,
and score every test case (or, for an external validation, every target case
with its labels mapped by ``transfer.label_map``) by MONAI sliding-window
inference on the whole preprocessed volume. Both run under bf16 autocast on
any device unless ``precision: float32`` (on CPUs with native bf16, about half
the time of float32 at the same Dice on the demo).

Determinism, resumption and data parallelism share one rule: a step is
``volumes_per_step`` items, item ``j`` of step ``s`` being the crops of one
volume drawn from a generator seeded by ``(seed, s, j)``, and the step's
gradient is the mean over items of each item's own forward and backward pass.
Under torchrun rank ``r`` takes items ``r, r + world, ...`` and DDP averages
over ranks. Every item's gradient is thus computed on the same tensor shapes by
the same kernels whatever the number of processes; only the order of the final
sum over items can differ (not at all with one item per rank). Summing instead
over one batch of all crops would not do: the batch size changes the kernels'
rounding, instance normalisation of near-constant features magnifies it (about
1e-3 relative in the ViT's gradients) and AdamW's first steps, close to
``lr * sign(gradient)``, turn it into visibly different weights.

A job killed after its last checkpoint restarts from that step with the same
model, optimiser, best-validation state and RNG states and ends where an
uninterrupted run ends. The state file is read weights-only (tensors and plain
values), so a file planted in the work folder cannot run code; one that cannot
be read or was made for another configuration is ignored with a warning.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from .. import files
from ..data.seg_volumes import SegVolume, SegVolumeCache
from ..metrics.segmentation import dice_per_case, score_case, summarise
from ..protocol import Protocol
from ..runner import distributed
from ..schema import content_hash
from .base import TaskFamily, TaskInputs, TaskResult, demo_note, head_params
from .unetr import EncoderUNETR

# head.params the family reads; anything else in a protocol is a typo and an error
DEFAULTS: dict[str, Any] = {
    "crop_size": None,  # H, W, D; the encoder's input size decides (a ViT takes one size)
    "pos_neg_ratio": [1, 1],
    "samples_per_volume": 2,
    "volumes_per_step": 2,  # volumes drawn per step across all ranks; crops = this x samples_per_volume
    "loss": "dice_ce",
    "optimizer": "adamw",
    "lr": 1e-4,
    "weight_decay": 1e-5,
    "max_steps": 25000,
    "val_every": 500,
    "checkpoint_every": None,  # default: val_every
    "val_cases": None,  # validate on the first n validation cases (None: all)
    "sw_batch_size": 4,
    "sw_overlap": 0.5,
    "feature_blocks": [3, 6, 9, 12],
    "feature_size": 16,
    "nsd_tolerance_mm": 1.0,  # one number, or {structure name: mm}
    "gradient_checkpointing": False,  # CUDA only
    "precision": "bf16",  # autocast dtype of training and inference on any device: "bf16" or "float32"
    "stitch_on_cpu_voxels": 2 ** 25,  # whole-volume logits larger than this are stitched on the CPU
    "volume_memory": 64,  # preprocessed volumes kept in memory (LRU)
}
CHECKPOINT = "train_state.pt"
PRECISIONS = ("bf16", "float32")


def head_settings(protocol: Protocol, synthetic: bool) -> tuple[dict[str, Any], list[str]]:
    """The effective settings, defaults filled in, and the names the demo settings replaced."""
    where = f"protocol {protocol.id}"
    params, replaced = head_params(protocol, synthetic, set(DEFAULTS))
    settings = {**DEFAULTS, **params}
    if settings["loss"] != "dice_ce" or settings["optimizer"] != "adamw":
        raise ValueError(f"{where}: head.params loss/optimizer must be 'dice_ce'/'adamw', got "
                         f"{settings['loss']!r}/{settings['optimizer']!r}")
    for key in ("val_every", "samples_per_volume", "volumes_per_step", "sw_batch_size", "feature_size"):
        if int(settings[key]) < 1:
            raise ValueError(f"{where}: head.params {key} must be a positive integer, got {settings[key]!r}")
    if int(settings["max_steps"]) < 0:  # 0 scores the model as built: the floor a trained run must beat
        raise ValueError(f"{where}: head.params max_steps must be a non-negative integer, "
                         f"got {settings['max_steps']!r}")
    if settings["precision"] not in PRECISIONS:
        raise ValueError(f"{where}: head.params precision must be one of {list(PRECISIONS)}, "
                         f"got {settings['precision']!r}")
    settings["checkpoint_every"] = int(settings["checkpoint_every"] or settings["val_every"])
    return settings, replaced


def _tolerances(value: Any, structures: dict[int, str], where: str) -> dict[int, float]:
    if isinstance(value, (int, float)):
        return {k: float(value) for k in structures}
    if isinstance(value, dict):
        missing = [n for n in structures.values() if n not in value]
        if missing:
            raise ValueError(f"{where}: head.params nsd_tolerance_mm has no value for {missing}")
        return {k: float(value[n]) for k, n in structures.items()}
    raise ValueError(f"{where}: head.params nsd_tolerance_mm must be a number or a mapping by structure")


def _plain(tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor: the model does not need its metadata, which slows every op."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


def _pad_value(spec) -> float:
    if spec.pad_value is not None:
        return float(spec.pad_value)
    return float((spec.value_range or (0.0,))[0])


class Volumes:
    """Whole preprocessed volumes by case id through the content-keyed cache, a few kept in memory."""

    def __init__(self, cache: SegVolumeCache, keep: int):
        self.cache, self.keep = cache, max(1, int(keep))
        self._memory: OrderedDict[str, SegVolume] = OrderedDict()

    def __getitem__(self, case_id: str) -> SegVolume:
        if case_id in self._memory:
            self._memory.move_to_end(case_id)
            return self._memory[case_id]
        volume = self.cache.get(case_id)
        self._memory[case_id] = volume
        while len(self._memory) > self.keep:
            self._memory.popitem(last=False)
        return volume


class Trainer:
    """Fixed-budget UNETR fine-tuning with validation-Dice selection and resumable state."""

    def __init__(self, model: EncoderUNETR, settings: dict[str, Any], volumes: Volumes, train: list[str],
                 val: list[str], n_classes: int, labels: list[int], seed: int, device: torch.device,
                 work_dir: Path, fingerprint: str, roi: tuple[int, int, int], pad_value: float, log):
        self.model, self.s, self.volumes = model, settings, volumes
        self.train_ids, self.val_ids = list(train), list(val)
        self.n_classes, self.labels, self.seed, self.device = n_classes, labels, seed, device
        self.work_dir, self.fingerprint, self.roi, self.log = Path(work_dir), fingerprint, roi, log
        self.cuda = device.type == "cuda"
        self.world, self.rank = distributed.world(), distributed.rank()
        per_step = int(settings["volumes_per_step"])
        self.volumes_per_step = -(-per_step // self.world) * self.world  # equal items on every rank
        self.pad_image_value = pad_value
        pos, neg = settings["pos_neg_ratio"]
        self.cropper = mt.RandCropByPosNegLabeld(["image", "mask"], label_key="mask", spatial_size=roi, pos=pos,
                                                 neg=neg, num_samples=int(settings["samples_per_volume"]),
                                                 allow_smaller=False)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]),
                                           weight_decay=float(settings["weight_decay"]))
        self.net = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if self.cuda else None,
                                               find_unused_parameters=True)
        self.step = 0
        self.best_val: float | None = None
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self.resumed_from: int | None = None
        self.losses: list[float] = []  # training losses since the last validation

    # ------------------------------------------------------------------ crops
    def items(self) -> range:
        """This rank's items of every step: r, r + world, ... of the step's global draw."""
        return range(self.rank, self.volumes_per_step, self.world)

    def crops(self, step: int, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``item`` of ``step``: the crops of one volume, all drawn from the seed (seed, step, item)."""
        rng = np.random.default_rng([self.seed, step, item])
        case = self.train_ids[int(rng.integers(len(self.train_ids)))]
        volume = self.volumes[case]
        image = torch.from_numpy(volume.image)
        mask = torch.from_numpy(volume.mask)
        if any(s < r for s, r in zip(image.shape[1:], self.roi)):
            image = _plain(mt.SpatialPad(self.roi, value=self.pad_image_value)(image))
            mask = _plain(mt.SpatialPad(self.roi, value=0)(mask))
        self.cropper.set_random_state(seed=int(rng.integers(2 ** 31)))
        images, masks = [], []
        with warnings.catch_warnings():  # a volume without foreground falls back to negative crops
            warnings.simplefilter("ignore")
            for crop in self.cropper({"image": image, "mask": mask}):
                images.append(_plain(crop["image"]))
                masks.append(_plain(crop["mask"]))
        return torch.stack(images).float(), torch.stack(masks).long()

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.work_dir / CHECKPOINT

    def state(self) -> dict[str, Any]:
        """Everything a rerun needs to continue at ``self.step``, as tensors and plain values only."""
        return {"fingerprint": self.fingerprint, "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "best_val": self.best_val, "best_step": self.best_step,
                "best_state": self.best_state, "history": self.history, "losses": self.losses,
                "rng": _rng_state(self.cuda)}

    def apply(self, state: dict[str, Any]) -> None:
        """Take over ``state``; a part that does not fit the model raises (the caller rolls back)."""
        own, best = self.model.state_dict(), state["best_state"]
        if best is not None and (set(best) != set(own) or any(best[k].shape != own[k].shape for k in own)):
            raise ValueError("best_state does not match the model's tensors")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best_val, self.best_step = int(state["step"]), state["best_val"], int(state["best_step"])
        self.best_state, self.history, self.losses = state["best_state"], state["history"], state["losses"]
        _set_rng_state(state["rng"], self.cuda)

    def save(self) -> None:
        """The state, written atomically by rank 0."""
        if self.rank == 0:
            state = self.state()
            files.write_atomic(self.state_path, lambda out: torch.save(state, out))
        distributed.barrier()

    def restore(self) -> bool:
        """Continue from the saved state if every rank can use it; otherwise warn and start fresh."""
        if not distributed.agree(self.state_path.is_file()):
            return False
        fresh = copy.deepcopy(self.state())
        problem = self._resume()
        if distributed.total(int(problem is None)) < self.world:
            self.apply(fresh)
            self.log.warning("ignoring training state %s: %s; training starts from step 0", self.state_path,
                             problem or "another process could not use it")
            return False
        self.resumed_from = self.step
        self.log.info("resuming from step %d (%s)", self.step, self.state_path)
        return True

    def _resume(self) -> str | None:
        """Apply the saved state; None on success, else why it was not usable (then partly applied)."""
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # refused pickle, truncated or garbled: never unpickled further
            return f"not a readable weights-only file ({_first_line(err)})"
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            return "made for another configuration"
        try:
            self.apply(state)
        except Exception as err:
            return f"does not fit this job ({type(err).__name__}: {_first_line(err)})"
        return None

    # ------------------------------------------------------------------ loop
    def autocast(self):
        return autocast(self.device, self.s["precision"])

    def train_step(self, step: int) -> float:
        """One optimiser step over this rank's items, one forward/backward each; returns the step's mean loss.

        Each item's loss is scaled by world / volumes_per_step, so DDP's mean over ranks is the
        mean over all items. Gradients are synchronised on the last item only, after every rank
        has checked the step's loss, so a non-finite loss stops all ranks together.
        """
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        mine = list(self.items())
        scale = self.world / self.volumes_per_step
        total = 0.0
        for index, item in enumerate(mine):
            images, masks = (t.to(self.device) for t in self.crops(step, item))
            last = index == len(mine) - 1
            with contextlib.nullcontext() if last or self.world == 1 else self.net.no_sync():
                with self.autocast():
                    logits = self.net(images)
                loss = self.loss(logits.float(), masks)
                total += float(loss.detach())
                if last:
                    mean = self._all_sum(total) / self.volumes_per_step
                    if not math.isfinite(mean):
                        raise FloatingPointError(f"training loss is {mean} at step {step}")
                (loss * scale).backward()
        self.optimizer.step()
        return mean

    def _all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def validate(self) -> float | None:
        """Mean foreground Dice over the validation cases (sharded over ranks)."""
        values = []
        for index in range(self.rank, len(self.val_ids), self.world):
            volume = self.volumes[self.val_ids[index]]
            pred = predict(self.model, volume.image, self.roi, self.s, self.device)
            dice = dice_per_case(pred, torch.from_numpy(volume.mask[0]), self.labels, self.n_classes)
            if dice is not None:
                values.append((index, dice))
        gathered = distributed.agree(distributed.gather(values))
        return float(np.mean([dice for _, dice in sorted(gathered)])) if gathered else None  # in case order

    def fit(self) -> None:
        self.restore()
        max_steps, val_every = int(self.s["max_steps"]), int(self.s["val_every"])
        started, first = time.perf_counter(), self.step
        while self.step < max_steps:
            self.losses.append(self.train_step(self.step))
            self.step += 1
            validate = self.step % val_every == 0 or self.step == max_steps
            if validate:
                dice = self.validate()
                entry = {"step": self.step, "loss": float(np.mean(self.losses)), "val_dice": dice}
                self.history.append(entry)
                self.losses = []
                if self.best_state is None or (dice is not None and (self.best_val is None or dice > self.best_val)):
                    self.best_val, self.best_step = dice, self.step
                    self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                self.log.info("step %d: loss %.4f, val dice %s", self.step, entry["loss"],
                              "n/a" if dice is None else f"{dice:.4f}")
            if validate or self.step % int(self.s["checkpoint_every"]) == 0:
                self.save()
        self.seconds = time.perf_counter() - started
        self.steps_run = self.step - first

    def summary(self) -> dict[str, Any]:
        """What the record says about training (plain values: it is also kept with a shared fit)."""
        return {"best_step": self.best_step, "best_val": self.best_val, "steps": self.step, "history": self.history,
                "processes": self.world, "steps_run": self.steps_run, "train_seconds": round(self.seconds, 3),
                "volumes_per_step": self.volumes_per_step, "resumed_from": self.resumed_from}


def keep_fit(path: Path, model: torch.nn.Module, summary: dict[str, Any]) -> None:
    """The selected weights and the training summary, for the run's other job with the same fit (rank 0)."""
    if distributed.rank() == 0:
        state = {"fit": path.stem, "model": model.state_dict(), "summary": summary}
        files.write_atomic(path, lambda out: torch.save(state, out))
    distributed.barrier()


def reuse_fit(path: Path, model: torch.nn.Module, log) -> dict[str, Any] | None:
    """Load a kept fit into ``model`` and return its summary; None (train instead) if there is none usable.

    Read weights-only, like the training state: a file planted there cannot run code.
    """
    if not distributed.agree(path.is_file()):
        return None
    before = copy.deepcopy(model.state_dict())
    summary = problem = None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("fit") != path.stem:
            raise ValueError("made for another fit")
        model.load_state_dict(state["model"])
        summary = dict(state["summary"])
    except Exception as err:
        problem = _first_line(err)
    if distributed.total(int(summary is not None)) < distributed.world():  # every rank uses it, or none
        model.load_state_dict(before)
        log.warning("ignoring kept model %s: %s; training instead", path,
                    problem or "another process could not use it")
        return None
    return summary


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _rng_state(cuda: bool) -> dict[str, Any]:
    """Every RNG the loop may touch, as tensors and plain values (all a weights-only file can hold)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else None,
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss_next}}


def _set_rng_state(rng: dict[str, Any], cuda: bool) -> None:
    torch.set_rng_state(rng["torch"])
    numpy = rng["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    python = rng["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    if cuda and rng.get("cuda") is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA and CPU alike (weights and losses stay float32), or none for "float32".

    The same setting on every device keeps a CPU rerun of a GPU result in the same arithmetic.
    """
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def predict(model: torch.nn.Module, image: np.ndarray, roi: tuple[int, int, int], settings: dict[str, Any],
            device: torch.device) -> torch.Tensor:
    """Label map [*spatial] (int64, CPU) of one whole volume by sliding-window inference.

    Windows run on the model's device; the stitched logits live there too unless
    the volume is large, then on the CPU, so memory stays bounded by the window batch.
    """
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image))[None]
    n_out = model.out_channels
    stitch = device if x[0, 0].numel() * n_out <= int(settings["stitch_on_cpu_voxels"]) else torch.device("cpu")
    with torch.inference_mode(), autocast(device, settings["precision"]):
        logits = sliding_window_inference(x, roi_size=roi, sw_batch_size=int(settings["sw_batch_size"]),
                                          predictor=lambda w: model(w).float(), overlap=float(settings["sw_overlap"]),
                                          mode="gaussian", sw_device=device, device=stitch)
    return logits[0].argmax(dim=0).cpu()


def _check_label_map(label_map: dict[int, int] | None, target_structures: dict[int, str],
                     source_structures: dict[int, str], where: str) -> dict[int, int]:
    if not label_map:
        raise ValueError(f"{where}: transfer.label_map is required for a segmentation transfer")
    bad_t = sorted(set(label_map) - set(target_structures))
    bad_s = sorted(set(label_map.values()) - set(source_structures))
    if bad_t or bad_s:
        raise ValueError(f"{where}: transfer.label_map keys must be target mask values {sorted(target_structures)} "
                         f"and values source mask values {sorted(source_structures)}; wrong: keys {bad_t}, values {bad_s}")
    return dict(label_map)


class Segmentation(TaskFamily):
    name = "seg"
    needs = "volumes"

    def run(self, inputs: TaskInputs) -> TaskResult:
        protocol, handle = inputs.protocol, inputs.encoder
        if handle is None or inputs.spec is None or inputs.cache_dir is None or inputs.work_dir is None:
            raise ValueError("the segmentation family needs the encoder handle, input spec, cache and work folders "
                             "(a runner that serves 'volumes' families)")
        card = handle.card
        metrics = [m for m in protocol.metrics]
        if card.segmentation.mode != "unetr":
            return TaskResult(metrics={m: None for m in metrics},
                              notes={"not_applicable": f"encoder {card.name!r} has no UNETR segmentation: "
                                                       f"{card.segmentation.reason}"})
        where = f"protocol {protocol.id}"
        settings, replaced = head_settings(protocol, inputs.manifest.synthetic)
        notes: dict[str, str] = {}
        if replaced:
            notes["demo"] = demo_note(replaced)
        structures = dict(sorted(inputs.manifest.table.mask.items()))
        labels, n_classes = list(structures), max(structures) + 1
        tolerances = _tolerances(settings["nsd_tolerance_mm"], structures, where)
        spec = inputs.spec
        roi = tuple(int(v) for v in spec.tensor_size())
        wanted = settings["crop_size"]
        if wanted is not None and tuple(int(v) for v in wanted) != tuple(spec.size):
            notes["crop"] = (f"crops of {list(spec.size)} (H, W, D), the size the encoder takes, instead of "
                             f"crop_size {list(wanted)}")
        device = torch.device(inputs.device)
        if settings["precision"] == "bf16":
            notes["precision"] = "bf16 autocast in training and inference; weights, loss and metrics in float32"
            if device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported():
                inputs.log.warning("bf16 autocast on a CPU without native bf16 instructions is slow; "
                                   "head.params precision: float32 trains in float32")
        inputs.work_dir.mkdir(parents=True, exist_ok=True)

        # model: the encoder from its handle (weights loaded there), MONAI's UNETR decoder around it
        encoder = handle.build()
        torch.manual_seed(inputs.seed)
        model = EncoderUNETR(encoder, n_classes, settings["feature_blocks"], int(settings["feature_size"])).to(device)
        if settings["gradient_checkpointing"]:
            if device.type == "cuda":
                model.enable_gradient_checkpointing()
            else:
                notes["gradient_checkpointing"] = "requested, not used: it is for CUDA memory and the run is on CPU"
        if model.feature_blocks != [int(b) for b in settings["feature_blocks"]]:
            notes["feature_blocks"] = (f"encoder depth {encoder.arch['depth']}: blocks {model.feature_blocks} "
                                       f"feed the decoder (evenly rescaled from {list(settings['feature_blocks'])})")

        source = Volumes(SegVolumeCache(inputs.manifest, spec, inputs.cache_dir), settings["volume_memory"])
        train, val = list(inputs.train), list(inputs.split.val)
        if settings["val_cases"] is not None and int(settings["val_cases"]) < len(val):
            notes["validation"] = f"checkpoint selection on {int(settings['val_cases'])} of the {len(val)} validation cases"
            val = val[:int(settings["val_cases"])]
        fingerprint = content_hash({"settings": settings, "train": train, "val": val, "seed": inputs.seed,
                                    "encoder": card.model_dump(mode="json"), "input": spec.model_dump(mode="json"),
                                    "protocol": protocol.fingerprint})
        trainer = Trainer(model, settings, source, train, val, n_classes, labels, inputs.seed, device,
                          inputs.work_dir, fingerprint, roi, _pad_value(spec), inputs.log)
        fit = reuse_fit(inputs.shared_fit, model, inputs.log) if inputs.shared_fit is not None else None
        if fit is None:
            trainer.fit()
            if trainer.best_state is not None:
                model.load_state_dict(trainer.best_state)
            fit = trainer.summary()
            if inputs.shared_fit is not None:
                keep_fit(inputs.shared_fit, model, fit)
        else:
            notes["fit"] = ("the model another job of this run trained for the same data, split, head, encoder, "
                            "regime and seed (identical training), reused")
        if fit["resumed_from"] is not None:
            notes["resumed"] = f"resumed from the checkpoint at step {fit['resumed_from']}"
        if fit["volumes_per_step"] != int(settings["volumes_per_step"]):
            notes["volumes_per_step"] = (f"{fit['volumes_per_step']} volumes per step (rounded up to a multiple "
                                         f"of the {fit['processes']} processes)")

        # scoring: the test cases, or every case of an external-validation target
        if inputs.target is not None:
            target = inputs.target
            if target.table.mask is None:
                raise ValueError(f"{where}: target {target.dataset}/{target.table_name} has no masks")
            label_map = _check_label_map(protocol.transfer.label_map if protocol.transfer else None,
                                         target.table.mask, structures, where)
            scored = Volumes(SegVolumeCache(target, spec, inputs.cache_dir, label_map=label_map), 1)
            cases = list(target.frame.index)
        else:
            scored, cases = source, list(inputs.split.test)
        mine = cases[distributed.rank()::distributed.world()]
        results = []
        for case in mine:
            volume = scored[case]
            pred = predict(model, volume.image, roi, settings, device)
            results.append((case, score_case(pred.numpy(), volume.mask[0], structures, volume.spacing, tolerances,
                                             n_classes, tuple(metrics))))
        gathered = distributed.agree(distributed.gather(results))
        by_case = dict(sorted(gathered))
        summary, units = summarise(by_case, tuple(metrics))
        notes["metrics"] = ("per case: mean over foreground structures " + ", ".join(structures.values())
                            + "; task value: mean over cases; computed on the preprocessed grid with its voxel "
                            "spacing (mm); structure empty in truth and prediction: skipped; empty in one only: "
                            "Dice 0, NSD 0, HD95 = the volume diagonal (mm); NSD tolerance "
                            + ", ".join(f"{structures[k]} {v:g} mm" for k, v in tolerances.items()))
        skipped = {m: n for m, n in units["skipped_cases"].items() if n}
        if skipped:
            notes["skipped_cases"] = f"cases with no structure in truth or prediction, left out: {skipped}"
        for metric in metrics:
            if summary.get(metric) is None:
                notes[f"{metric}_undefined"] = "no scored case"
        selected = {"best_step": fit["best_step"], "best_val_dice": fit["best_val"], "steps": fit["steps"],
                    "feature_blocks": model.feature_blocks, "crop": list(roi),
                    "volumes_per_step": fit["volumes_per_step"]}
        units["training"] = {"history": fit["history"], "processes": fit["processes"], "steps_run": fit["steps_run"],
                             "train_seconds": fit["train_seconds"]}
        sizes = {"train": len(train), "val": len(val), "scored": len(cases)}
        return TaskResult(metrics={m: summary.get(m) for m in metrics}, notes=notes, selected=selected, sizes=sizes,
                          units=units)
