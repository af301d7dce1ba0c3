"""MONAI ViT (M3D-CLIP, fVLM) and CTViT (CT-CLIP): published checkpoint layouts load key for key.

Checkpoints are written here with the key names of the public code, spelled out
by hand (M3D: LaMed/src/model/multimodal_encoder/vit.py under MONAI 1.3; fVLM:
lavis/models/blip_models/*.py inside BlipPretrain; CT-CLIP:
transformer_maskgit/{ctvit,attention}.py inside CTCLIP), so a card or module
whose names drift from the published ones fails here.
"""

from __future__ import annotations

from math import prod

import pytest
import torch
from monai.networks.nets import ViT

from asap_bench.encoders.card import load_encoder_card
from asap_bench.encoders.checkpoints import load_weights
from asap_bench.encoders.ctvit import CTViT
from asap_bench.encoders.monai_vit import POS_EMBED_KEY, MonaiViT, vit_arguments

BATCH = 2


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and float buffer random, so a key that fails to load changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and tensor.numel():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return module.eval()


def sample_input(encoder, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, 1, *encoder.input_spec.tensor_size(), generator=generator)


def monai_block_names(prefix: str, depth: int, qkv_bias: bool) -> list[str]:
    names = []
    for n in range(depth):
        block = f"{prefix}blocks.{n}."
        names += [block + s for s in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.out_proj.weight",
                                      "attn.out_proj.bias", "norm2.weight", "norm2.bias", "mlp.linear1.weight",
                                      "mlp.linear1.bias", "mlp.linear2.weight", "mlp.linear2.bias")]
        if qkv_bias:
            names.append(block + "attn.qkv.bias")
    return names + [f"{prefix}norm.weight", f"{prefix}norm.bias"]


def m3d_vit_names(depth: int, prefix: str = "") -> list[str]:
    """pretrained_ViT.bin: M3D's ViT (perceptron patches = Sequential(Rearrange, Linear), CLS, no qkv bias)."""
    return [f"{prefix}cls_token", f"{prefix}patch_embedding.position_embeddings",
            f"{prefix}patch_embedding.patch_embeddings.1.weight", f"{prefix}patch_embedding.patch_embeddings.1.bias",
            *monai_block_names(prefix, depth, qkv_bias=False)]


def fvlm_vit_names(depth: int) -> list[str]:
    """fVLM's visual_encoder: conv patches, qkv bias, no CLS token."""
    prefix = "visual_encoder."
    return [f"{prefix}patch_embedding.position_embeddings", f"{prefix}patch_embedding.patch_embeddings.weight",
            f"{prefix}patch_embedding.patch_embeddings.bias", *monai_block_names(prefix, depth, qkv_bias=True)]


def ctvit_encoder_names(spatial_depth: int, temporal_depth: int) -> list[str]:
    """CTViT's encoder keys under visual_transformer. (layer slots: 0 PEG, 1 attention, 3 GEGLU MLP)."""
    p = "visual_transformer."
    names = [p + f"spatial_rel_pos_bias.net.{i}.{w}" for i in ("0.0", "1.0", "2") for w in ("weight", "bias")]
    names += [p + f"to_patch_emb.{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias")]
    for tower, depth in (("enc_spatial_transformer", spatial_depth), ("enc_temporal_transformer", temporal_depth)):
        for n in range(depth):
            layer = f"{p}{tower}.layers.{n}."
            names += [layer + "0.dsconv.weight", layer + "0.dsconv.bias"]
            names += [layer + "1." + s for s in ("norm.gamma", "norm.beta", "context_norm.gamma", "context_norm.beta",
                                                 "null_kv", "to_q.weight", "to_kv.weight", "q_scale", "k_scale",
                                                 "to_out.weight")]
            names += [layer + "3." + s for s in ("0.weight", "0.bias", "1.weight", "4.weight")]
        names += [f"{p}{tower}.norm_out.gamma", f"{p}{tower}.norm_out.beta"]
    return names + [p + "vq._codebook.initted", p + "vq._codebook.cluster_size", p + "vq._codebook.embed"]


