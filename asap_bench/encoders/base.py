"""The one encoder interface every architecture implements.

An ``Encoder`` is a torch module built from an encoder card (and a size
variant). It takes a batch laid out as the card's InputSpec says
(``[B, C, *spec.tensor_size()]``) and returns an ``EncoderOutput``: a global
embedding for linear probes and prognosis, patch tokens with their grid for the
vision-language heads, and per-block hidden states for a UNETR decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..schema import content_hash
from .card import EncoderCard, InputSpec


@dataclass
class EncoderOutput:
    global_embedding: torch.Tensor  # [B, D], D = card.embed_dim
    patch_tokens: torch.Tensor | None = None  # [B, N, D_tok], N = prod(grid)
    grid: tuple[int, int, int] | None = None  # token grid, in the card's axis_order
    hidden_states: list[torch.Tensor] | None = None  # one [B, N, D_tok] per block (ViTs), when asked


class Encoder(nn.Module):
    """Base class. Subclasses set ``family`` and implement ``encode``.

    ``adapt_tensor`` lets a family reshape a checkpoint tensor whose shape differs
    from the module's (e.g. interpolate a position embedding to another grid); it
    is only called when the caller asked for it, and every use is reported.
    """

    family: ClassVar[str]

    def __init__(self, card: EncoderCard, variant: str = "native"):
        super().__init__()
        if card.family != self.family:
            raise ValueError(f"card {card.name!r} is family {card.family!r}, not {self.family!r}")
        self.card = card
        self.variant = variant
        self.arch = card.architecture_for(variant)

    @property
    def embed_dim(self) -> int:
        return int(self.arch.get("embed_dim", self.card.embed_dim))

    @property
    def input_spec(self) -> InputSpec:
        """The card's InputSpec, with the size of this variant (img_size is in axis order)."""
        spec = self.card.input
        img = self.arch.get("img_size")
        if not img or tuple(img) == spec.tensor_size():
            return spec
        by_axis = dict(zip(spec.axis_order, img))
        return spec.model_copy(update={"size": tuple(int(by_axis[a]) for a in "HWD")})

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        expected = (self.arch.get("in_chans", self.card.input.channels), *self.input_spec.tensor_size())
        if x.ndim != 5 or tuple(x.shape[1:]) != tuple(expected):
            raise ValueError(f"encoder {self.card.name!r} ({self.variant}) expects input [B, {', '.join(map(str, expected))}] "
                             f"(channels, then {self.card.input.axis_order}), got {list(x.shape)}")
        return self.encode(x, hidden_states=hidden_states)

    def adapt_tensor(self, key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
        """Return ``tensor`` reshaped to ``shape`` for ``key``, or None when this family cannot."""
        return None

    def set_fused_attention(self, enabled: bool) -> None:
        """Switch scaled_dot_product_attention on or off (benchmarks); no-op without attention."""


def encoder_fingerprint(card: EncoderCard, variant: str, checkpoint_sha256: str | None) -> str:
    """Identity of an encoder's features: card (architecture, input, key map), size variant, weights."""
    return content_hash({"card": card.model_dump(mode="json"), "variant": variant, "checkpoint_sha256": checkpoint_sha256})


def frozen_forward(encoder: Encoder, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
    """Forward of a frozen encoder: inference mode, bf16 autocast on CUDA, float32 results.

    Frozen features are extracted once and cached, so this is the one place the
    extraction precision is decided; results are cast back to float32 for storage.
    """
    device = next(encoder.parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = encoder(x.to(device), hidden_states=hidden_states)
    cast = lambda t: None if t is None else t.float()  # noqa: E731
    return EncoderOutput(cast(out.global_embedding), cast(out.patch_tokens), out.grid,
                         None if out.hidden_states is None else [cast(h) for h in out.hidden_states])
