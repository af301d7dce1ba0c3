"""Encoder cards: every shipped card loads, and a broken card says which file and field."""

from __future__ import annotations

import copy
from math import prod
from pathlib import Path

import pytest
import yaml

from asap_bench.encoders.card import (
    DEMO_MAX_VOXELS,
    GROUP_TITLES,
    EncoderCard,
    card_path,
    encoder_names,
    load_card_file,
    load_encoder_card,
)
from asap_bench.resources import resource_dir
from asap_bench.schema import SchemaError

EXPECTED = {
    "random", "asap", "simcrop", "mae", "m3ae", "mrm", "ct-clip", "merlin", "m3d-clip",
    "fvlm", "hlip", "pcrlv2", "hi-end-mae", "visd-boost",
}
# Row labels of the paper's Tables II-VI, in order, and the group each sits under.
PAPER_ROWS = [
    ("Random init", "random"), ("MAE", "ssl"), ("PCRLv2", "ssl"), ("HEMAE", "ssl"),
    ("M3AE", "vlp"), ("MRM", "vlp"), ("CT-CLIP", "vlp"), ("M3D", "vlp"), ("Merlin", "vlp"),
    ("fVLM", "vlp"), ("ViSDB", "vlp"), ("HLIP", "vlp"), ("SimCroP", "vlp"), ("ASAP", "vlp"),
]


def raw(name: str) -> dict:
    return yaml.safe_load(card_path(name).read_text(encoding="utf-8"))


def write(tmp_path: Path, data: dict, stem: str | None = None) -> Path:
    path = tmp_path / f"{stem or data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def broken(tmp_path: Path, mutate, base: str = "asap") -> SchemaError:
    data = copy.deepcopy(raw(base))
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(SchemaError) as info:
        load_card_file(path)
    assert str(path) in str(info.value)
    return info.value


# --- the shipped cards ---------------------------------------------------------------


def test_all_fourteen_cards_load_and_names_match_files():
    names = encoder_names()
    assert set(names) == EXPECTED
    assert sorted(p.stem for p in resource_dir("baselines").glob("*.yaml")) == names
    for name in names:
        card = load_encoder_card(name)
        assert isinstance(card, EncoderCard)
        assert card.name == name == card_path(name).stem


def test_groups_and_row_order_follow_the_paper():
    cards = sorted((load_encoder_card(n) for n in encoder_names()), key=lambda c: c.order)
    assert [(c.table_label, c.group) for c in cards] == PAPER_ROWS
    assert [c.order for c in cards] == list(range(len(cards)))
    assert {c.group_title for c in cards} == {GROUP_TITLES[g] for g in ("random", "ssl", "vlp")}


def test_demo_variants_are_small_and_of_the_same_family():
    for name in encoder_names():
        card = load_encoder_card(name)
        native, demo = card.architecture_for("native"), card.architecture_for("demo")
        assert set(demo) == set(native)
        assert prod(demo["img_size"]) <= DEMO_MAX_VOXELS
        assert prod(demo["img_size"]) < prod(native["img_size"])
        if "patch_size" in demo:
            assert all(i % p == 0 for i, p in zip(demo["img_size"], demo["patch_size"]))
        with pytest.raises(KeyError, match="no size variant"):
            card.architecture_for("huge")


def test_architecture_image_size_is_the_input_size_in_axis_order():
    for name in encoder_names():
        card = load_encoder_card(name)
        assert tuple(card.architecture["img_size"]) == card.input.tensor_size()
    assert load_encoder_card("hlip").input.tensor_size() == (112, 336, 336)
    assert load_encoder_card("ct-clip").input.tensor_size() == (240, 480, 480)


def test_asap_family_shares_the_paper_input_and_backbone():
    asap = load_encoder_card("asap")
    assert asap.input.spacing == (1.5, 1.5, 3.0)
    assert asap.input.hu_window == (-1000, 1000) and asap.input.value_range == (-1, 1)
    assert asap.input.size == (224, 224, 112)
    backbone = lambda arch: {k: v for k, v in arch.items() if k != "pos_embed"}  # noqa: E731
    for name in ("random", "simcrop", "mae", "m3ae", "mrm"):
        card = load_encoder_card(name)
        assert card.family == "vit3d" and backbone(card.architecture) == backbone(asap.architecture)
        assert card.paper_input.uses_asap_input is True
    random = load_encoder_card("random")
    assert random.checkpoint.availability == "none"
    assert random.architecture["pos_embed"] == "zeros"  # the benchmark's random row: a table nothing fills


