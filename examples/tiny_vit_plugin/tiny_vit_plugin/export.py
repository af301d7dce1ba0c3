"""Write a checkpoint for tiny-vit in the layout its card describes: a stand-in for your pre-trained weights.

``python -m tiny_vit_plugin.export OUT.safetensors [--variant demo] [--seed 0]``

The file holds the backbone under ``encoder.`` and a pre-training head under
``decoder.`` (which the card's ``ignore_prefixes`` declares unused), as many
published checkpoints do.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from asap_bench.encoders.card import load_card_file

from . import CARD
from .model import TinyViT


def export(out: str, variant: str = "native", seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = TinyViT(load_card_file(CARD), variant)
    state = {f"encoder.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["decoder.weight"] = torch.zeros(8, model.embed_dim)
    save_file(state, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--variant", default="native", help="architecture size: native, or demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {export(args.out, args.variant, args.seed)}")


if __name__ == "__main__":
    main()
