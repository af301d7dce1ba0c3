"""PCRLv2's 3D U-Net encoder (family ``unet3d_encoder``).

Rebuilt after RL4M/PCRLv2 ``models/pcrlv2_model_3d.py`` (``PCRLv23d``): four
``DownTransition`` stages, each two ``LUConv`` layers (3x3x3 convolution with bias,
batch norm, ReLU) going ``in -> b*2^d -> b*2^(d+1)`` channels (b = 32), with a 2x
max-pool before every stage but the first. The stages keep the published names
``down_tr64``, ``down_tr128``, ``down_tr256``, ``down_tr512`` (named after the
native widths, also in smaller variants) and the sub-keys ``ops.N.conv1.*`` /
``ops.N.bn1.*``, so ``torch.load(path)["state_dict"]`` loads by name; the decoder
(``up_tr*``, ``out_tr``) is not rebuilt.

Outputs: global = average pool of the ``down_tr512`` output (the module's own
``avg_pool``); patch tokens = that bottleneck flattened to [B, N, C] with its grid;
``hidden_states`` = the four stage outputs (the U-Net skips) flattened the same
way, with grids ``stage_grids(spatial)``. Axes are the tensor's, in the card's order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._resnet import Triple, stages_output, triple
from .base import Encoder, EncoderOutput
from .card import EncoderCard


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm3d(channels, momentum=0.1, affine=True)
    if kind == "gn":
        return nn.GroupNorm(num_groups=8, num_channels=channels, eps=1e-5, affine=True)
    if kind == "in":
        return nn.InstanceNorm3d(channels, momentum=0.1, affine=True)
    raise ValueError(f"normalization {kind!r} is not one of bn, gn, in")


def _act(kind: str, channels: int) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "elu":
        return nn.ELU(inplace=True)
    raise ValueError(f"activation {kind!r} is not one of relu, prelu, elu")


class LUConv(nn.Module):
    """3x3x3 convolution, normalisation, activation (attribute names as published)."""

    def __init__(self, in_chans: int, out_chans: int, act: str, norm: str):
        super().__init__()
        self.conv1 = nn.Conv3d(in_chans, out_chans, kernel_size=3, padding=1)
        self.bn1 = _norm(norm, out_chans)
        self.activation = _act(act, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    def __init__(self, in_chans: int, width: int, act: str, norm: str):
        super().__init__()
        self.ops = nn.Sequential(LUConv(in_chans, width, act, norm), LUConv(width, width * 2, act, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x)


class UNet3DEncoder(Encoder):
    family = "unet3d_encoder"

    @classmethod
    def input_multiple(cls, arch: dict) -> tuple[int, int, int]:
        """Each 2x max-pool floors: an axis not divisible by 2^(stages-1) loses its last voxels."""
        factor = 2 ** (int(arch.get("stages", 4)) - 1)
        return (factor, factor, factor)

    @classmethod
    def token_stride(cls, arch: dict) -> tuple[int, int, int]:
        return cls.input_multiple(arch)

    def __init__(self, card: EncoderCard, variant: str = "native"):
        super().__init__(card, variant)
        a = self.arch
        base = int(a.get("base_channels", 32))
        stages = int(a.get("stages", 4))
        act, norm = str(a.get("act", "relu")), str(a.get("norm", "bn"))
        self.maxpool = nn.MaxPool3d(2)
        self.stage_names: list[str] = []
        chans = int(a.get("in_chans", 1))
        for depth in range(stages):
            name = f"down_tr{64 * 2 ** depth}"
            setattr(self, name, DownTransition(chans, base * 2 ** depth, act, norm))
            self.stage_names.append(name)
            chans = base * 2 ** (depth + 1)
        if chans != self.embed_dim:
            raise ValueError(f"encoder {card.name!r} ({variant}): the bottleneck has {chans} channels "
                             f"(base_channels x 2^stages), but embed_dim is {self.embed_dim}")

    def stage_grids(self, spatial: Sequence[int]) -> list[Triple]:
        """Grid of each hidden state for an input of ``spatial``: halved (floor) before every stage but the first."""
        grid = triple(spatial)
        grids = [grid]
        for _ in self.stage_names[1:]:
            grid = tuple(n // 2 for n in grid)  # type: ignore[assignment]
            grids.append(grid)
        return grids

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        stages = []
        for i, name in enumerate(self.stage_names):
            x = getattr(self, name)(x if i == 0 else self.maxpool(x))
            stages.append(x)
        return stages_output(stages, hidden_states)