def test_segmentation_and_status_are_declared_honestly():
    for name in ("merlin", "visd-boost", "pcrlv2"):
        assert load_encoder_card(name).segmentation.mode == "not_applicable"
    for name in encoder_names():
        card = load_encoder_card(name)
        if card.segmentation.mode == "unetr":
            assert card.family in ("vit3d", "monai_vit", "hlip_vit")
        if card.status.level != "faithful" or card.checkpoint.availability == "unknown":
            assert card.unverified() or card.status.level == "not_rebuilt", name


def test_text_weights_in_a_checkpoint_are_ignored_by_the_vision_loader():
    for name in encoder_names():
        ckpt = load_encoder_card(name).checkpoint
        if ckpt.text_tower and ckpt.text_tower.key_prefix:
            assert ckpt.map_key(ckpt.text_tower.key_prefix + "encoder.layer.0.weight") is None, name


@pytest.mark.parametrize("name, published, expected", [
    ("hlip", "module.visual.trunk.blocks.3.attn.qkv.weight", "blocks.3.attn.qkv.weight"),
    ("hlip", "module.visual.trunk.spatial_posemb", "spatial_posemb"),
    ("hlip", "module.text.transformer.embeddings.word_embeddings.weight", None),
    ("hlip", "module.visual.head.proj.weight", None),
    ("hi-end-mae", "module.encoder_pos_embed", "pos_embed"),
    ("hi-end-mae", "module.encoder.blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.weight"),
    ("hi-end-mae", "module.decoder_pos_embed", None),
    ("hi-end-mae", "module.encoder_to_decoder.0.weight", None),
    ("ct-clip", "visual_transformer.enc_spatial_transformer.layers.0.0.norm.gamma",
     "enc_spatial_transformer.layers.0.0.norm.gamma"),
    ("ct-clip", "to_text_latent.weight", None),
    ("merlin", "encode_image.i3_resnet.layer4.2.conv3.weight", "layer4.2.conv3.weight"),
    ("merlin", "logit_scale", None),
    ("asap", "blocks.11.norm2.weight", "blocks.11.norm2.weight"),
    ("asap", "decoder_blocks.0.attn.qkv.weight", None),
    ("fvlm", "visual_encoder.patch_embedding.position_embeddings", "patch_embedding.position_embeddings"),
    ("visd-boost", "visual_encoder.res_model.layer1.0.conv1.weight", "layer1.0.conv1.weight"),
    ("pcrlv2", "down_tr512.ops.1.conv1.weight", "down_tr512.ops.1.conv1.weight"),
    ("pcrlv2", "up_tr256.up_conv.weight", None),
])
def test_checkpoint_keys_map_to_the_harness_module(name, published, expected):
    assert load_encoder_card(name).checkpoint.map_key(published) == expected


# --- unknown names --------------------------------------------------------------------


def test_unknown_name_suggests_close_matches():
    with pytest.raises(KeyError) as info:
        load_encoder_card("asapp")
    message = str(info.value)
    assert "'asap'" in message and "did you mean" in message
    with pytest.raises(KeyError, match="known encoders"):
        load_encoder_card("zzzz-nothing-like-it")


# --- broken cards name the file and the field ----------------------------------------


def test_unknown_field_is_an_error(tmp_path):
    err = broken(tmp_path, lambda d: d.update(embed_dimm=768))
    assert "field 'embed_dimm'" in str(err) and "unknown field" in str(err)


def test_unknown_nested_field_is_an_error(tmp_path):
    err = broken(tmp_path, lambda d: d["checkpoint"].update(containerkey="model"))
    assert "field 'checkpoint.containerkey'" in str(err)


def test_bad_group_is_an_error(tmp_path):
    err = broken(tmp_path, lambda d: d.update(group="med-vlp"))
    assert "field 'group'" in str(err) and "'vlp'" in str(err)


