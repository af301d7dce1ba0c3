"""UNETR whose transformer is the encoder's own ViT, built from MONAI's UNETR decoder blocks.

``monai.networks.nets.UNETR`` builds its own ``ViT``; here the ViT is the
benchmarked encoder (with its checkpoint weights), and the decoder is MONAI's
blocks wired exactly as ``UNETR.forward`` wires them: a convolutional stem on the
input (``UnetrBasicBlock``), three skip paths from intermediate hidden states
(``UnetrPrUpBlock`` with 2, 1 and 0 extra up-sampling layers), four
``UnetrUpBlock``s from the deepest tokens back to full resolution, and a 1x1x1
``UnetOutBlock``.

MONAI's UNETR assumes a patch size of 16 on every axis (four 2x up-samplings).
Encoders here have other patches (16x16x8, 12, 4x16x16, ...), so each axis gets
its own factors: the three deepest up-samplings share one factor ``a`` per axis
(``UnetrPrUpBlock`` repeats a single kernel) and the last one is ``patch / a**3``;
``a`` is 2 where ``patch`` is divisible by 8, else 1. A 16x16x8 patch thus uses
(2, 2, 2) three times then (2, 2, 1).

``feature_blocks`` are 1-based block numbers (the protocol's [3, 6, 9, 12]); the
first three feed the skip paths and the last is the deepest feature. When the
last is the final block the encoder's normalised patch tokens are used, as
MONAI's UNETR uses its ViT's normalised output.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..encoders.base import Encoder


def upsample_factors(patch: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shared factor of the three deep up-samplings, factor of the last) per axis; products = patch."""
    shared = tuple(2 if p % 8 == 0 else 1 for p in patch)
    last = tuple(p // a ** 3 for p, a in zip(patch, shared))
    return shared, last


def scale_blocks(feature_blocks: Sequence[int], depth: int) -> list[int]:
    """Feature blocks for an encoder of ``depth`` blocks: as given when they fit, else evenly rescaled."""
    blocks = [int(b) for b in feature_blocks]
    if len(blocks) != 4:
        raise ValueError(f"feature_blocks needs 4 block numbers (3 skips and the deepest), got {blocks}")
    if all(1 <= b <= depth for b in blocks):
        return blocks
    reference = max(blocks)
    return [min(depth, max(1, math.ceil(b * depth / reference))) for b in blocks]


def _vit_geometry(encoder: Encoder) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    arch = encoder.arch
    missing = [k for k in ("img_size", "patch_size", "depth") if k not in arch]
    if missing:
        raise ValueError(f"encoder {encoder.card.name!r} is not a plain ViT (architecture lacks {missing}); "
                         "UNETR needs a token grid and per-block hidden states")
    img = tuple(int(v) for v in arch["img_size"])
    patch = tuple(int(v) for v in arch["patch_size"])
    return img, patch, int(arch["depth"]), int(arch.get("in_chans", encoder.card.input.channels))


class EncoderUNETR(nn.Module):
    """UNETR decoder (MONAI blocks) around an ``Encoder`` that returns per-block hidden states."""

    def __init__(self, encoder: Encoder, out_channels: int, feature_blocks: Sequence[int] = (3, 6, 9, 12),
                 feature_size: int = 16, norm_name: str = "instance", res_block: bool = True):
        super().__init__()
        self.encoder = encoder
        self.out_channels = int(out_channels)
        self.img_size, self.patch, depth, self.in_channels = _vit_geometry(encoder)
        self.feature_blocks = scale_blocks(feature_blocks, depth)
        self.use_norm_last = self.feature_blocks[-1] == depth
        hidden = encoder.embed_dim
        a, last = upsample_factors(self.patch)
        fs = feature_size
        common = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name)
        self.encoder1 = UnetrBasicBlock(in_channels=self.in_channels, out_channels=fs, stride=1, res_block=res_block,
                                        **common)
        self.encoder2 = UnetrPrUpBlock(in_channels=hidden, out_channels=fs * 2, num_layer=2, stride=1,
                                       upsample_kernel_size=a, conv_block=True, res_block=res_block, **common)
        self.encoder3 = UnetrPrUpBlock(in_channels=hidden, out_channels=fs * 4, num_layer=1, stride=1,
                                       upsample_kernel_size=a, conv_block=True, res_block=res_block, **common)
        self.encoder4 = UnetrPrUpBlock(in_channels=hidden, out_channels=fs * 8, num_layer=0, stride=1,
                                       upsample_kernel_size=a, conv_block=True, res_block=res_block, **common)
        self.decoder5 = UnetrUpBlock(in_channels=hidden, out_channels=fs * 8, upsample_kernel_size=a,
                                     res_block=res_block, **common)
        self.decoder4 = UnetrUpBlock(in_channels=fs * 8, out_channels=fs * 4, upsample_kernel_size=a,
                                     res_block=res_block, **common)
        self.decoder3 = UnetrUpBlock(in_channels=fs * 4, out_channels=fs * 2, upsample_kernel_size=a,
                                     res_block=res_block, **common)
        self.decoder2 = UnetrUpBlock(in_channels=fs * 2, out_channels=fs, upsample_kernel_size=last,
                                     res_block=res_block, **common)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=fs, out_channels=out_channels)

    def enable_gradient_checkpointing(self) -> int:
        """Recompute each transformer block in the backward pass (activation memory for compute).

        The block's ``forward`` is wrapped in place, so module names and the state dict
        are unchanged; returns the number of blocks wrapped.
        """
        blocks = getattr(self.encoder, "blocks", None)
        if blocks is None:
            return 0
        for block in blocks:
            inner = block.forward

            def wrapped(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            block.forward = wrapped
        return len(blocks)

    def _grid(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        b, n, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(x, hidden_states=True)
        if out.hidden_states is None or out.grid is None:
            raise ValueError(f"encoder {self.encoder.card.name!r} returned no hidden states / token grid")
        states = out.hidden_states
        deepest = out.patch_tokens if self.use_norm_last else states[self.feature_blocks[3] - 1]
        skip2, skip3, skip4 = (self._grid(states[b - 1], out.grid) for b in self.feature_blocks[:3])
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(skip2)
        enc3 = self.encoder3(skip3)
        enc4 = self.encoder4(skip4)
        dec3 = self.decoder5(self._grid(deepest, out.grid), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))
