"""The 3D ViT of the ASAP/SimCroP code (family ``vit3d``): ASAP, SimCroP, the re-trained MAE/M3AE/MRM, Random init, Hi-End-MAE.

Layout, checked against SimCroP's Down-stream/Classification_Linear/models_vit.py
and ASAP's Pre-training-ASAP code (SimCroP is its conference version and the
paper says all these rows share one ViT-B):

- ``patch_embed.proj``: a Conv3d with kernel = stride = patch size over the
  ``[B, C, *img_size]`` tensor. SimCroP patchifies in (h, w, d) order and runs the
  Conv3d per patch, which gives the same tokens in the same (first-axis-major) order;
  so does Hi-End-MAE's ``patchify_image`` + ``PatchEmbed3D``.
- ``cls_token`` (when the card has one) is prepended before ``pos_embed`` is added;
  ``pos_embed`` then has a zero CLS slot.
- ``blocks.N``: timm blocks (see ``_blocks``); ``norm``: final LayerNorm.

Outputs. ``global`` for ``global_pool: mean`` is SimCroP's linear-probe recipe
(``global_pool=True``): the last block's patch tokens (no CLS) averaged, then a
freshly initialised LayerNorm (``fc_norm``, weight 1, bias 0, so a non-affine
layer norm here) in place of the checkpoint's ``norm``; for ``global_pool: cls`` it
is ``norm`` applied to the CLS token. ``patch_tokens`` are ``norm(x)`` without the
CLS (the pre-trained encoder's output, as MAE-style encoders return it).
``hidden_states`` are the raw outputs of every block without the CLS, as SimCroP's
UNETR takes them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import grid_tokens, init_timm_, make_blocks, patch_geometry, resample_grid, set_fused_attention
from .base import Encoder, EncoderOutput
from .card import EncoderCard

# sincos_fixed: SimCroP's fixed table; learned: trunc-normal init; zeros: a frozen all-zero table, as the
# ASAP benchmark's ViT has it (``--pretrained_path random`` never fills it)
POS_KINDS = ("sincos_fixed", "learned", "zeros")

def simcrop_sincos_table(grid: Sequence[int], dim: int) -> torch.Tensor:
    """SimCroP's fixed "3D" sin-cos table, ``[prod(grid), dim]``, as its code builds it.

    Transcribed in behaviour from ``create_sin_cos_position_embedding`` in SimCroP's
    utils/pos_embed.py (Down-stream/Segmentation) and utils/pos_embed_utils.py
    (Classification_Linear): even channels are ``sin(h * div)``, odd channels
    ``cos(w * div)`` with ``div = exp(-2i * ln(10000) / dim)``; the third grid axis
    (d) does not enter, so tokens that differ only in d share a position code. That is
    the public code's behaviour and is kept so a randomly initialised ViT matches
    theirs. SimCroP only builds it for cubic grids (``to_3tuple(round(N ** (1/3)))``);
    here each axis uses its own length, which is identical on a cube.
    """
    gh, gw, gd = (int(g) for g in grid)
    if dim % 2:
        raise ValueError(f"the SimCroP sin-cos table needs an even embed_dim, got {dim}")
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * -(math.log(10000.0) / dim))
    pe = torch.zeros(gh, gw, gd, dim, dtype=torch.float64)
    pe[..., 0::2] = torch.sin(torch.arange(gh, dtype=torch.float64)[:, None, None, None] * div)
    pe[..., 1::2] = torch.cos(torch.arange(gw, dtype=torch.float64)[None, :, None, None] * div)
    return pe.reshape(gh * gw * gd, dim).float()


class PatchEmbed3D(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, patch_size: Sequence[int]):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=tuple(patch_size), stride=tuple(patch_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        x = self.proj(x)
        grid = tuple(int(g) for g in x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid  # type: ignore[return-value]


class ViT3D(Encoder):
    """timm-style 3D ViT with the ASAP/SimCroP key names (cls_token, pos_embed, patch_embed.proj, blocks.N, norm)."""

    family = "vit3d"
    patch_embedding_keys = ("patch_embed.",)
    position_keys = ("pos_embed",)

    @classmethod
    def position_table(cls, arch: dict) -> str:
        """SimCroP's sin-cos table and the all-zero one are formulas ('fixed'); a learned one is bound to its grid."""
        return "fixed" if arch.get("pos_embed", "sincos_fixed") in ("sincos_fixed", "zeros") else "learned"

    def __init__(self, card: EncoderCard, variant: str = "native"):
        super().__init__(card, variant)
        arch = self.arch
        self.img_size, self.patch_size, self.grid = patch_geometry(arch)
        dim = self.embed_dim
        self.eps = float(arch.get("norm_eps", 1e-6))
        self.num_prefix_tokens = 1 if arch.get("cls_token", True) else 0
        self.pos_kind = arch.get("pos_embed", "sincos_fixed")
        if self.pos_kind not in POS_KINDS:
            raise ValueError(f"card {card.name!r}: pos_embed must be one of {', '.join(POS_KINDS)}, got {self.pos_kind!r}")
        self.global_pool = card.global_pool
        if self.global_pool not in ("mean", "cls") or (self.global_pool == "cls" and not self.num_prefix_tokens):
            raise ValueError(f"card {card.name!r}: global_pool {self.global_pool!r} is not available "
                             f"(cls_token {bool(self.num_prefix_tokens)}); use 'mean', or 'cls' with a cls_token")

        if self.num_prefix_tokens:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # The fixed table stays a parameter (requires_grad False), as in SimCroP/MAE, so it is a state-dict entry.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid_tokens(self.grid), dim),
                                      requires_grad=self.pos_kind == "learned")
        self.patch_embed = PatchEmbed3D(int(arch.get("in_chans", 1)), dim, self.patch_size)
        self.blocks = make_blocks(arch, dim)
        self.norm = nn.LayerNorm(dim, eps=self.eps)
        self._init_weights()

    def _init_weights(self) -> None:
        init_timm_(self)
        if self.num_prefix_tokens:
            nn.init.normal_(self.cls_token, std=1e-6)  # timm
        with torch.no_grad():
            if self.pos_kind == "sincos_fixed":
                self.pos_embed.zero_()
                self.pos_embed[0, self.num_prefix_tokens:] = simcrop_sincos_table(self.grid, self.embed_dim)
            elif self.pos_kind == "learned":
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            else:  # "zeros": a frozen all-zero table
                self.pos_embed.zero_()

    def set_fused_attention(self, enabled: bool) -> None:
        set_fused_attention(self, enabled)

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        p = self.num_prefix_tokens
        x, grid = self.patch_embed(x)
        if p:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        states: list[torch.Tensor] = []
        for block in self.blocks:
            x = block(x)
            if hidden_states:
                states.append(x[:, p:].contiguous())
        normed = self.norm(x)
        if self.global_pool == "mean":
            pooled = F.layer_norm(x[:, p:].mean(dim=1), (x.shape[-1],), eps=self.eps)
        else:
            pooled = normed[:, 0]
        return EncoderOutput(global_embedding=pooled, patch_tokens=normed[:, p:], grid=grid,
                             hidden_states=states if hidden_states else None)

    # --- checkpoints made for another input size ---------------------------------------

    def adapt_tensor(self, key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
        """Resample ``pos_embed`` trilinearly from the checkpoint's token grid to this module's; CLS slot kept.

        The checkpoint grid comes from the tensor's token count and the card's published
        sizes (``published_grid``); a count that fits none, or several, is refused.
        """
        p = self.num_prefix_tokens
        if key != "pos_embed" or tensor.ndim != 3 or len(shape) != 3 or tensor.shape[-1] != shape[-1]:
            return None
        n_old = tensor.shape[1] - p
        old = self.published_grid(n_old) if n_old > 0 else None
        if old is None:
            return None
        table = tensor[:, p:].reshape(1, *old, tensor.shape[-1])
        new = resample_grid(table, self.grid).reshape(1, -1, tensor.shape[-1])
        out = torch.cat([tensor[:, :p], new], dim=1)
        return out if tuple(out.shape) == tuple(shape) else None
