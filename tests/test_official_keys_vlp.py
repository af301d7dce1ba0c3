"""Checkpoints in the authors' own layout load fully through the cards of CT-CLIP, Merlin, M3D-CLIP, HLIP, fVLM.

Each fixture in fixtures/official_keys lists the key names and shapes of an official checkpoint, derived by
building the authors' public model class at a pinned commit (its ``repo``, ``commit``, ``class`` and
``notes``), and the architecture of the text model the code builds (``text_model``, ``text_config``). A file
of exactly that layout is saved the way the training script saves it and loaded through the card: into the
native vision module, and into the text tower the harness builds for the card's text model. Tensors are
zeros expanded from one element and the modules live on the ``meta`` device, so full-size models cost no
memory: the load checks names and shapes, which is what a published layout is about.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from asap_bench.encoders.checkpoints import load_weights
from asap_bench.encoders.registry import build_encoder, get_card
from asap_bench.encoders.text import load_text_weights

pytestmark = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")

FIXTURES = Path(__file__).parent / "fixtures" / "official_keys"
ENCODERS = ("ct-clip", "merlin", "m3d-clip", "hlip", "fvlm")
# TextTower pools the last hidden states; a BERT pooler is never used, and BertForMaskedLM-style
# text encoders (CXR-BERT's .bert, lavis XBertEncoder) are built without one
UNUSED_TOWER_KEYS = re.compile(r"^pooler\.")
# what a text prefix may hold beyond the encoder: an MLM head, and position ids saved as a buffer by older code
TOWER_EXTRAS = re.compile(r"^(cls\.|embeddings\.position_ids$)")


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _extra(kind: str) -> object:
    """A stand-in for a non-tensor entry of the saved dict, of the type the fixture names."""
    return {"int": 0, "str": "", "dict": {}, "None": None}[kind.split()[0]]


def save_published_layout(keys: dict[str, list[int]], container: str | None, extra: dict[str, str], path: Path) -> Path:
    """torch.save a state dict with exactly these keys and shapes, in the checkpoint's container format."""
    state = {key: torch.zeros(()).expand(shape) for key, shape in keys.items()}
    payload = state if container is None else {container: state, **{k: _extra(v) for k, v in extra.items()}}
    torch.save(payload, path)
    return path


def _layout_card(name: str):
    """The shipped card, without a sha256 pin: the file here has the published layout, not the published bytes."""
    card = get_card(name)
    return card.model_copy(update={"checkpoint": card.checkpoint.model_copy(update={"sha256": None})})


def _on_meta(build):
    with torch.device("meta"):
        return build()


@pytest.fixture(scope="module", params=ENCODERS)
def published(request, tmp_path_factory):
    name = request.param
    fixture = _fixture(name)
    path = save_published_layout(fixture["keys"], fixture["container"], fixture["extra_top_level"],
                                 tmp_path_factory.mktemp(name) / f"{name}.pth")
    return SimpleNamespace(name=name, fixture=fixture, path=path, card=_layout_card(name))


@pytest.mark.parametrize("name", ENCODERS)
def test_fixture_names_its_source(name):
    fixture, card = _fixture(name), get_card(name)
    assert fixture["encoder"] == name
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", fixture["repo"]) and re.fullmatch(r"[0-9a-f]{40}", fixture["commit"])
    assert card.code == f"https://github.com/{fixture['repo']}"
    assert fixture["derived"] in ("instantiated", "read") and fixture["files"]
    assert fixture["container"] == card.checkpoint.container_key
    assert fixture["text_model"] == card.checkpoint.text_tower.model_id, "the card's text model is not the one the code builds"
    # CT-CLIP's attention keeps zero-length null_kv parameters ([heads, 0, dim_head]): sizes may be 0
    assert len(fixture["keys"]) > 50 and all(isinstance(d, int) and d >= 0 for s in fixture["keys"].values() for d in s)


def test_published_layout_fills_the_whole_vision_module(published):
    encoder = _on_meta(lambda: build_encoder(published.card, "native"))
    report = load_weights(encoder, published.path)
    assert report.fraction == 1.0 and report.missing == []
    assert report.unexpected == [], f"{published.name}: keys outside the card's ignore_prefixes: {report.unexpected[:8]}"
    prefixes = tuple(published.card.checkpoint.ignore_prefixes)
    assert [k for k in report.ignored if not k.startswith(prefixes)] == []
    assert len(report.loaded) + len(report.ignored) == len(published.fixture["keys"])
    assert not any(k.startswith(published.fixture["groups"]["text"]) for k in report.loaded)


def test_ignore_prefixes_name_real_keys(published):
    """On a complete key list every ignore prefix matches a published key: no guessed names are left on the card."""
    if not published.fixture["complete"]:
        pytest.skip(f"{published.name}: the public code does not define the whole checkpoint")
    keys = published.fixture["keys"]
    assert [p for p in published.card.checkpoint.ignore_prefixes if not any(k.startswith(p) for k in keys)] == []


def _tower_model(fixture: dict) -> torch.nn.Module:
    """The model TextTower gets from AutoModel for the text model the official code builds (its architecture)."""
    from transformers import AutoConfig, AutoModel

    settings = dict(fixture["text_config"])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    return _on_meta(lambda: AutoModel.from_config(config))


def test_text_tower_loads_from_the_published_layout(published):
    tower = SimpleNamespace(model=_tower_model(published.fixture))
    report = load_text_weights(tower, published.card, published.path)
    prefix = published.card.checkpoint.text_tower.key_prefix
    assert prefix == published.fixture["groups"]["text"]
    published_text = {k[len(prefix):] for k in published.fixture["keys"] if k.startswith(prefix)}
    unused = [k for k in tower.model.state_dict() if UNUSED_TOWER_KEYS.match(k) and k not in published_text]
    assert sorted(report.loaded) == sorted(k for k in tower.model.state_dict() if k not in unused)
    assert report.missing == sorted(unused)
    assert all(TOWER_EXTRAS.match(k) for k in report.unexpected), report.unexpected[:8]
    if not unused:
        assert report.fraction == 1.0


def test_m3d_vision_only_file_loads_like_the_full_model(tmp_path):
    """pretrained_ViT.bin is the full model's vision_encoder.* without the prefix (lamed_arch.py loads it strictly)."""
    fixture = _fixture("m3d-clip")
    prefix = fixture["groups"]["vision"]
    keys = {k[len(prefix):]: s for k, s in fixture["keys"].items() if k.startswith(prefix)}
    path = save_published_layout(keys, None, {}, tmp_path / "pretrained_ViT.bin")
    report = load_weights(_on_meta(lambda: build_encoder(_layout_card("m3d-clip"), "native")), path)
    assert report.fraction == 1.0 and report.unexpected == [] and report.ignored == []
