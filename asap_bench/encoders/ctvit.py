"""CT-CLIP's image encoder (CTViT), rebuilt under CT-CLIP's own key names.

Rebuilt from the public code (github.com/ibrahimethemhamamci/CT-CLIP,
``transformer_maskgit/transformer_maskgit/{ctvit,attention}.py``) and the
vector quantiser it pins (vector-quantize-pytorch 1.1.2). Only the encoder path
CT-CLIP uses is kept: ``CTCLIP.forward`` calls
``visual_transformer(image, return_encoded_tokens=True)``, i.e. patch embedding,
the spatial transformer, the temporal transformer and the VQ layer, whose
quantised tokens are what CT-CLIP pools. The decoder heads of the published
checkpoint (``to_pixels*``, ``to_patch_emb_first_frame``) are not built; the
card ignores them.

The original's quirks are kept on purpose, because the published weights were
trained with them: keys and values come from the attention input *before* its
LayerNorm (only queries are normalised); the temporal transformer's PEG reshapes
its ``(b h w) t`` tokens as ``b t h w`` without reordering them; queries and keys
are L2-normalised, rescaled per channel and multiplied by a fixed scale of 8.
At inference the VQ layer is deterministic: each token is replaced by the
codebook row of highest cosine similarity (the stored row, not re-normalised).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

from .base import Encoder, EncoderOutput
from .card import EncoderCard


class BiasFreeLayerNorm(nn.Module):
    """LayerNorm with a learned gain and a fixed zero bias (a buffer, so ``beta`` is in the state dict)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def feed_forward(dim: int, mult: float = 4) -> nn.Sequential:
    """Pre-norm GEGLU MLP; the indices (0 norm, 1 in, 4 out) are the published key names."""
    inner = int(mult * (2 / 3) * dim)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner * 2, bias=False),
        GEGLU(),
        nn.Dropout(0.0),
        nn.Linear(inner, dim, bias=False),
    )


class PEG(nn.Module):
    """Position-generating depthwise 3D convolution, causal (front-padded) along the first token axis."""

    def __init__(self, dim: int, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        original = x.shape
        # A plain reshape, not a permutation: for the temporal transformer this
        # reads (b h w) t tokens as b t h w, exactly as the published model does.
        volume = x.reshape(*shape, -1).permute(0, 4, 1, 2, 3)
        front = (2, 0) if self.causal else (1, 1)
        volume = F.pad(volume, (1, 1, 1, 1, *front), value=0.0)
        volume = self.dsconv(volume)
        return volume.permute(0, 2, 3, 4, 1).reshape(original)


class Attention(nn.Module):
    """CTViT self-attention: cosine-similarity attention with learned q/k scales and a fixed scale of 8."""

    def __init__(self, dim: int, dim_head: int, heads: int, scale: float = 8.0):
        super().__init__()
        self.heads = heads
        self.scale = scale
        inner = dim_head * heads
        self.norm = BiasFreeLayerNorm(dim)
        self.context_norm = BiasFreeLayerNorm(dim)  # unused without context; part of the published keys
        self.null_kv = nn.Parameter(torch.randn(heads, 0, dim_head))  # zero null key/values in CTViT
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.fused = True

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.null_kv.numel():
            raise NotImplementedError("CTViT's self-attention has no null key/values")
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(x).chunk(2, dim=-1)  # from the un-normalised input, as published
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        bias = None if attn_bias is None else attn_bias.to(q.dtype)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
            if bias is not None:
                sim = sim + bias
            out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FactorisedTransformer(nn.Module):
    """One axis of CTViT's factorised encoder: per layer ``[PEG, self-attention, (no cross-attention), MLP]``.

    Slot 2 (cross-attention) is empty in CTViT; it is kept as ``None`` so the
    MLP stays at index 3, as in the published keys.
    """

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, ff_mult: float = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PEG(dim, causal=True), Attention(dim, dim_head, heads), None, feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm_out = BiasFreeLayerNorm(dim)

    def forward(self, x: torch.Tensor, video_shape: tuple[int, int, int, int], attn_bias: torch.Tensor | None = None,
                hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        for peg, attn, _, ff in self.layers:
            x = peg(x, video_shape) + x
            x = attn(x, attn_bias=attn_bias) + x
            x = ff(x) + x
            if hidden is not None:
                hidden.append(x)
        return self.norm_out(x)


class ContinuousPositionBias(nn.Module):
    """Per-head attention bias from an MLP over log-scaled 2D offsets between spatial tokens."""

    def __init__(self, dim: int, heads: int, layers: int = 2):
        super().__init__()
        self.net = nn.ModuleList([nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1))])
        for _ in range(layers - 1):
            self.net.append(nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)))
        self.net.append(nn.Linear(dim, heads))

    def forward(self, height: int, width: int) -> torch.Tensor:
        """Bias ``[heads, (h w), (h w)]``.

        The MLP runs once per distinct offset ((2h-1)(2w-1) rows) and is then
        gathered, instead of once per token pair as in the original: the same
        values, without a [(h w), (h w), dim] intermediate (1.2 GB at 24 x 24).
        """
        device = self.net[-1].weight.device
        dy = torch.arange(-(height - 1), height, device=device, dtype=torch.float32)
        dx = torch.arange(-(width - 1), width, device=device, dtype=torch.float32)
        offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape(-1, 2)
        table = torch.sign(offsets) * torch.log(offsets.abs() + 1)
        for layer in self.net:
            table = layer(table)
        ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        index = (ys[:, None] - ys[None, :] + height - 1) * (2 * width - 1) + (xs[:, None] - xs[None, :] + width - 1)
        return table[index].permute(2, 0, 1)


