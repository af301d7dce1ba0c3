"""UNETR fine-tuning speed: steps/s of one training step, fused vs explicit attention, and sliding-window time.

    python benchmarks/seg_speed.py                           # CPU: demo-size and ViT-B UNETR at 96x96x48
    python benchmarks/seg_speed.py --device cuda --bf16      # CUDA, autocast bfloat16
    python benchmarks/seg_speed.py --sizes demo --steps 5    # only the demo-size model

A step is what the segmentation family runs: forward of the UNETR (the
encoder's ViT plus MONAI's decoder blocks) on a batch of crops, Dice-CE loss,
backward, AdamW update. Fused attention is torch's scaled_dot_product_attention,
explicit is softmax(q k^T) v (``set_fused_attention(False)``). Sliding-window
inference is timed on one synthetic whole volume larger than the crop (MONAI
``sliding_window_inference``, Gaussian blending, the protocol's overlap 0.5).
Weights and data are random: speed does not depend on them. The two attention
modes alternate step by step (after warm-up steps), so load from other processes
slows both alike; all numbers and ratios come from this one run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import asap_bench  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.losses import DiceCELoss

from asap_bench.encoders.card import load_encoder_card
from asap_bench.encoders.vit3d import ViT3D
from asap_bench.tasks.segmentation import DEFAULTS, predict
from asap_bench.tasks.unetr import EncoderUNETR

# (crop H, W, D), decoder feature size, ViT overrides
SIZES = {
    "demo": ((64, 64, 32), 8, {"img_size": [64, 64, 32], "embed_dim": 48, "depth": 2, "num_heads": 2}),
    "vit-b": ((96, 96, 48), 16, {"img_size": [96, 96, 48]}),
}
VOLUME_SCALE = (1.5, 1.5, 1.5)  # whole volume = crop x this: 2 x 2 x 2 overlapping windows


def build(size: str, device: torch.device, classes: int) -> tuple[EncoderUNETR, tuple[int, int, int], int]:
    crop, feature_size, overrides = SIZES[size]
    card = load_encoder_card("random")
    card = card.model_copy(update={"architecture": {**card.architecture, **overrides}})
    torch.manual_seed(0)
    model = EncoderUNETR(ViT3D(card, "native"), classes, feature_size=feature_size).to(device)
    return model, crop, feature_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, crop, batch: int, classes: int, device, bf16: bool, warmup: int,
               steps: int) -> dict[str, list[float]]:
    """Step times per attention mode; the modes alternate step by step, so a busy machine slows both alike."""
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    x = torch.randn(batch, 1, *crop, device=device)
    y = torch.randint(0, classes, (batch, 1, *crop), device=device)
    model.train()

    def once() -> float:
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(x)
        loss_fn(logits.float(), y).backward()
        optimizer.step()
        sync(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"fused": [], "explicit": []}
    for repeat in range(warmup + steps):
        for label in times:
            model.encoder.set_fused_attention(label == "fused")
            seconds = once()
            if repeat >= warmup:
                times[label].append(seconds)
    model.encoder.set_fused_attention(True)
    return times


def time_inference(model, crop, device, repeats: int) -> tuple[list[float], tuple[int, ...]]:
    shape = tuple(int(c * s) for c, s in zip(crop, VOLUME_SCALE))
    volume = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    settings = {**DEFAULTS, "sw_batch_size": 2}
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        predict(model, volume, crop, settings, device)
        sync(device)
        times.append(time.perf_counter() - start)
    return times, shape


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo,vit-b", help="comma-separated: demo, vit-b")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    parser.add_argument("--batch", type=int, default=2, help="crops per step")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--vitb-steps", type=int, default=2, help="timed steps per mode for vit-b (slow on CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sw-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.bf16 and args.device != "cuda":
        parser.error("--bf16 is for --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"UNETR fine-tuning step (Dice-CE + AdamW), batch {args.batch} crops, {where}, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}")
    rows = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        if size not in SIZES:
            parser.error(f"unknown size {size!r}; choose from {sorted(SIZES)}")
        model, crop, feature_size = build(size, device, args.classes)
        n_params = sum(p.numel() for p in model.parameters())
        steps = args.vitb_steps if size == "vit-b" else args.steps
        per_mode = {}
        times = time_steps(model, crop, args.batch, args.classes, device, args.bf16, args.warmup, steps)
        for label, seconds in times.items():
            per_mode[label] = statistics.median(seconds)
            rows.append((size, list(crop), f"{n_params / 1e6:.1f}M", label, f"{per_mode[label]:.2f} s",
                         f"{1 / per_mode[label]:.3f}"))
            print(f"  {size} {label}: step times {[round(s, 2) for s in seconds]}", flush=True)
        sw, shape = time_inference(model, crop, device, args.sw_repeats)
        rows.append((size, list(crop), "", "sliding window", f"{statistics.median(sw):.2f} s / volume {list(shape)}",
                     ""))
        rows.append((size, "", "", "fused / explicit", f"step speed-up x{per_mode['explicit'] / per_mode['fused']:.2f}",
                     ""))
        del model
    header = ("model", "crop", "params", "mode", "time", "steps/s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
