"""The CNN encoders (Merlin's I3D ResNet, ViSD-Boost's MedicalNet ResNet, PCRLv2's U-Net encoder).

Published key names are written out here from the public code (Merlin
merlin/models/i3res.py over torchvision's ResNet; ViSD-Boost lavis/utils/resnet.py;
PCRLv2 models/pcrlv2_model_3d.py), independently of the modules, and checkpoints
are written in each project's published layout, so a wrong name, a wrong prefix
in a card or a lost tensor fails here rather than loading silently half-random.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from asap_bench.encoders.card import EncoderCard, load_card_file
from asap_bench.encoders.checkpoints import CheckpointError, load_weights
from asap_bench.encoders.i3d_resnet import I3DResNet, inflate_conv_weight
from asap_bench.encoders.resnet3d import ResNet3D
from asap_bench.encoders.unet3d import UNet3DEncoder
from asap_bench.resources import resource_dir

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def card(name: str) -> EncoderCard:
    return load_card_file(resource_dir("baselines") / f"{name}.yaml")


def without_sha(c: EncoderCard) -> EncoderCard:
    """The card with no pinned checksum: the test files are not the published ones."""
    return c.model_copy(update={"checkpoint": c.checkpoint.model_copy(update={"sha256": None})})


# --- published key names, written from the public code -------------------------------


def bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{b}" for b in BN]


def i3resnet_keys(layers: list[int]) -> list[str]:
    """I3ResNet (torchvision ResNet-152 inflated, conv_class heads excluded): no conv biases."""
    keys = ["conv1.weight", *bn_keys("bn1")]
    for i, n in enumerate(layers):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            for c in (1, 2, 3):
                keys += [f"{p}.conv{c}.weight", *bn_keys(f"{p}.bn{c}")]
            if j == 0:  # channels change in every first block (64 -> 256 in layer1)
                keys += [f"{p}.downsample.0.weight", *bn_keys(f"{p}.downsample.1")]
    return keys


def medicalnet_keys(layers: list[int]) -> list[str]:
    """MedicalNet ResNet with BasicBlocks and shortcut A: no downsample keys, no conv biases."""
    keys = ["conv1.weight", *bn_keys("bn1")]
    for i, n in enumerate(layers):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            for c in (1, 2):
                keys += [f"{p}.conv{c}.weight", *bn_keys(f"{p}.bn{c}")]
    return keys


def pcrlv2_keys() -> list[str]:
    keys = []
    for stage in ("down_tr64", "down_tr128", "down_tr256", "down_tr512"):
        for op in (0, 1):
            p = f"{stage}.ops.{op}"
            keys += [f"{p}.conv1.weight", f"{p}.conv1.bias", *bn_keys(f"{p}.bn1")]
    return keys


def on_meta(cls, c: EncoderCard, variant: str = "native"):
    with torch.device("meta"):
        return cls(c, variant)


def test_native_modules_have_the_published_keys_and_shapes():
    merlin = on_meta(I3DResNet, card("merlin")).state_dict()
    assert list(merlin) == i3resnet_keys([3, 8, 36, 3]) and len(merlin) == 930
    assert merlin["conv1.weight"].shape == (64, 3, 3, 7, 7)  # 3 channels: grey repeated for the ImageNet stem
    assert merlin["layer1.0.conv2.weight"].shape == (64, 64, 3, 3, 3)
    assert merlin["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1, 1)
    assert merlin["layer3.35.conv3.weight"].shape == (1024, 256, 1, 1, 1)
    assert merlin["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1, 1)

    visd = on_meta(ResNet3D, card("visd-boost")).state_dict()
    assert list(visd) == medicalnet_keys([2, 2, 2, 2]) and len(visd) == 102
    assert visd["conv1.weight"].shape == (64, 1, 7, 7, 7)
    assert visd["layer3.0.conv1.weight"].shape == (256, 128, 3, 3, 3)
    assert visd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3, 3)

    pcrl = on_meta(UNet3DEncoder, card("pcrlv2")).state_dict()
    assert list(pcrl) == pcrlv2_keys() and len(pcrl) == 56
    assert pcrl["down_tr64.ops.0.conv1.weight"].shape == (32, 1, 3, 3, 3)
    assert pcrl["down_tr64.ops.1.conv1.weight"].shape == (64, 32, 3, 3, 3)
    assert pcrl["down_tr512.ops.0.conv1.weight"].shape == (256, 256, 3, 3, 3)
    assert pcrl["down_tr512.ops.1.bn1.running_var"].shape == (512,)


# --- round trip through each published checkpoint layout -----------------------------


def build(cls, c: EncoderCard, seed: int):
    """A demo module, seeded, with random batch-norm statistics and biases (not left at 0 / 1)."""
    torch.manual_seed(seed)
    enc = cls(c, "demo")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, t in enc.state_dict().items():
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif key.endswith("num_batches_tracked"):
                t.fill_(seed + 3)
            elif key.endswith(("bias", "running_mean")):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif key.endswith("weight") and t.ndim == 1:  # batch-norm scale
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
    return enc.eval()


def merlin_layout(state, keys):
    published = {f"encode_image.i3_resnet.{k}": state[k] for k in keys}
    extra = {
        "encode_image.i3_resnet.classifier.weight": torch.randn(1692, 256, 1, 1, 1),
        "encode_image.i3_resnet.classifier.bias": torch.randn(1692),
        "encode_image.i3_resnet.contrastive_head.weight": torch.randn(512, 256, 1, 1, 1),
        "encode_image.i3_resnet.contrastive_head.bias": torch.randn(512),
        "encode_text.text_encoder.embeddings.word_embeddings.weight": torch.randn(10, 8),
        "encode_text.linear_layer.weight": torch.randn(512, 768),
        "encode_text.linear_layer.bias": torch.randn(512),
        "logit_scale": torch.tensor(1.0),
    }
    return {**published, **extra}, sorted(extra)


def visd_layout(state, keys):
    published = {f"visual_encoder.res_model.{k}": state[k] for k in keys}
    extra = {
        "visual_encoder.proj1.weight": torch.randn(256, 64, 1, 1, 1),
        "visual_encoder.proj4.bias": torch.randn(256),
        "vq_layer.embeddings": torch.randn(400, 768),
        "vq_layer.ema_dw.hidden": torch.randn(400, 768),
        "id_projs.weight": torch.randn(256, 1),
        "encoder.input1.weight": torch.randn(512, 256),
        "decoder.output2.weight": torch.randn(256, 512),
        "attention.in_proj_weight": torch.randn(768, 256),
        "vision_projs.0.weight": torch.randn(256, 256),
        "query_tokens": torch.randn(4, 256),
        "res_projs1.0.weight": torch.randn(256, 512),
        "res_projs2.3.bias": torch.randn(256),
        "text_encoder.embeddings.word_embeddings.weight": torch.randn(10, 8),
        "text_proj.weight": torch.randn(256, 768),
        "temp": torch.tensor(0.07),
    }
    return {"model": {**published, **extra}, "epoch": 10}, sorted(extra)


def pcrlv2_layout(state, keys):
    published = {k: state[k] for k in keys}
    extra = {
        "up_tr256.up_conv.weight": torch.randn(512, 512, 2, 2, 2),
        "up_tr64.predictor_head.0.weight": torch.randn(256, 128),
        "up_tr128.deep_supervision_head.conv1.weight": torch.randn(1, 256, 3, 3, 3),
        "out_tr.final_conv.weight": torch.randn(1, 64, 1, 1, 1),
        "out_tr.final_conv.bias": torch.randn(1),
    }
    return {"state_dict": {**published, **extra}, "epoch": 240}, sorted(extra)


CASES = {
    "merlin": (I3DResNet, lambda c: i3resnet_keys(c.architecture_for("demo")["layers"]), merlin_layout),
    "visd-boost": (ResNet3D, lambda c: medicalnet_keys(c.architecture_for("demo")["layers"]), visd_layout),
    "pcrlv2": (UNet3DEncoder, lambda c: pcrlv2_keys(), pcrlv2_layout),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_published_layout_loads_completely_and_reproduces_the_outputs(name, tmp_path):
    cls, expected_keys, layout = CASES[name]
    c = without_sha(card(name))
    a = build(cls, c, seed=0)
    keys = expected_keys(c)
    assert list(a.state_dict()) == keys
    payload, extra = layout(a.state_dict(), keys)
    path = tmp_path / f"{name}.pth"
    torch.save(payload, path)

    b = build(cls, c, seed=10)
    x = torch.rand(2, 1, *a.input_spec.tensor_size(), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = b(x).global_embedding
        report = load_weights(b, path)
        out_a, out_b = a(x, hidden_states=True), b.eval()(x, hidden_states=True)
    assert report.missing == [] and report.unexpected == [] and report.adapted == []
    assert report.fraction == 1.0 and len(report.loaded) == len(keys)
    assert report.ignored == extra
    assert not torch.allclose(before, out_a.global_embedding)
    assert torch.equal(out_a.global_embedding, out_b.global_embedding)
    assert torch.equal(out_a.patch_tokens, out_b.patch_tokens)
    assert all(torch.equal(p, q) for p, q in zip(out_a.hidden_states, out_b.hidden_states))


@pytest.mark.parametrize("name, grid, stage_channels", [
    ("merlin", (2, 2, 2), [32, 64, 128, 256]),  # demo 64x64x32 (H, W, D): conv1 leaves D, later stages halve all
    ("visd-boost", (2, 2, 2), [8, 16, 32, 64]),  # demo 32x64x64 (D, W, H): conv1 stride (1, 2, 2)
    ("pcrlv2", (4, 4, 2), [8, 16, 32, 64]),  # demo 32x32x16: three 2x max-pools
])
def test_output_shapes(name, grid, stage_channels):
    cls = CASES[name][0]
    c = card(name)
    enc = build(cls, c, seed=1)
    spatial = enc.input_spec.tensor_size()
    with torch.no_grad():
        out = enc(torch.rand(2, 1, *spatial), hidden_states=True)
        plain = enc(torch.rand(2, 1, *spatial))
    dim = c.architecture_for("demo")["embed_dim"]
    assert out.global_embedding.shape == (2, dim) == (2, enc.embed_dim)
    assert out.grid == grid
    assert out.patch_tokens.shape == (2, grid[0] * grid[1] * grid[2], dim)
    assert [h.shape[2] for h in out.hidden_states] == stage_channels
    grids = enc.stage_grids(spatial)
    assert grids[-1] == grid
    assert [h.shape[1] for h in out.hidden_states] == [g[0] * g[1] * g[2] for g in grids]
    assert torch.equal(out.hidden_states[-1], out.patch_tokens)
    assert torch.allclose(out.global_embedding, out.patch_tokens.mean(1), atol=1e-6)
    assert plain.hidden_states is None
    with pytest.raises(ValueError, match="expects input"):
        enc(torch.rand(2, 1, 8, 8, 8))


def test_grids_follow_the_card_axis_order():
    """Which tensor axis the stem leaves unstrided is each network's depth axis."""
    merlin = build(I3DResNet, card("merlin"), seed=2)  # H, W, D; D is Merlin's inflated axis
    visd = build(ResNet3D, card("visd-boost"), seed=2)  # D, W, H; conv1 stride (1, 2, 2)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert merlin.encode(x).grid == (1, 1, 2) == merlin.stage_grids((32, 32, 32))[-1]
        assert visd.encode(x).grid == (2, 1, 1) == visd.stage_grids((32, 32, 32))[-1]
        # Tokens run row-major over the grid in the card's order (h, w, d), though Merlin computes in (d, h, w).
        y = torch.rand(1, 1, 64, 32, 32)
        out = merlin.encode(y)
        assert out.grid == (2, 1, 2)
        last_dhw = merlin.trunk_stages(y.permute(0, 1, 4, 2, 3).repeat(1, 3, 1, 1, 1))[-1]
        assert torch.equal(out.patch_tokens, last_dhw.permute(0, 3, 4, 2, 1).reshape(1, 4, -1))