class CosineCodebook(nn.Module):
    """The codebook buffers of vector-quantize-pytorch 1.1.2's CosineSimCodebook (one codebook)."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        weight = torch.empty(1, codebook_size, dim)
        nn.init.kaiming_uniform_(weight)
        self.register_buffer("initted", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))
        self.register_buffer("embed", F.normalize(weight, dim=-1))


class VectorQuantizer(nn.Module):
    """Inference of CTViT's ``VectorQuantize(dim, codebook_size, use_cosine_sim=True)``: nearest code by cosine.

    The codebook is never updated here (the harness encoders are frozen).
    """

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self._codebook = CosineCodebook(dim, codebook_size)

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        codes = F.normalize(self._codebook.embed[0], dim=-1)
        sim = torch.einsum("bnd,cd->bnc", F.normalize(x.float(), dim=-1), codes)
        return sim.argmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._codebook.embed[0][self.indices(x)]


class CTViT(Encoder):
    """CTViT encoder: tokens of ``dim`` on a (slices, x, y) grid, quantised by the VQ codebook."""

    family = "ctvit"
    patch_embedding_keys = ("to_patch_emb.",)  # no position table: PEG convolutions and a continuous bias

    def __init__(self, card: EncoderCard, variant: str = "native"):
        super().__init__(card, variant)
        arch: dict[str, Any] = self.arch
        if card.global_pool != "mean":
            raise ValueError(f"ctvit pools 'mean', card {card.name!r} asks {card.global_pool!r}")
        pt, ph, pw = (int(p) for p in arch["patch_size"])
        if ph != pw:
            raise ValueError(f"CTViT uses square spatial patches, got patch_size {list(arch['patch_size'])}")
        dim, heads, dim_head = int(arch["embed_dim"]), int(arch["heads"]), int(arch["dim_head"])
        channels = int(arch.get("in_chans", 1))
        patch_dim = channels * pt * ph * pw
        self.grid = tuple(int(i) // int(p) for i, p in zip(arch["img_size"], arch["patch_size"]))
        self.spatial_rel_pos_bias = ContinuousPositionBias(dim, heads)
        self.to_patch_emb = nn.Sequential(
            Rearrange("b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)", pt=pt, p1=ph, p2=pw),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.enc_spatial_transformer = FactorisedTransformer(dim, int(arch["spatial_depth"]), dim_head, heads)
        self.enc_temporal_transformer = FactorisedTransformer(dim, int(arch["temporal_depth"]), dim_head, heads)
        self.vq = VectorQuantizer(dim, int(arch["codebook_size"]))
        self.fused_attention = True

    def set_fused_attention(self, enabled: bool) -> None:
        """scaled_dot_product_attention (default) or the explicit softmax; equal within float tolerance."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = bool(enabled)
        self.fused_attention = bool(enabled)

    def encode_tokens(self, x: torch.Tensor, hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The encoder output before quantisation, ``[B, t, h, w, dim]``; per-layer outputs go to ``hidden``."""
        tokens = self.to_patch_emb(x)
        b, t, h, w, _ = tokens.shape
        video_shape = (b, t, h, w)
        bias = self.spatial_rel_pos_bias(h, w)
        spatial_hidden: list[torch.Tensor] | None = [] if hidden is not None else None
        tokens = rearrange(tokens, "b t h w d -> (b t) (h w) d")
        tokens = self.enc_spatial_transformer(tokens, video_shape, attn_bias=bias, hidden=spatial_hidden)
        tokens = rearrange(tokens, "(b t) (h w) d -> (b h w) t d", b=b, h=h, w=w)
        temporal_hidden: list[torch.Tensor] | None = [] if hidden is not None else None
        tokens = self.enc_temporal_transformer(tokens, video_shape, hidden=temporal_hidden)
        if hidden is not None:
            hidden.extend(rearrange(s, "(b t) n d -> b (t n) d", b=b) for s in spatial_hidden or [])
            hidden.extend(rearrange(s, "(b h w) t d -> b (t h w) d", b=b, h=h, w=w) for s in temporal_hidden or [])
        return rearrange(tokens, "(b h w) t d -> b t h w d", b=b, h=h, w=w)

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        hidden: list[torch.Tensor] | None = [] if hidden_states else None
        tokens = self.encode_tokens(x, hidden)
        flat = tokens.flatten(1, 3)  # (t h w) order, as CTViT packs them for the quantiser
        quantised = self.vq(flat).to(flat.dtype)
        return EncoderOutput(global_embedding=quantised.mean(dim=1), patch_tokens=quantised, grid=self.grid,
                             hidden_states=hidden)