def assert_same_output(a, b) -> None:
    assert torch.equal(a.global_embedding, b.global_embedding)
    assert torch.equal(a.patch_tokens, b.patch_tokens)
    assert a.grid == b.grid


def assert_clean_load(report, ignored: set[str]) -> None:
    assert report.missing == [] and report.unexpected == [] and report.adapted == []
    assert report.fraction == 1.0
    assert set(report.ignored) == ignored


# --- M3D-CLIP -------------------------------------------------------------------------


def test_m3d_clip_pretrained_vit_bin_loads_key_for_key(tmp_path):
    card = load_encoder_card("m3d-clip")
    torch.manual_seed(0)
    a = randomise(MonaiViT(card, "demo"), seed=1)
    names = m3d_vit_names(a.arch["depth"])
    own = a.state_dict()
    assert sorted(names) == sorted(own), "the module's keys are not pretrained_ViT.bin's"
    path = tmp_path / "pretrained_ViT.bin"
    torch.save({name: own[name].clone() for name in names}, path)

    b = randomise(MonaiViT(card, "demo"), seed=2)
    assert_clean_load(load_weights(b, path), ignored=set())
    x = sample_input(a)
    with torch.no_grad():
        assert_same_output(a(x), b(x))


def test_m3d_clip_full_model_file_loads_through_the_vision_encoder_prefix(tmp_path):
    card = load_encoder_card("m3d-clip")
    a = randomise(MonaiViT(card, "demo"), seed=3)
    own = a.state_dict()
    state = {f"vision_encoder.{name}": own[name].clone() for name in m3d_vit_names(a.arch["depth"])}
    extra = {"language_encoder.embeddings.word_embeddings.weight": torch.randn(30, 8),
             "language_encoder.encoder.layer.0.attention.self.query.weight": torch.randn(8, 8),
             "mm_vision_proj.weight": torch.randn(8, 8), "mm_vision_proj.bias": torch.randn(8),
             "mm_language_proj.weight": torch.randn(8, 8), "logit_scale": torch.tensor(2.6)}
    path = tmp_path / "model.bin"
    torch.save({**state, **extra}, path)
    b = randomise(MonaiViT(card, "demo"), seed=4)
    assert_clean_load(load_weights(b, path), ignored=set(extra))
    x = sample_input(a)
    with torch.no_grad():
        assert_same_output(a(x), b(x))


# --- fVLM ------------------------------------------------------------------------------


def test_fvlm_checkpoint_loads_from_model_visual_encoder(tmp_path):
    card = load_encoder_card("fvlm")
    torch.manual_seed(0)
    a = randomise(MonaiViT(card, "demo"), seed=5)
    own = a.state_dict()
    names = fvlm_vit_names(a.arch["depth"])
    assert sorted(n.removeprefix("visual_encoder.") for n in names) == sorted(own)
    vision = {name: own[name.removeprefix("visual_encoder.")].clone() for name in names}
    other = {"text_encoder.embeddings.word_embeddings.weight": torch.randn(30, 8),
             "text_encoder.encoder.layer.0.output.dense.weight": torch.randn(8, 8),
             "text_proj.weight": torch.randn(4, 8), "text_proj.bias": torch.randn(4), "temp": torch.tensor(0.07),
             "attention.in_proj_weight": torch.randn(24, 8), "attention.out_proj.weight": torch.randn(8, 8),
             "vision_projs.0.weight": torch.randn(4, 8), "vision_projs.3.bias": torch.randn(4),
             "query_tokens": torch.randn(4, 8)}
    path = tmp_path / "checkpoint_19.pth"
    torch.save({"model": {**vision, **other}, "epoch": 19, "config": {"model": {"arch": "blip_pretrain"}}}, path)

    b = randomise(MonaiViT(card, "demo"), seed=6)
    assert_clean_load(load_weights(b, path), ignored=set(other))
    x = sample_input(a)
    with torch.no_grad():
        assert_same_output(a(x), b(x))


# --- CT-CLIP ---------------------------------------------------------------------------


