"""MedicalNet's 3D ResNet (family ``resnet3d``), as ViSD-Boost uses it.

Rebuilt after Tencent/MedicalNet ``models/resnet.py`` and ViSD-Boost's copy of it
(``lavis/utils/resnet.py``): a 7x7x7 stem with a configurable stride, max-pooling,
four stages of Basic (or Bottleneck) blocks whose stride and dilation the card
sets per stage, and MedicalNet's segmentation head left out. Key names are
MedicalNet's (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` ...); with
shortcut A the shortcuts have no weights and so no ``downsample`` keys.

The network is fully convolutional and runs on the tensor as the card lays it
out (``input.axis_order``), so stem and stage strides apply to those axes.
Outputs: global = average pool of the last stage (``embed_dim`` = its channels);
patch tokens = the last stage flattened to [B, N, C] with its grid;
``hidden_states`` = every stage flattened the same way, with grids
``stage_grids(spatial)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._resnet import BLOCKS, ResNetTrunk, Triple, stages_output, triple
from .base import Encoder, EncoderOutput
from .card import EncoderCard


class ResNet3D(ResNetTrunk, Encoder):
    family = "resnet3d"

    def __init__(self, card: EncoderCard, variant: str = "native"):
        super().__init__(card, variant)
        a = self.arch
        layers = list(a["layers"])
        block = a.get("block", "basic")
        stem_stride = triple(a.get("conv1_stride", 2))
        self.build_trunk(
            block=block, layers=layers, widths=list(a["widths"]), in_chans=int(a.get("in_chans", 1)),
            stem_kernel=(7, 7, 7), stem_stride=stem_stride, stem_padding=(3, 3, 3),
            # MedicalNet's own resnet.py: strides (1, 2, 1, 1), dilations (1, 1, 2, 4).
            strides=list(a.get("layer_strides", [1, 2, 1, 1])), dilations=list(a.get("dilations", [1, 1, 2, 4])),
            shortcut=str(a.get("shortcut_type", "B")))
        if self.trunk_channels != self.embed_dim:
            raise ValueError(f"encoder {card.name!r} ({variant}): the last stage has {self.trunk_channels} channels "
                             f"(widths[-1] x {BLOCKS[block].expansion}), but embed_dim is {self.embed_dim}")

    def stage_grids(self, spatial: Sequence[int]) -> list[Triple]:
        """Grid of each hidden state for an input of ``spatial`` (in the card's axis order)."""
        return self.trunk_grids(spatial)

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        stages = self.trunk_stages(x)
        return stages_output(stages, hidden_states)
