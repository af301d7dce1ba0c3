"""HLIP's visual trunk (family ``hlip_vit``): a timm ViT whose blocks attend within a slice or over the whole scan.

Behaviour follows ``HLIPVisualEncoder`` in HLIP's src/hlip/visual_encoder.py
(read at commit fe8d764, model ``vit_base_singlescan_h2_token2744``):

- ``patch_embed.proj``: Conv3d (bias) over ``[B, C, d, h, w]``; tokens laid out
  ``[B, d, h, w, C]``. The slice axis d is the first spatial axis of the tensor
  (for the CT-RATE model, z of a SimpleITK array: the card's axis_order DWH).
- ``spatial_posemb`` ``[1, d, h, w, C]`` (fixed, a state-dict entry) is added to the
  patch tokens before the CLS token is prepended (timm ``no_embed_class``); the CLS
  token has no position code.
- Slice-attention blocks see ``[B*d, 1 + h*w, C]``: each slice gets its own copy of
  the CLS token. Switching to scan attention concatenates the slices and averages
  the CLS copies (``_slice2scan``); switching back copies the CLS to every slice
  (``_scan2slice``). After the last block the slices are merged the same way, then
  ``norm``. With one scan per study (``max_num_scans: 1``), HLIP's "study" blocks
  are these scan blocks; multi-scan studies are not supported here.
- open_clip pools with ``timm_pool: token``: the global feature is ``norm(x)[:, 0]``
  (the 512-d projection ``visual.head.proj`` is not part of the encoder).

``hidden_states`` are each block's patch tokens (no CLS) as ``[B, d*h*w, C]``,
whichever layout the block ran in; ``patch_tokens`` are ``norm(x)`` without the CLS.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import init_timm_, make_blocks, patch_geometry, resample_grid, set_fused_attention, sincos_1d
from .base import Encoder, EncoderOutput
from .card import EncoderCard


def hlip_sincos_table(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """HLIP's ``get_3d_sincos_pos_embed`` (pos_embed.py), unflattened: ``[d, h, w, dim]``.

    A third of the channels each for w, h and d, concatenated in that order, each a
    MAE 1D sin-cos table. A checkpoint carries its own table (built from MAE's 2D one
    plus a 1D slice code); this one is for random initialisation.
    """
    if dim % 3 or (dim // 3) % 2:
        raise ValueError(f"HLIP's 3D sin-cos table needs embed_dim divisible by 6, got {dim}")
    d, h, w = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 3, w), sincos_1d(dim // 3, h), sincos_1d(dim // 3, d)], dim=1)
    return emb.reshape(*grid, dim).float()


class HLIPViT(Encoder):
    """HLIP's slice/scan-attention ViT with timm key names (cls_token, spatial_posemb, patch_embed.proj, blocks.N, norm)."""

    family = "hlip_vit"
    patch_embedding_keys = ("patch_embed.",)
    position_keys = ("spatial_posemb",)

    @classmethod
    def position_table(cls, arch: dict) -> str:
        """The checkpoint's own ``spatial_posemb`` (MAE's 2D table plus a slice code): bound to its grid."""
        return "learned"

    def __init__(self, card: EncoderCard, variant: str = "native"):
        super().__init__(card, variant)
        arch = self.arch
        self.img_size, self.patch_size, self.grid = patch_geometry(arch)
        dim, depth = self.embed_dim, int(arch["depth"])
        self.slice_blocks = frozenset(int(i) for i in arch.get("slice_attn_indexes", ()))
        scan_blocks = frozenset(int(i) for i in arch.get("scan_attn_indexes", ()))
        if self.slice_blocks & scan_blocks or (self.slice_blocks | scan_blocks) != set(range(depth)):
            raise ValueError(f"card {card.name!r} ({variant}): slice_attn_indexes {sorted(self.slice_blocks)} and "
                             f"scan_attn_indexes {sorted(scan_blocks)} must split blocks 0..{depth - 1} between them")
        if int(arch.get("max_num_scans", 1)) != 1:
            raise ValueError(f"card {card.name!r}: only single-scan HLIP models (max_num_scans 1) are supported")
        self.num_prefix_tokens = 1 if arch.get("cls_token", True) else 0
        self.global_pool = card.global_pool
        if self.global_pool not in ("cls", "mean") or (self.global_pool == "cls" and not self.num_prefix_tokens):
            raise ValueError(f"card {card.name!r}: global_pool {self.global_pool!r} is not available here")

        if self.num_prefix_tokens:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.spatial_posemb = nn.Parameter(torch.zeros(1, *self.grid, dim), requires_grad=False)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(int(arch.get("in_chans", 1)), dim, kernel_size=self.patch_size,
                                          stride=self.patch_size)
        self.blocks = make_blocks(arch, dim)
        self.norm = nn.LayerNorm(dim, eps=float(arch.get("norm_eps", 1e-6)))

        init_timm_(self)
        with torch.no_grad():
            if self.num_prefix_tokens:
                nn.init.normal_(self.cls_token, std=1e-6)
            self.spatial_posemb.copy_(hlip_sincos_table(self.grid, dim)[None])

    def set_fused_attention(self, enabled: bool) -> None:
        set_fused_attention(self, enabled)

    def _to_scan(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """[B*d, P + L, C] -> [B, P + d*L, C], CLS copies averaged (HLIP's _slice2scan)."""
        p, c = self.num_prefix_tokens, x.shape[-1]
        prefix = x[:, :p].reshape(batch, -1, p, c).mean(dim=1)
        return torch.cat([prefix, x[:, p:].reshape(batch, -1, c)], dim=1)

    def _to_slices(self, x: torch.Tensor, slices: int) -> torch.Tensor:
        """[B, P + d*L, C] -> [B*d, P + L, C], CLS copied to every slice (HLIP's _scan2slice)."""
        p, (b, _, c) = self.num_prefix_tokens, x.shape
        prefix = x[:, None, :p].expand(b, slices, p, c)
        src = x[:, p:].reshape(b, slices, -1, c)
        return torch.cat([prefix, src], dim=2).reshape(b * slices, -1, c)

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        p, batch, slices = self.num_prefix_tokens, x.shape[0], self.grid[0]
        x = self.patch_embed.proj(x).permute(0, 2, 3, 4, 1)  # [B, d, h, w, C]
        x = x + resample_grid(self.spatial_posemb, x.shape[1:4])
        c = x.shape[-1]
        by_slice = 0 in self.slice_blocks
        x = x.reshape(batch * slices, -1, c) if by_slice else x.reshape(batch, -1, c)
        if p:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        states: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            wants_slice = index in self.slice_blocks
            if wants_slice != by_slice:
                x = self._to_slices(x, slices) if wants_slice else self._to_scan(x, batch)
                by_slice = wants_slice
            x = block(x)
            if hidden_states:
                states.append(x[:, p:].reshape(batch, -1, c))
        if by_slice:
            x = self._to_scan(x, batch)
        normed = self.norm(x)
        pooled = normed[:, 0] if self.global_pool == "cls" else normed[:, p:].mean(dim=1)
        return EncoderOutput(global_embedding=pooled, patch_tokens=normed[:, p:], grid=self.grid,  # type: ignore[arg-type]
                             hidden_states=states if hidden_states else None)

    def adapt_tensor(self, key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
        """Resample ``spatial_posemb`` ``[1, d, h, w, C]`` trilinearly to this module's grid, as HLIP does at run time.

        The source grid is the tensor's own shape.
        """
        if key != "spatial_posemb" or tensor.ndim != 5 or len(shape) != 5 or tensor.shape[-1] != shape[-1]:
            return None
        return resample_grid(tensor, tuple(shape[1:4]))