def ctvit_decoder_heads(arch: dict) -> dict[str, torch.Tensor]:
    """CTViT keys outside the encoder path: first-frame patch embedding and the pixel heads."""
    pt, ph, pw = arch["patch_size"]
    dim, frame, cube = arch["embed_dim"], ph * pw, pt * ph * pw
    p = "visual_transformer."
    return {p + "to_patch_emb_first_frame.1.weight": torch.randn(frame), p + "to_patch_emb_first_frame.1.bias": torch.randn(frame),
            p + "to_patch_emb_first_frame.2.weight": torch.randn(dim, frame), p + "to_patch_emb_first_frame.2.bias": torch.randn(dim),
            p + "to_patch_emb_first_frame.3.weight": torch.randn(dim), p + "to_patch_emb_first_frame.3.bias": torch.randn(dim),
            p + "to_pixels_first_frame.0.weight": torch.randn(frame, dim), p + "to_pixels_first_frame.0.bias": torch.randn(frame),
            p + "to_pixels.0.weight": torch.randn(cube, dim), p + "to_pixels.0.bias": torch.randn(cube)}


def test_ct_clip_raw_state_dict_loads_key_for_key(tmp_path):
    card = load_encoder_card("ct-clip")
    torch.manual_seed(0)
    a = randomise(CTViT(card, "demo"), seed=7)
    own = a.state_dict()
    names = ctvit_encoder_names(a.arch["spatial_depth"], a.arch["temporal_depth"])
    assert sorted(n.removeprefix("visual_transformer.") for n in names) == sorted(own)
    visual = {name: own[name.removeprefix("visual_transformer.")].clone() for name in names}
    grid_tokens = prod(a.grid[1:]) * a.arch["embed_dim"]  # CT-CLIP v2: mean over slices, flatten the rest
    other = {**ctvit_decoder_heads(a.arch),
             "text_transformer.embeddings.word_embeddings.weight": torch.randn(30, 8),
             "text_transformer.encoder.layer.0.attention.self.query.weight": torch.randn(8, 8),
             "to_visual_latent.weight": torch.randn(8, grid_tokens), "to_text_latent.weight": torch.randn(8, 8),
             "to_visual_latent_extra.weight": torch.randn(8, grid_tokens), "to_text_latent_extra.weight": torch.randn(8, 8),
             "temperature": torch.tensor(1.0)}
    path = tmp_path / "CT-CLIP_v2.pt"
    torch.save({**visual, **other}, path)

    b = randomise(CTViT(card, "demo"), seed=8)
    assert_clean_load(load_weights(b, path), ignored=set(other))
    x = sample_input(a)
    with torch.no_grad():
        assert_same_output(a(x), b(x))


def test_ctvit_quantised_tokens_are_the_nearest_codebook_rows():
    card = load_encoder_card("ct-clip")
    model = randomise(CTViT(card, "demo"), seed=9)
    x = sample_input(model, seed=1)
    with torch.no_grad():
        encoded = model.encode_tokens(x).flatten(1, 3)
        out = model(x)
    codebook = model.vq._codebook.embed[0]
    cosine = torch.nn.functional.cosine_similarity(encoded[..., None, :], codebook[None, None], dim=-1)
    expected = codebook[cosine.argmax(dim=-1)]
    assert torch.equal(out.patch_tokens, expected)
    assert torch.allclose(out.global_embedding, expected.mean(dim=1))
    assert len(torch.unique(cosine.argmax(dim=-1))) > 1


# --- shapes and fused attention --------------------------------------------------------


