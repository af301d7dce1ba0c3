"""The ViT families (vit3d, hlip_vit): published checkpoint layouts load key for key, outputs have the right shapes.

Each checkpoint here is written in the layout its card describes, with the
published key names spelled out by hand (not by running the card's key map
backwards), so a wrong card key map or a wrong module key name fails.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from asap_bench.encoders.card import EncoderCard, load_encoder_card
from asap_bench.encoders.checkpoints import CheckpointError, load_weights
from asap_bench.encoders.hlip import HLIPViT
from asap_bench.encoders.vit3d import ViT3D, simcrop_sincos_table

VIT_CARDS = ["random", "asap", "simcrop", "mae", "m3ae", "mrm", "hi-end-mae", "hlip"]


def build(card: EncoderCard | str, variant: str = "demo", seed: int = 0):
    card = load_encoder_card(card) if isinstance(card, str) else card
    torch.manual_seed(seed)
    cls = HLIPViT if card.family == "hlip_vit" else ViT3D
    return cls(card, variant).eval()


def with_size(name: str, variant: str, **overrides) -> EncoderCard:
    """The shipped card with one more size variant (the demo one plus ``overrides``)."""
    card = load_encoder_card(name)
    return card.model_copy(update={"sizes": {**card.sizes, variant: {**card.sizes["demo"], **overrides}}})


def sample(encoder, batch: int = 2, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, *encoder.input_spec.tensor_size(), generator=gen)


def extra() -> torch.Tensor:
    return torch.randn(4, 4)


def published_checkpoint(name: str, state: dict[str, torch.Tensor]) -> tuple[dict, set[str]]:
    """``state`` (module keys) in the file layout the card's encoder is published in, plus the keys it must ignore."""
    if name in ("asap", "simcrop", "mae", "m3ae", "mrm"):
        # ASAP/SimCroP code: torch.save({"model": model.state_dict(), ...}); vision keys unprefixed.
        others = {"mask_token": torch.zeros(1, 1, 4), "decoder_embed.weight": extra(), "decoder_pos_embed": extra()}
        if name != "mae":
            others["bert_encoder.embeddings.word_embeddings.weight"] = extra()
        if name == "simcrop":
            others["head.weight"] = extra()
        return {"model": {**state, **others}, "epoch": torch.tensor(3)}, set(others)
    if name == "hi-end-mae":
        # Hi-End-MAE: DDP-wrapped HiEndMAE; the encoder's table lives beside it as encoder_pos_embed.
        files = {("module.encoder_pos_embed" if k == "pos_embed" else f"module.encoder.{k}"): v for k, v in state.items()}
        others = {"module.encoder.cls_token": torch.zeros(1, 1, 4), "module.decoder_pos_embed": extra(),
                  "module.decoder.blocks.0.norm1.weight": extra(), "module.encoder_to_decoder.0.weight": extra(),
                  "module.mask_token": extra()}
        return {"state_dict": {**files, **others}}, set(others)
    if name == "hlip":
        # open_clip + DDP: module.visual.trunk.* (timm), module.visual.head.proj, module.text.*, logit_scale.
        files = {f"module.visual.trunk.{k}": v for k, v in state.items()}
        others = {"module.visual.head.proj.weight": extra(), "module.logit_scale": torch.tensor(2.0),
                  "module.text.transformer.embeddings.word_embeddings.weight": extra()}
        return {"state_dict": {**files, **others}, "epoch": 7}, set(others)
    raise AssertionError(f"no published layout written for {name}")


def assert_same_output(a, b, x: torch.Tensor) -> None:
    with torch.no_grad():
        oa, ob = a(x, hidden_states=True), b(x, hidden_states=True)
    assert torch.equal(oa.global_embedding, ob.global_embedding)
    assert torch.equal(oa.patch_tokens, ob.patch_tokens)
    assert oa.grid == ob.grid
    assert all(torch.equal(ha, hb) for ha, hb in zip(oa.hidden_states, ob.hidden_states, strict=True))


# --- published layouts load key for key --------------------------------------------