def test_bad_key_map_regex_is_an_error(tmp_path):
    err = broken(tmp_path, lambda d: d["checkpoint"].update(key_map=[["^blocks\\.(\\d+", "layers.\\1"]]))
    assert "field 'checkpoint.key_map'" in str(err) and "does not compile" in str(err)


def test_key_map_replacement_must_refer_to_existing_groups(tmp_path):
    err = broken(tmp_path, lambda d: d["checkpoint"].update(key_map=[["^blocks\\.", "layers.\\2."]]))
    assert "field 'checkpoint.key_map'" in str(err) and "group 2" in str(err)


def test_name_must_equal_the_file_stem(tmp_path):
    path = write(tmp_path, raw("asap"), stem="asap-copy")
    with pytest.raises(SchemaError) as info:
        load_card_file(path)
    assert str(path) in str(info.value) and "field 'name'" in str(info.value)


def test_bad_name_pattern_is_an_error(tmp_path):
    data = raw("asap")
    data["name"] = "ASAP_v2"
    path = write(tmp_path, data, stem="ASAP_v2")
    with pytest.raises(SchemaError, match="field 'name'"):
        load_card_file(path)


def test_value_range_must_increase(tmp_path):
    err = broken(tmp_path, lambda d: d["input"].update(value_range=[1, -1]))
    assert "field 'input.value_range'" in str(err) and "low < high" in str(err)
    err = broken(tmp_path, lambda d: d["input"].update(hu_window=None))
    assert "field 'input.hu_window'" in str(err)


def test_sizes_must_be_positive(tmp_path):
    err = broken(tmp_path, lambda d: d["architecture"].update(depth=0))
    assert "field 'architecture'" in str(err) and "architecture.depth must be positive" in str(err)
    err = broken(tmp_path, lambda d: d["sizes"]["demo"].update(num_heads=-2))
    assert "field 'sizes'" in str(err) and "sizes.demo.num_heads must be positive" in str(err)


def test_demo_overrides_only_known_keys_and_is_required(tmp_path):
    err = broken(tmp_path, lambda d: d["sizes"]["demo"].update(embed_dims=48))
    assert "field 'sizes'" in str(err) and "embed_dims" in str(err)
    err = broken(tmp_path, lambda d: d.update(sizes={"tiny": {"depth": 1}}))
    assert "field 'sizes'" in str(err) and "'demo'" in str(err)


def test_patch_must_divide_the_image(tmp_path):
    err = broken(tmp_path, lambda d: d["sizes"]["demo"].update(img_size=[60, 64, 32]))
    assert "field 'sizes'" in str(err) and "not divisible" in str(err)


def test_embed_dim_agrees_with_the_architecture(tmp_path):
    err = broken(tmp_path, lambda d: d.update(embed_dim=512))
    assert "field 'embed_dim'" in str(err)


def test_unetr_needs_hidden_states(tmp_path):
    err = broken(tmp_path, lambda d: d.update(outputs=["global", "patch_tokens"]))
    assert "field 'segmentation'" in str(err) and "hidden_states" in str(err)


def test_image_size_must_agree_with_the_input(tmp_path):
    err = broken(tmp_path, lambda d: d["input"].update(axis_order="DHW"))
    assert "field 'input'" in str(err) and "architecture.img_size" in str(err)
    err = broken(tmp_path, lambda d: d["input"].update(axis_order="XYZ"))
    assert "field 'input.axis_order'" in str(err)


def test_container_key_is_a_string_or_null(tmp_path):
    err = broken(tmp_path, lambda d: d["checkpoint"].update(container_key=""))
    assert "field 'checkpoint.container_key'" in str(err)
    err = broken(tmp_path, lambda d: d["checkpoint"].update(container_key=["model"]))
    assert "field 'checkpoint.container_key'" in str(err)
    data = copy.deepcopy(raw("asap"))
    data["checkpoint"]["container_key"] = None
    assert load_card_file(write(tmp_path, data)).checkpoint.container_key is None


def test_random_group_goes_with_no_checkpoint(tmp_path):
    err = broken(tmp_path, lambda d: d.update(group="random"))
    assert "field 'checkpoint'" in str(err) and "availability 'none'" in str(err)


def test_yaml_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "asap.yaml"
    path.write_text("name: asap\ngroup: [vlp\n", encoding="utf-8")
    with pytest.raises(SchemaError, match="line"):
        load_card_file(path)
