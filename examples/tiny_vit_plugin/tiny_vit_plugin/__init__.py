"""An asap-bench encoder plug-in: the encoder 'tiny-vit', added through the ``asap_bench.encoders`` entry point."""

from pathlib import Path

from .model import TinyViT

CARD = Path(__file__).with_name("tiny-vit.yaml")


def register():
    """What asap-bench calls: (the card, the Encoder class its ``family`` names)."""
    return CARD, TinyViT


__all__ = ["CARD", "TinyViT", "register"]
