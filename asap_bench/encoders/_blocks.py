"""Transformer pieces shared by the ViT families (vit3d, hlip_vit).

The module and parameter names are timm's (``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), because every published
checkpoint these families load was saved from a timm ``Block``: SimCroP/ASAP's
``timm.models.vision_transformer.VisionTransformer``, Hi-End-MAE's
``MAEViTEncoder`` (timm ``Block``) and HLIP's timm ``VisionTransformer``.
No dropout or drop-path: the harness runs these encoders for features.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """timm multi-head self-attention; ``fused`` picks scaled_dot_product_attention or explicit softmax."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            # The reference path (timm's non-fused branch): kept to check and time the fused kernel.
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, timm layout (no layer scale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def make_blocks(arch: dict, dim: int) -> nn.ModuleList:
    """The ``blocks`` list from a card's architecture (depth, num_heads, mlp_ratio, qkv_bias, norm_eps)."""
    return nn.ModuleList(
        Block(dim, int(arch["num_heads"]), float(arch.get("mlp_ratio", 4.0)), bool(arch.get("qkv_bias", True)),
              float(arch.get("norm_eps", 1e-6)))
        for _ in range(int(arch["depth"])))


def set_fused_attention(module: nn.Module, enabled: bool) -> None:
    for m in module.modules():
        if isinstance(m, Attention):
            m.fused = bool(enabled)


def init_timm_(module: nn.Module) -> None:
    """timm's VisionTransformer initialisation: trunc-normal(0.02) linear weights, zero biases, unit LayerNorms.

    Conv layers keep PyTorch's default, as in SimCroP's ViT, whose Conv3d patch
    embedding is created after timm has initialised the model.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resample_grid(table: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling of a ``[1, g0, g1, g2, C]`` position table to ``[1, *grid, C]``.

    ``align_corners=False``, as HLIP's ``resample_3d_posemb`` does.
    """
    grid = tuple(int(g) for g in grid)
    if tuple(table.shape[1:4]) == grid:
        return table
    dtype = table.dtype
    out = F.interpolate(table.float().permute(0, 4, 1, 2, 3), size=grid, mode="trilinear", align_corners=False)
    return out.permute(0, 2, 3, 4, 1).to(dtype).contiguous()


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE's 1D sin-cos table: ``[sin(p * w), cos(p * w)]`` with ``w = 10000 ** (-i / (dim / 2))``."""
    if dim % 2:
        raise ValueError(f"a 1D sin-cos table needs an even size, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def grid_tokens(grid: Sequence[int]) -> int:
    return math.prod(int(g) for g in grid)


def patch_geometry(arch: dict) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(img_size, patch_size, token grid) of a ViT architecture, in the card's axis order."""
    img = tuple(int(v) for v in arch["img_size"])
    patch = tuple(int(v) for v in arch["patch_size"])
    return img, patch, tuple(i // p for i, p in zip(img, patch))
