"""Time one ViT-B forward at the paper's input (1x1x224x224x112, 2,744 tokens): fused vs explicit attention.

    python benchmarks/vit_attention.py                      # CPU, float32
    python benchmarks/vit_attention.py --device cuda --bf16  # CUDA, autocast bfloat16

Fused = torch.nn.functional.scaled_dot_product_attention; explicit = softmax(q k^T) v,
the path ``set_fused_attention(False)`` selects. Weights are random (the speed does
not depend on them); each mode gets warm-up forwards, then timed repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import asap_bench  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asap_bench.encoders.card import load_encoder_card
from asap_bench.encoders.hlip import HLIPViT
from asap_bench.encoders.vit3d import ViT3D


def time_forward(encoder, x: torch.Tensor, device: torch.device, bf16: bool, warmup: int, repeats: int) -> list[float]:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            encoder(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return [once() for _ in range(repeats)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="asap", help="a vit3d or hlip_vit card (default asap)")
    parser.add_argument("--variant", default="native")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.bf16 and args.device != "cuda":
        parser.error("--bf16 is for --device cuda (bf16 matmuls on CPU are not what this benchmark compares)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)

    card = load_encoder_card(args.encoder)
    cls = HLIPViT if card.family == "hlip_vit" else ViT3D
    device = torch.device(args.device)
    torch.manual_seed(0)
    encoder = cls(card, args.variant).eval().to(device)
    x = torch.randn(args.batch, 1, *encoder.input_spec.tensor_size(), device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{card.name} ({args.variant}): input {list(x.shape)}, {where}, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, warm-up {args.warmup}, repeats {args.repeats}")

    results: dict[str, float] = {}
    for label, fused in (("fused", True), ("explicit", False)):
        encoder.set_fused_attention(fused)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_forward(encoder, x, device, args.bf16, args.warmup, args.repeats)
        results[label] = statistics.median(seconds)
        memory = (f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "")
        print(f"{label:>8}: " + ", ".join(f"{s:.3f}" for s in seconds) + f" s (median {results[label]:.3f} s{memory})")
    encoder.set_fused_attention(True)
    print(f"explicit / fused: {results['explicit'] / results['fused']:.2f}x")


if __name__ == "__main__":
    main()