def test_card_checksum_refuses_a_file_that_is_not_the_published_one(tmp_path):
    c = card("visd-boost")
    assert c.checkpoint.sha256 is not None
    enc = build(ResNet3D, c, seed=0)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"visual_encoder.res_model.{k}": v for k, v in enc.state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match="not the published file"):
        load_weights(enc, path)


def test_pcrlv2_file_as_saved_by_train_3d_loads_with_its_args_reported(tmp_path):
    c = card("pcrlv2")
    enc = build(UNet3DEncoder, c, seed=0)
    path = tmp_path / "simance_multi_crop_luna_pretask_1.0_240.pt"
    torch.save({"opt": argparse.Namespace(lr=1e-3), "state_dict": enc.state_dict(), "epoch": 240}, path)
    report = load_weights(build(UNet3DEncoder, c, seed=1), path)
    assert report.fraction == 1.0 and report.allowed_globals == ["argparse.Namespace"]


# --- Merlin's inflation rule ----------------------------------------------------------


@pytest.mark.parametrize("kernel, stride, padding", [(7, 2, 3), (3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_inflated_kernel_gives_the_2d_response_on_a_volume_constant_along_depth(kernel, stride, padding):
    g = torch.Generator().manual_seed(0)
    w2d = torch.randn(5, 3, kernel, kernel, generator=g)
    image = torch.randn(2, 3, 20, 18, generator=g)
    ref = F.conv2d(image, w2d, stride=stride, padding=padding)  # [B, O, h, w]
    depth = 6
    volume = image.unsqueeze(2).expand(-1, -1, depth, -1, -1)  # [B, C, D, H, W], constant along D
    for center, t in ((True, 3), (False, 3), (True, 1)):
        w3d = inflate_conv_weight(w2d, t, center=center)
        assert w3d.shape == (5, 3, t, kernel, kernel)
        out = F.conv3d(volume, w3d, stride=(1, stride, stride), padding=(t // 2, padding, padding))
        assert out.shape[2] == depth
        # Centre inflation is exact on every slice; the averaged kernel only away from the zero-padded ends.
        slices = range(depth) if center else range(t // 2, depth - t // 2)
        for d in slices:
            assert torch.allclose(out[:, :, d], ref, atol=1e-4), (center, t, d)
    w_mean = inflate_conv_weight(w2d, 3, center=False)
    edge = F.conv3d(volume, w_mean, stride=(1, stride, stride), padding=(1, padding, padding))[:, :, 0]
    assert not torch.allclose(edge, ref, atol=1e-4)
    with pytest.raises(ValueError):
        inflate_conv_weight(torch.randn(5, 3, 3, 3, 3), 3)


def resnet2d_features(sd: dict[str, torch.Tensor], image: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """torchvision's ResNet (v1.5 bottlenecks) written out functionally; pooled layer4 features."""
    def bn(x, p):
        return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-5)

    x = F.relu(bn(F.conv2d(image, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for i, n in enumerate(layers):
        for j in range(n):
            p, s = f"layer{i + 1}.{j}", (2 if i > 0 and j == 0 else 1)
            out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=s, padding=1), f"{p}.bn2"))
            out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            res = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1") if j == 0 else x
            x = F.relu(out + res)
    return x.mean(dim=(2, 3))


def test_inflated_2d_resnet_reproduces_the_2d_network_on_a_volume_constant_along_depth():
    c = card("merlin")
    enc = build(I3DResNet, c, seed=3)
    layers = c.architecture_for("demo")["layers"]
    g = torch.Generator().manual_seed(4)
    sd2d = {}
    for key, t in enc.state_dict().items():  # a random 2D ResNet of the same widths
        if t.ndim == 5:
            sd2d[key] = torch.randn(t.shape[0], t.shape[1], *t.shape[3:], generator=g) * (2 / (t.shape[1] * t.shape[3] * t.shape[4])) ** 0.5
        else:
            sd2d[key] = t.clone()
    sd2d["fc.weight"], sd2d["fc.bias"] = torch.randn(1000, 256), torch.randn(1000)
    enc.load_state_dict(enc.inflate_2d_state_dict(sd2d), strict=True)
    assert enc.state_dict()["conv1.weight"].shape == (8, 3, 3, 7, 7)

    grey = torch.randn(2, 1, 32, 32, generator=g)  # H, W
    volume = grey.unsqueeze(-1).expand(-1, -1, -1, -1, 8)  # [B, 1, H, W, D], constant along D
    with torch.no_grad():
        got = enc.encode(volume).global_embedding
        want = resnet2d_features(sd2d, grey.repeat(1, 3, 1, 1), layers)
    assert got.shape == want.shape == (2, 256)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError):
        enc.inflate_2d_state_dict({"layer9.0.conv1.weight": torch.zeros(1, 1, 1, 1)})
