"""Merlin's image encoder (family ``i3d_resnet``): an ImageNet ResNet inflated to 3D.

Rebuilt after StanfordMIMI/Merlin ``merlin/models/i3res.py`` and ``inflate.py``
(I3ResNet built in ``build.py`` from torchvision's ResNet-152 with
``conv_class=True``):

- the input arrives as [B, 1, H, W, D] (MONAI layout) and is permuted to
  [B, 1, D, H, W], so D is the inflated ("time") axis; the grey channel is
  repeated to the three channels of the ImageNet stem;
- conv1 is (3, 7, 7) with stride (1, 2, 2), the max-pool (3, 3, 3) with stride 2 on
  every axis; every bottleneck's 3x3 becomes 3x3x3 with the block's stride on all
  three axes, its 1x1s and the downsample convolution become 1x1x1;
- the image embedding (``Merlin(ImageEmbedding=True)``) is the 3D adaptive average
  pool of layer4, 2048-d. The phenotype ``classifier`` and the ``contrastive_head``
  (1x1x1 convolutions on that pooled feature) are not part of this module; the
  card lists them under ``ignore_prefixes``.

Key names are I3ResNet's (``conv1.weight``, ``bn1.*``, ``layer1.0.downsample.0.weight``
...), so ``encode_image.i3_resnet.*`` loads after the card's prefix strip. Patch
tokens and hidden states are permuted back to the card's H, W, D order before
flattening, as Merlin's own skip outputs are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._resnet import ResNetTrunk, Triple, stages_output
from .base import Encoder, EncoderOutput
from .card import EncoderCard

# The card's axis order is H, W, D; the network computes in D, H, W.
_TO_NET = (0, 1, 4, 2, 3)
_FROM_NET = (0, 1, 3, 4, 2)


def inflate_conv_weight(weight2d: torch.Tensor, time_dim: int, center: bool = True) -> torch.Tensor:
    """[O, I, kh, kw] -> [O, I, T, kh, kw] along a new leading spatial axis.

    ``center=True`` (what Merlin's I3ResNet uses throughout) puts the 2D kernel in the
    middle slice and zeros elsewhere, so each output slice is the 2D response of the
    matching input slice. ``center=False`` is I3D's original rule: the kernel repeated
    T times and divided by T, which gives the 2D response on a volume constant along
    the new axis wherever the kernel does not reach the zero padding.
    """
    if weight2d.ndim != 4:
        raise ValueError(f"expected a 2D convolution weight [O, I, kh, kw], got shape {list(weight2d.shape)}")
    if time_dim < 1:
        raise ValueError(f"time_dim must be positive, got {time_dim}")
    if center:
        out = weight2d.new_zeros(weight2d.shape[0], weight2d.shape[1], time_dim, *weight2d.shape[2:])
        out[:, :, time_dim // 2] = weight2d
        return out
    return weight2d.unsqueeze(2).repeat(1, 1, time_dim, 1, 1) / time_dim


class I3DResNet(ResNetTrunk, Encoder):
    family = "i3d_resnet"

    def __init__(self, card: EncoderCard, variant: str = "native"):
        super().__init__(card, variant)
        a = self.arch
        t = int(a.get("inflate_time_dim", 3))
        layers = list(a["layers"])
        expansion = int(a.get("expansion", 4))
        if expansion != 4:
            raise ValueError(f"encoder {card.name!r}: I3ResNet inflates bottleneck blocks only (expansion 4), "
                             f"got expansion {expansion}")
        self.repeat_channels = int(a.get("repeat_channels", 3))
        self.build_trunk(
            block="bottleneck", layers=layers, widths=list(a["widths"]),
            in_chans=int(a.get("in_chans", 1)) * self.repeat_channels,
            stem_kernel=(t, 7, 7), stem_stride=(1, 2, 2), stem_padding=(t // 2, 3, 3),
            strides=[1] + [2] * (len(layers) - 1), dilations=[1] * len(layers), shortcut="B")
        if self.trunk_channels != self.embed_dim:
            raise ValueError(f"encoder {card.name!r} ({variant}): layer4 has {self.trunk_channels} channels "
                             f"(widths[-1] x 4), but embed_dim is {self.embed_dim}")

    def stage_grids(self, spatial: Sequence[int]) -> list[Triple]:
        """Grid of each hidden state, in the card's H, W, D order, for an input of ``spatial`` (H, W, D)."""
        h, w, d = spatial
        return [(gh, gw, gd) for gd, gh, gw in self.trunk_grids((d, h, w))]

    def encode(self, x: torch.Tensor, hidden_states: bool = False) -> EncoderOutput:
        x = x.permute(*_TO_NET)
        if self.repeat_channels > 1:
            x = x.repeat(1, self.repeat_channels, 1, 1, 1)  # torch.cat((x, x, x), dim=1) in I3ResNet
        stages = [s.permute(*_FROM_NET) for s in self.trunk_stages(x)]
        return stages_output(stages, hidden_states)

    def inflate_2d_state_dict(self, state2d: Mapping[str, torch.Tensor], center: bool = True) -> dict[str, torch.Tensor]:
        """A torchvision-style 2D ResNet state dict turned into this module's state (``fc.*`` dropped).

        Every 4D convolution weight is inflated to the depth of the matching 3D kernel
        (3 for conv1 and the bottleneck 3x3s, 1 for the 1x1s); batch-norm tensors are
        kept as they are, as Merlin reuses the 2D batch-norm modules. Use it to start
        from ImageNet weights; Merlin's released weights are already 3D.
        """
        own = self.state_dict()
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state2d.items():
            if key.startswith("fc."):
                continue
            if key not in own:
                raise KeyError(f"2D key {key!r} has no counterpart in {type(self).__name__}")
            target = own[key]
            if tensor.ndim == 4 and target.ndim == 5:
                tensor = inflate_conv_weight(tensor, target.shape[2], center=center)
            if tensor.shape != target.shape:
                raise ValueError(f"{key}: 2D tensor {list(state2d[key].shape)} does not inflate to {list(target.shape)}")
            out[key] = tensor
        return out