def test_random_init_has_no_checkpoint_and_runs():
    card = load_encoder_card("random")
    assert card.checkpoint.availability == "none"
    encoder = build(card)
    with torch.no_grad():
        out = encoder(sample(encoder))
    assert torch.isfinite(out.global_embedding).all()


@pytest.mark.parametrize("name", [n for n in VIT_CARDS if n != "random"])
def test_published_layout_loads_completely_and_reproduces_outputs(name, tmp_path):
    a = build(name, seed=0)
    payload, ignored = published_checkpoint(name, {k: v.clone() for k, v in a.state_dict().items()})
    path = tmp_path / "weights.pth"
    torch.save(payload, path)

    b = build(name, seed=123)
    differs = [k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])]
    assert differs, "a second seed should give different weights"
    report = load_weights(b, path)
    assert report.missing == [] and report.unexpected == [] and report.adapted == []
    assert report.fraction == 1.0
    assert set(report.ignored) == ignored
    assert set(report.loaded) == set(a.state_dict())
    assert_same_output(a, b, sample(a))


# --- outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", VIT_CARDS)
def test_output_shapes(name):
    encoder = build(name)
    arch = encoder.arch
    grid = tuple(i // p for i, p in zip(arch["img_size"], arch["patch_size"]))
    x = sample(encoder, batch=3)
    with torch.no_grad():
        plain = encoder(x)
        out = encoder(x, hidden_states=True)
    dim = arch["embed_dim"]
    assert out.global_embedding.shape == (3, dim) and encoder.embed_dim == dim
    assert out.grid == grid
    assert out.patch_tokens.shape == (3, math.prod(grid), dim)
    assert plain.hidden_states is None
    assert len(out.hidden_states) == arch["depth"]
    assert all(h.shape == (3, math.prod(grid), dim) for h in out.hidden_states)
    assert torch.equal(plain.global_embedding, out.global_embedding)


def test_wrong_input_shape_is_refused_with_the_expected_layout():
    encoder = build("hlip")
    with pytest.raises(ValueError, match="DWH"):
        encoder(torch.zeros(1, 1, 64, 64, 32))


def test_mean_pool_is_the_simcrop_linear_probe_recipe():
    """global = fresh LayerNorm(mean of the last block's patch tokens), not the checkpoint's ``norm``."""
    encoder = build("asap")
    with torch.no_grad():
        encoder.norm.weight.mul_(3.0)  # must not touch the global feature
        out = encoder(sample(encoder), hidden_states=True)
    last = out.hidden_states[-1].mean(dim=1)
    expected = torch.nn.functional.layer_norm(last, (last.shape[-1],), eps=1e-6)
    torch.testing.assert_close(out.global_embedding, expected)


def test_hlip_global_is_the_normed_cls_token():
    encoder = build("hlip")
    with torch.no_grad():
        out = encoder(sample(encoder))
    assert not torch.allclose(out.global_embedding, out.patch_tokens.mean(dim=1))
    assert encoder.card.global_pool == "cls"


@pytest.mark.parametrize("name", ["asap", "hi-end-mae", "hlip"])
def test_fused_and_explicit_attention_agree(name):
    encoder = build(name)
    x = sample(encoder)
    with torch.no_grad():
        fused = encoder(x, hidden_states=True)
        encoder.set_fused_attention(False)
        explicit = encoder(x, hidden_states=True)
        encoder.set_fused_attention(True)
    torch.testing.assert_close(explicit.global_embedding, fused.global_embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(explicit.patch_tokens, fused.patch_tokens, atol=1e-5, rtol=0)
    for a, b in zip(explicit.hidden_states, fused.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert all(m.fused for m in encoder.modules() if hasattr(m, "fused"))


# --- position tables -------------------------------------------------------------


def test_fixed_table_is_simcrops_and_a_state_dict_entry():
    encoder = build("asap")
    assert "pos_embed" in encoder.state_dict() and not encoder.pos_embed.requires_grad
    table = encoder.pos_embed[0]
    assert torch.equal(table[0], torch.zeros_like(table[0]))  # CLS slot
    grid = encoder.grid
    pe = table[1:].reshape(*grid, -1)
    div = torch.exp(torch.arange(0, pe.shape[-1], 2).double() * -(math.log(10000.0) / pe.shape[-1]))
    h, w, d = 3, 1, 2
    torch.testing.assert_close(pe[h, w, d, 0::2].double(), torch.sin(h * div), atol=1e-6, rtol=0)
    torch.testing.assert_close(pe[h, w, d, 1::2].double(), torch.cos(w * div), atol=1e-6, rtol=0)
    assert torch.equal(pe[h, w, 0], pe[h, w, d])  # SimCroP's table does not vary along the third axis
    assert simcrop_sincos_table((2, 3, 4), 8).shape == (24, 8)


def test_learned_table_has_no_cls_slot_for_hi_end_mae():
    encoder = build("hi-end-mae")
    assert encoder.pos_embed.requires_grad
    assert encoder.pos_embed.shape == (1, math.prod(encoder.grid), encoder.embed_dim)
    assert "cls_token" not in encoder.state_dict()


@pytest.mark.parametrize("name, other_img, key", [
    ("asap", [96, 96, 48], "pos_embed"),          # 6x6x6 -> 4x4x4, CLS slot kept
    ("hi-end-mae", [96, 96, 48], "pos_embed"),    # 8x8x4 -> 4x4x2 (patch 12), no CLS slot
    ("hlip", [48, 96, 96], "spatial_posemb"),     # 6x6x6 -> 4x4x4
])
def test_position_table_of_another_input_size_needs_adapt(name, other_img, key, tmp_path):
    source = build(with_size(name, "other", img_size=other_img), "other")
    payload, _ = published_checkpoint(name, source.state_dict())
    path = tmp_path / "other.pth"
    torch.save(payload, path)

    target = build(name, seed=5)
    with pytest.raises(CheckpointError, match=key):
        load_weights(target, path)
    report = load_weights(target, path, adapt=True)
    assert len(report.adapted) == 1 and report.adapted[0].startswith(f"{key}: ")
    assert report.missing == [] and report.unexpected == [] and report.fraction == 1.0
    loaded = getattr(target, key)
    assert loaded.shape == getattr(build(name), key).shape
    if name == "asap":
        assert torch.equal(loaded[0, 0], source.pos_embed[0, 0])  # the CLS slot is carried over
    with torch.no_grad():
        assert torch.isfinite(target(sample(target)).global_embedding).all()


def test_adapt_keeps_a_table_of_the_same_grid_and_refuses_other_keys():
    encoder = build("asap")
    table = encoder.pos_embed.detach().clone()
    same = encoder.adapt_tensor("pos_embed", table, table.shape)
    assert torch.equal(same, table)
    assert encoder.adapt_tensor("blocks.0.norm1.weight", torch.ones(3), torch.Size([48])) is None
    assert encoder.adapt_tensor("pos_embed", torch.zeros(1, 1 + 7, 48), table.shape) is None  # no 3D grid of 7


def test_hlip_block_indexes_must_cover_every_block():
    card = with_size("hlip", "bad", slice_attn_indexes=[0], scan_attn_indexes=[0])
    with pytest.raises(ValueError, match="slice_attn_indexes"):
        HLIPViT(card, "bad")
    with pytest.raises(ValueError, match="family"):
        ViT3D(load_encoder_card("hlip"), "demo")


# --- the full-size model ---------------------------------------------------------


def test_full_size_asap_vit_b_runs_one_forward():
    torch.manual_seed(0)
    encoder = ViT3D(load_encoder_card("asap"), "native").eval()
    assert sum(p.numel() for p in encoder.parameters()) > 85_000_000
    x = torch.randn(1, 1, 224, 224, 112)
    start = time.perf_counter()
    with torch.inference_mode():
        out = encoder(x)
    seconds = time.perf_counter() - start
    print(f"\nASAP ViT-B forward 1x1x224x224x112: {seconds:.2f} s on {torch.get_num_threads()} threads")
    assert out.grid == (14, 14, 14)
    assert out.patch_tokens.shape == (1, 2744, 768)
    assert out.global_embedding.shape == (1, 768)
    assert torch.isfinite(out.global_embedding).all()
