"""Every registered encoder builds at its demo size and honours the one interface."""

from __future__ import annotations

import math

import pytest
import torch

from asap_bench.encoders.base import EncoderOutput, frozen_forward
from asap_bench.encoders.card import encoder_names
from asap_bench.encoders.registry import build_encoder, get_card


@pytest.mark.parametrize("name", encoder_names())
def test_demo_variant_forward(name):
    torch.manual_seed(0)
    encoder = build_encoder(name, "demo").eval()
    spec = encoder.input_spec
    x = torch.randn(2, spec.channels, *spec.tensor_size())
    out = frozen_forward(encoder, x, hidden_states=True)
    assert isinstance(out, EncoderOutput)
    assert out.global_embedding.shape == (2, encoder.embed_dim)
    assert torch.isfinite(out.global_embedding).all()
    assert out.patch_tokens is not None and out.patch_tokens.shape[1] == math.prod(out.grid)
    assert out.hidden_states, name
    # the same input gives the same features (no dropout or other randomness at inference)
    again = frozen_forward(encoder, x)
    assert torch.equal(again.global_embedding, out.global_embedding)
    card = get_card(name)
    if card.segmentation.mode == "unetr":
        assert len(out.hidden_states) == encoder.arch["depth"]
        assert all(h.shape == out.patch_tokens.shape for h in out.hidden_states)