@pytest.mark.parametrize("name, cls", [("m3d-clip", MonaiViT), ("fvlm", MonaiViT), ("ct-clip", CTViT)])
def test_output_shapes_and_fused_attention_match(name, cls):
    card = load_encoder_card(name)
    model = randomise(cls(card, "demo"), seed=10)
    arch = model.arch
    grid = tuple(i // p for i, p in zip(arch["img_size"], arch["patch_size"]))
    x = sample_input(model, seed=2)
    with torch.no_grad():
        model.set_fused_attention(True)
        fused = model(x, hidden_states=True)
        model.set_fused_attention(False)
        plain = model(x, hidden_states=True)
    dim = arch["embed_dim"]
    assert fused.grid == grid
    assert fused.global_embedding.shape == (BATCH, dim)
    assert fused.patch_tokens.shape == (BATCH, prod(grid), dim)
    depth = arch.get("depth") or arch["spatial_depth"] + arch["temporal_depth"]
    assert len(fused.hidden_states) == depth
    assert all(h.shape == (BATCH, prod(grid), dim) for h in fused.hidden_states)
    torch.testing.assert_close(fused.global_embedding, plain.global_embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.patch_tokens, plain.patch_tokens, rtol=1e-5, atol=1e-5)
    for h_fused, h_plain in zip(fused.hidden_states, plain.hidden_states):
        torch.testing.assert_close(h_fused, h_plain, rtol=1e-5, atol=1e-5)
    if cls is CTViT:
        with torch.no_grad():
            model.set_fused_attention(True)
            before = model.encode_tokens(x)
            model.set_fused_attention(False)
            torch.testing.assert_close(before, model.encode_tokens(x), rtol=1e-5, atol=1e-5)
    else:
        assert all(block.attn.use_flash_attention is False for block in model.blocks)


# --- an independent reference: MONAI's own ViT ------------------------------------------


@pytest.mark.parametrize("name", ["m3d-clip", "fvlm"])
def test_monai_vit_equals_plain_monai_vit(name):
    card = load_encoder_card(name)
    model = randomise(MonaiViT(card, "demo"), seed=11)
    model.set_fused_attention(False)
    reference = ViT(**vit_arguments(model.arch)).eval()
    result = reference.load_state_dict(model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("classification_head.") or ".cross_attn." in k or ".norm_cross_attn." in k
               for k in result.missing_keys), result.missing_keys
    x = sample_input(model, seed=3)
    with torch.no_grad():
        ours = model(x, hidden_states=True)
        _, hidden = reference(x)
        normed = reference.norm(hidden[-1])
    start = 1 if card.architecture["cls_token"] else 0
    assert torch.equal(ours.patch_tokens, normed[:, start:])
    expected_global = normed[:, 0] if card.global_pool == "cls" else normed[:, start:].mean(dim=1)
    assert torch.equal(ours.global_embedding, expected_global)
    for mine, theirs in zip(ours.hidden_states, hidden):
        assert torch.equal(mine, theirs[:, start:])


def test_position_embedding_is_resampled_to_another_grid_on_request():
    card = load_encoder_card("fvlm")
    model = MonaiViT(card, "demo")
    native = tuple(i // p for i, p in zip(card.architecture["img_size"], card.architecture["patch_size"]))
    target = model.state_dict()[POS_EMBED_KEY].shape
    constant = torch.full((1, prod(native), target[-1]), 0.5)
    adapted = model.adapt_tensor(POS_EMBED_KEY, constant, target)
    assert adapted is not None and adapted.shape == target
    assert torch.allclose(adapted, torch.full(target, 0.5))
    assert model.adapt_tensor(POS_EMBED_KEY, torch.zeros(1, 7, target[-1]), target) is None
    assert model.adapt_tensor("norm.weight", constant, target) is None


def test_cards_describe_the_published_modules():
    assert load_encoder_card("fvlm").architecture["qkv_bias"] is True
    assert load_encoder_card("m3d-clip").architecture["qkv_bias"] is False
    ct = load_encoder_card("ct-clip")
    assert ct.architecture["patch_size"] == [10, 20, 20]  # CT-CLIP v2: patch 20, temporal patch 10
    assert ct.checkpoint.map_key("visual_transformer.to_pixels.0.weight") is None
    assert ct.checkpoint.map_key("to_visual_latent_extra.weight") is None
    assert ct.checkpoint.map_key("visual_transformer.vq._codebook.embed") == "vq._codebook.embed"
    with pytest.raises(ValueError, match="global_pool 'cls'"):
        MonaiViT(load_encoder_card("fvlm").model_copy(update={"global_pool": "cls"}), "demo")
