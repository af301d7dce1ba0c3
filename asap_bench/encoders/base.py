"""The one encoder interface every architecture implements.

An ``Encoder`` is a torch module built from an encoder card (and a size
variant). It takes a batch laid out as the card's InputSpec says
(``[B, C, *spec.tensor_size()]``) and returns an ``EncoderOutput``: a global
embedding for linear probes and prognosis, patch tokens with their grid for the
vision-language heads, and per-block hidden states for a UNETR decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..schema import content_hash
from .card import EncoderCard, InputSpec, base_variant


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

    The class methods describe the geometry from a card architecture alone, so an
    input is checked before any module is made: what each tensor axis must be a
    multiple of, how many voxels a token spans, and what kind of position table
    the module has. ``rebuilt_keys`` names the tensors a fitted variant builds
    afresh instead of loading (see ``encoders.fit``).
    """

    family: ClassVar[str]
    patch_embedding_keys: ClassVar[tuple[str, ...]] = ()  # state-dict prefixes of the patch embedding
    position_keys: ClassVar[tuple[str, ...]] = ()  # state-dict keys of grid-bound position tables

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

    @classmethod
    def input_multiple(cls, arch: dict[str, Any]) -> tuple[int, int, int]:
        """What each tensor axis (in axis order) must be a multiple of for every voxel to reach a token.

        A patch embedding drops the remainder of an axis that its patch does not divide.
        """
        patch = arch.get("patch_size")
        return tuple(int(p) for p in patch) if patch else (1, 1, 1)  # type: ignore[return-value]

    @classmethod
    def token_stride(cls, arch: dict[str, Any]) -> tuple[int, int, int] | None:
        """Voxels per token along each axis (the token grid is the input divided by it); None = not fixed."""
        patch = arch.get("patch_size")
        return tuple(int(p) for p in patch) if patch else None  # type: ignore[return-value]

    @classmethod
    def position_table(cls, arch: dict[str, Any]) -> str:
        """'learned': a table carried by the checkpoint and bound to its grid; 'fixed': a formula, rebuilt for
        any grid; 'none': no table tied to the grid."""
        return "none"

    def published_grid(self, n_tokens: int) -> tuple[int, ...] | None:
        """The token grid of a checkpoint position table with ``n_tokens`` slots, from the count alone.

        First the published size variants of this card (native first) whose grid has that
        many tokens; failing those, this module's grid scaled uniformly, or a cube. None
        when nothing fits; an error when several distinct grids do.
        """
        from .checkpoints import CheckpointError

        published = {}
        for variant in ["native", *self.card.sizes]:
            grid = token_grid(self.card.architecture_for(variant)) if variant == base_variant(variant) else None
            if grid is not None and math.prod(grid) == n_tokens:
                published.setdefault(grid, variant)
        found = list(published)
        if not found:
            own = token_grid(self.arch) or ()
            guesses = []
            if own:
                ratio = (n_tokens / math.prod(own)) ** (1 / 3)
                guesses.append(tuple(max(1, round(g * ratio)) for g in own))  # same aspect as this module
            side = max(1, round(n_tokens ** (1 / 3)))
            guesses.append((side, side, side))  # SimCroP's assumption
            found = [g for g in dict.fromkeys(guesses) if math.prod(g) == n_tokens]
        if len(found) > 1:
            named = ", ".join(f"{'x'.join(map(str, g))}" + (f" ({published[g]})" if g in published else "")
                              for g in found)
            raise CheckpointError(f"encoder {self.card.name!r}: a position table of {n_tokens} tokens fits several "
                                  f"grids ({named}); the source grid is ambiguous, so it is not resampled")
        return found[0] if found else None

    def rebuilt_keys(self) -> list[str]:
        """Module keys a checkpoint of the published size does not fill, because this fitted variant rebuilt them.

        A changed patch size rebuilds the patch embedding and the position table; a fixed
        (formula) table on another grid is rebuilt for its grid. Published variants rebuild nothing.
        """
        source_variant = base_variant(self.variant)
        if source_variant == self.variant:
            return []
        source = self.card.architecture_for(source_variant)
        prefixes: tuple[str, ...] = ()
        if source.get("patch_size") != self.arch.get("patch_size"):
            prefixes = self.patch_embedding_keys + self.position_keys
        elif self.position_table(self.arch) == "fixed" and token_grid(source) != token_grid(self.arch):
            prefixes = self.position_keys
        return sorted(k for k in self.state_dict() if prefixes and k.startswith(prefixes))

    def set_fused_attention(self, enabled: bool) -> None:
        """Switch scaled_dot_product_attention on or off (benchmarks); no-op without attention."""


def token_grid(arch: dict[str, Any]) -> tuple[int, ...] | None:
    """img_size // patch_size of a patch-based architecture (axis order); None without both."""
    img, patch = arch.get("img_size"), arch.get("patch_size")
    if not img or not patch:
        return None
    return tuple(int(i) // int(p) for i, p in zip(img, patch))


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
