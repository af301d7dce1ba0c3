"""A small 3D vision transformer written against asap-bench's Encoder interface.

It is deliberately plain torch: a Conv3d patch embedding, a CLS token, learned
position embeddings, pre-norm transformer blocks and a final LayerNorm. What
asap-bench needs from any encoder is ``encode(x) -> EncoderOutput``: a global
embedding, the patch tokens with their grid, and (when asked) per-block hidden
states.
"""

from __future__ import annotations

import torch
from torch import nn

from asap_bench.encoders.base import Encoder, EncoderOutput


class TinyViT(Encoder):
    family = "tiny_vit"  # the card's ``family`` field names this class

    def __init__(self, card, variant: str = "native"):
        super().__init__(card, variant)
        arch = self.arch  # the card's architecture with the variant's overrides applied
        dim, patch = arch["embed_dim"], tuple(arch["patch_size"])
        self.grid = tuple(i // p for i, p in zip(arch["img_size"], patch))
        n_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_embed = nn.Conv3d(arch["in_chans"], dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, arch["num_heads"], dim * arch["mlp_ratio"], dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(arch["depth"]))
        self.norm = nn.LayerNorm(dim)

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D], first grid axis slowest
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        states = []
        for block in self.blocks:
            tokens = block(tokens)
            states.append(tokens[:, 1:])
        tokens = self.norm(tokens)
        return EncoderOutput(global_embedding=tokens[:, 0], patch_tokens=tokens[:, 1:], grid=self.grid,
                             hidden_states=states if hidden_states else None)
