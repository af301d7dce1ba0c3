"""3D ResNet pieces shared by the MedicalNet-style ResNet and Merlin's inflated ResNet.

Both published networks register their stem and stages directly on the top-level
module (``conv1``, ``bn1``, ``layer1`` ... ``layerN``) and use the same two block
layouts (``conv1/bn1/conv2/bn2[/conv3/bn3]`` plus an optional ``downsample.0/1``),
so checkpoints load by name when the harness module does the same. Here the trunk
is a mixin that builds those attributes on the encoder itself rather than on a
sub-module, which would prefix every key.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import EncoderOutput

Triple = tuple[int, int, int]


def triple(value: int | Sequence[int]) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"expected an int or three ints, got {list(value)}")
    return out  # type: ignore[return-value]


def zero_pad_shortcut(x: torch.Tensor, planes: int, stride: int) -> torch.Tensor:
    """MedicalNet's parameter-free shortcut A: subsample by ``stride``, then pad channels with zeros.

    The published block builds this from ``out.data``, so no gradient flows through
    the shortcut; ``detach`` keeps that, which only matters when fine-tuning.
    """
    out = F.avg_pool3d(x, kernel_size=1, stride=stride).detach()
    pad = out.new_zeros(out.size(0), planes - out.size(1), *out.shape[2:])
    return torch.cat([out, pad], dim=1)


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions (MedicalNet BasicBlock): stride on the first, both dilated."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def main_convs(self) -> list[nn.Conv3d]:
        return [self.conv1, self.conv2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1x1, 3x3x3 (strided, dilated), 1x1x1 (torchvision v1.5 layout, as MedicalNet and Merlin use)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def main_convs(self) -> list[nn.Conv3d]:
        return [self.conv1, self.conv2, self.conv3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _apply(grid: Triple, kernel, stride, padding, dilation) -> Triple:
    k, s, p, d = triple(kernel), triple(stride), triple(padding), triple(dilation)
    return tuple(_conv_out(n, *args) for n, *args in zip(grid, k, s, p, d))  # type: ignore[return-value]


class ResNetTrunk:
    """Mixin for an ``nn.Module``: stem (conv1, bn1, relu, maxpool) and stages layer1..layerN.

    Shortcut ``A`` is MedicalNet's zero-padding shortcut (no weights, so no
    ``downsample`` keys); ``B`` is a strided 1x1x1 convolution plus batch norm.
    """

    def build_trunk(self, *, block: str, layers: Sequence[int], widths: Sequence[int], in_chans: int,
                    stem_kernel: Triple, stem_stride: Triple, stem_padding: Triple,
                    strides: Sequence[int], dilations: Sequence[int], shortcut: str) -> None:
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; expected one of {sorted(BLOCKS)}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut_type must be 'A' or 'B', got {shortcut!r}")
        if not len(layers) == len(widths) == len(strides) == len(dilations):
            raise ValueError(f"layers {list(layers)}, widths {list(widths)}, strides {list(strides)} and "
                             f"dilations {list(dilations)} must have one entry per stage")
        block_cls = BLOCKS[block]
        self.conv1 = nn.Conv3d(in_chans, widths[0], stem_kernel, stride=stem_stride, padding=stem_padding, bias=False)
        self.bn1 = nn.BatchNorm3d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes = widths[0]
        self.stage_names: list[str] = []
        for i, (n, planes, stride, dilation) in enumerate(zip(layers, widths, strides, dilations)):
            out_planes = planes * block_cls.expansion
            downsample = None
            if stride != 1 or inplanes != out_planes:
                if shortcut == "A":
                    downsample = partial(zero_pad_shortcut, planes=out_planes, stride=stride)
                else:
                    downsample = nn.Sequential(nn.Conv3d(inplanes, out_planes, 1, stride=stride, bias=False),
                                               nn.BatchNorm3d(out_planes))
            blocks = [block_cls(inplanes, planes, stride=stride, dilation=dilation, downsample=downsample)]
            inplanes = out_planes
            blocks += [block_cls(inplanes, planes, dilation=dilation) for _ in range(1, n)]
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.trunk_channels = inplanes
        for m in self.modules():  # type: ignore[attr-defined]
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def trunk_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage, in the tensor's own axis layout."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            stages.append(x)
        return stages

    def trunk_grids(self, spatial: Sequence[int]) -> list[Triple]:
        """Spatial size of every stage output for an input of ``spatial``, from the modules' own settings."""
        grid = triple(spatial)
        c, p = self.conv1, self.maxpool
        grid = _apply(grid, c.kernel_size, c.stride, c.padding, c.dilation)
        grid = _apply(grid, p.kernel_size, p.stride, p.padding, p.dilation)
        grids = []
        for name in self.stage_names:
            for blk in getattr(self, name):
                for conv in blk.main_convs():
                    grid = _apply(grid, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
            grids.append(grid)
        return grids


def flatten_tokens(feature: torch.Tensor) -> torch.Tensor:
    """[B, C, *grid] -> [B, N, C], N = prod(grid), row-major over the grid."""
    return feature.flatten(2).transpose(1, 2)


def stages_output(stages: list[torch.Tensor], hidden_states: bool) -> EncoderOutput:
    """The CNN reading of the interface: global = average pool of the last stage, tokens = its
    positions, hidden states = every stage flattened the same way."""
    last = stages[-1]
    return EncoderOutput(
        global_embedding=last.mean(dim=(2, 3, 4)),
        patch_tokens=flatten_tokens(last),
        grid=tuple(last.shape[2:]),
        hidden_states=[flatten_tokens(s) for s in stages] if hidden_states else None,
    )
