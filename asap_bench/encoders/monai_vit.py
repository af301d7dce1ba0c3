"""MONAI's 3D ViT, as M3D-CLIP and fVLM published it, under MONAI's own key names.

M3D-CLIP (LaMed/src/model/multimodal_encoder/vit.py) and fVLM
(lavis/models/blip_models/vit.py) both train ``monai.networks.nets.ViT``'s
blocks (MONAI 1.3). The harness module holds MONAI's submodules at the top level
(``patch_embedding``, ``blocks``, ``norm``, ``cls_token``), so their state dicts
load as published, and drops what newer MONAI versions add that those
checkpoints never had (the unused cross-attention slots of each block, the
classification head).
"""

from __future__ import annotations

import inspect
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import ViT
from torch import nn

from .base import Encoder, EncoderOutput
from .card import EncoderCard

_PROJ_TYPES = {"perceptron": "perceptron", "conv": "conv"}
_POS_TYPES = {"learned": "learnable", "learnable": "learnable", "sincos": "sincos", "none": "none"}
POS_EMBED_KEY = "patch_embedding.position_embeddings"


def vit_arguments(arch: dict[str, Any]) -> dict[str, Any]:
    """``monai.networks.nets.ViT`` keyword arguments for a card architecture (sizes in axis order).

    Dropout is 0: the encoders are used frozen, and MONAI's fused attention would
    otherwise apply its dropout even in eval mode.
    """
    proj = arch.get("patch_embed", "conv")
    pos = arch.get("pos_embed", "learned")
    if proj not in _PROJ_TYPES:
        raise ValueError(f"monai_vit: patch_embed must be one of {sorted(_PROJ_TYPES)}, got {proj!r}")
    if pos not in _POS_TYPES:
        raise ValueError(f"monai_vit: pos_embed must be one of {sorted(_POS_TYPES)}, got {pos!r}")
    img, patch = tuple(int(v) for v in arch["img_size"]), tuple(int(v) for v in arch["patch_size"])
    if len(img) != 3 or len(patch) != 3:
        raise ValueError(f"monai_vit: img_size {list(img)} and patch_size {list(patch)} must be 3D")
    embed_dim = int(arch["embed_dim"])
    return dict(
        in_channels=int(arch.get("in_chans", 1)),
        img_size=img,
        patch_size=patch,
        hidden_size=embed_dim,
        mlp_dim=int(round(embed_dim * float(arch.get("mlp_ratio", 4.0)))),
        num_layers=int(arch["depth"]),
        num_heads=int(arch["num_heads"]),
        proj_type=_PROJ_TYPES[proj],
        pos_embed_type=_POS_TYPES[pos],
        classification=bool(arch.get("cls_token", False)),
        dropout_rate=0.0,
        spatial_dims=3,
        qkv_bias=bool(arch.get("qkv_bias", False)),
    )


def _supports_fused_attention() -> bool:
    return "use_flash_attention" in inspect.signature(SABlock.__init__).parameters


def _drop_cross_attention(block: nn.Module) -> None:
    """Remove the cross-attention slots MONAI >= 1.4 creates even when unused (not in MONAI 1.3 checkpoints)."""
    if getattr(block, "with_cross_attention", False):
        return
    for name in ("norm_cross_attn", "cross_attn"):
        if isinstance(getattr(block, name, None), nn.Module):
            setattr(block, name, nn.Identity())


def _grid(arch: dict[str, Any]) -> tuple[int, int, int]:
    return tuple(int(i) // int(p) for i, p in zip(arch["img_size"], arch["patch_size"]))  # type: ignore[return-value]


class MonaiViT(Encoder):
    """A MONAI ViT whose state dict is ``cls_token``, ``patch_embedding.*``, ``blocks.N.*``, ``norm.*``."""

    family = "monai_vit"
    patch_embedding_keys = ("patch_embedding.patch_embeddings",)
    position_keys = (POS_EMBED_KEY,)

    @classmethod
    def position_table(cls, arch: dict[str, Any]) -> str:
        """A learnable table is bound to its grid; MONAI's sin-cos table is rebuilt for any grid."""
        kind = _POS_TYPES.get(arch.get("pos_embed", "learned"), "learnable")
        return {"learnable": "learned", "sincos": "fixed"}.get(kind, "none")

    def __init__(self, card: EncoderCard, variant: str = "native"):
        super().__init__(card, variant)
        if card.global_pool not in ("cls", "mean"):
            raise ValueError(f"monai_vit pools 'cls' or 'mean', card {card.name!r} asks {card.global_pool!r}")
        self.vit_kwargs = vit_arguments(self.arch)
        if card.global_pool == "cls" and not self.vit_kwargs["classification"]:
            raise ValueError(f"card {card.name!r}: global_pool 'cls' needs architecture.cls_token true")
        vit = ViT(**self.vit_kwargs)
        for block in vit.blocks:
            _drop_cross_attention(block)
        self.patch_embedding = vit.patch_embedding
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.has_cls = self.vit_kwargs["classification"]
        if self.has_cls:
            self.cls_token = vit.cls_token
        self.grid = _grid(self.arch)
        self.fused_attention = False
        self.set_fused_attention(True)

    def set_fused_attention(self, enabled: bool) -> None:
        """MONAI's SABlock has no SDPA argument after construction; its ``use_flash_attention`` flag is the switch."""
        enabled = bool(enabled) and _supports_fused_attention()
        for block in self.blocks:
            block.attn.use_flash_attention = enabled
        self.fused_attention = enabled

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        x = self.patch_embedding(x)
        start = 0
        if self.has_cls:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            start = 1
        hidden: list[torch.Tensor] = []
        for block in self.blocks:
            x = block(x)
            if hidden_states:
                hidden.append(x[:, start:])
        x = self.norm(x)
        tokens = x[:, start:]
        pooled = x[:, 0] if self.card.global_pool == "cls" else tokens.mean(dim=1)
        return EncoderOutput(global_embedding=pooled, patch_tokens=tokens, grid=self.grid,
                             hidden_states=hidden if hidden_states else None)

    def adapt_tensor(self, key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
        """Resample a published position embedding to this module's token grid.

        The source grid comes from the tensor's token count and the card's published sizes
        (``published_grid``), never from this module's own architecture. Trilinear, as
        fVLM's own PatchEmbeddingBlock does when its input grid differs.
        """
        if key != POS_EMBED_KEY or tensor.ndim != 3 or len(shape) != 3 or tensor.shape[-1] != shape[-1]:
            return None
        source = self.published_grid(int(tensor.shape[1]))
        if source is None or prod(self.grid) != shape[1]:
            return None
        volume = tensor.float().transpose(1, 2).reshape(1, tensor.shape[-1], *source)
        volume = F.interpolate(volume, size=self.grid, mode="trilinear", align_corners=False)
        return volume.flatten(2).transpose(1, 2).to(tensor.dtype)
