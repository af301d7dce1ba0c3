"""Checkpoints in the authors' own layout load fully through the cards of ASAP, SimCroP, PCRLv2, Hi-End-MAE, ViSD-Boost.

Each fixture in fixtures/official_keys lists the key names and shapes of an official checkpoint, derived
from the authors' public model code at a pinned commit (see its ``repo``, ``commit`` and ``notes``). A file
of exactly that layout is saved the way the training script saves it (container key, ``args`` Namespace,
optimizer and epoch entries) and loaded through the card into the native module. Its tensors are zeros
expanded from one element, so a full-size file stays a few kilobytes, and the modules are built on the
``meta`` device: what is checked is which keys fill which module entries, at which shapes.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from asap_bench.encoders.checkpoints import load_weights
from asap_bench.encoders.registry import build_encoder, get_card
from asap_bench.encoders.text import load_text_weights

FIXTURES = Path(__file__).parent / "fixtures" / "official_keys"
ENCODERS = ("asap", "simcrop", "pcrlv2", "hi-end-mae", "visd-boost")
# loading into a meta module checks names and shapes and copies nothing; torch says so once per tensor
pytestmark = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
# BertModel's pooler: BertForMaskedLM-style encoders (CXR-BERT, lavis XBertEncoder) are built without one,
# and TextTower pools the last hidden states, so it is never filled and never used.
UNUSED_TOWER_KEYS = re.compile(r"^pooler\.")
# what a text prefix may hold beyond the encoder: an MLM head, and position ids saved as a buffer by older code
TOWER_EXTRAS = re.compile(r"^(cls\.|embeddings\.position_ids$)")


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _extra(kind: str) -> object:
    """A stand-in for a non-tensor entry of the saved dict, of the type the fixture names."""
    if kind == "argparse.Namespace":
        return argparse.Namespace(model="official", lr=1e-4)
    return {"int": 0, "str": "", "dict": {}}[kind.split()[0]]


def save_published_layout(fixture: dict, path: Path) -> Path:
    """torch.save a state dict with exactly the fixture's keys and shapes, in its container format."""
    state = {key: torch.zeros(()).expand(shape) for key, shape in fixture["keys"].items()}
    container = fixture["container"]
    payload = state if container is None else {
        container: state, **{k: _extra(v) for k, v in fixture["extra_top_level"].items()}}
    torch.save(payload, path)
    return path


def _layout_card(name: str):
    """The shipped card, without its sha256 pin: the file here has the published layout, not the published bytes."""
    card = get_card(name)
    return card.model_copy(update={"checkpoint": card.checkpoint.model_copy(update={"sha256": None})})


@pytest.fixture(scope="module", params=ENCODERS)
def published(request, tmp_path_factory):
    name = request.param
    fixture = _fixture(name)
    path = save_published_layout(fixture, tmp_path_factory.mktemp(name) / f"{name}.pth")
    return SimpleNamespace(name=name, fixture=fixture, path=path, card=_layout_card(name))


@pytest.mark.parametrize("name", ENCODERS)
def test_fixture_names_its_source(name):
    fixture = _fixture(name)
    assert fixture["encoder"] == name
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", fixture["repo"]) and re.fullmatch(r"[0-9a-f]{40}", fixture["commit"])
    assert fixture["derived"] in ("instantiated", "read") and fixture["files"]
    assert fixture["container"] == get_card(name).checkpoint.container_key
    shapes = fixture["keys"].values()
    assert len(fixture["keys"]) > 50 and all(isinstance(d, int) and d > 0 for s in shapes for d in s)


def test_published_layout_fills_the_whole_vision_module(published):
    with torch.device("meta"):
        encoder = build_encoder(published.card, "native")
    report = load_weights(encoder, published.path)
    assert report.fraction == 1.0 and report.missing == []
    assert report.unexpected == [], f"{published.name}: keys outside the card's ignore_prefixes: {report.unexpected[:8]}"
    assert len(report.loaded) + len(report.ignored) == len(published.fixture["keys"])
    namespaces = [v for v in published.fixture["extra_top_level"].values() if v == "argparse.Namespace"]
    assert report.allowed_globals == (["argparse.Namespace"] if namespaces else [])


def test_ignore_prefixes_name_real_keys(published):
    """On a complete key list every ignore prefix matches a published key: no guessed names are left on the card."""
    if not published.fixture["complete"]:
        pytest.skip(f"{published.name}: the public code does not define the whole checkpoint")
    keys = published.fixture["keys"]
    stale = [p for p in published.card.checkpoint.ignore_prefixes if not any(k.startswith(p) for k in keys)]
    assert stale == []


def _tower_model(fixture: dict, prefix: str) -> torch.nn.Module:
    """The BERT that TextTower gets from AutoModel for a folder of this tower's sizes (read off the fixture)."""
    from transformers import AutoModel, BertConfig

    keys = {k[len(prefix):]: s for k, s in fixture["keys"].items() if k.startswith(prefix)}
    vocab, hidden = keys["embeddings.word_embeddings.weight"]
    layers = {int(k.split(".")[2]) for k in keys if k.startswith("encoder.layer.")}
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers),
                        num_attention_heads=hidden // 64,
                        intermediate_size=keys["encoder.layer.0.intermediate.dense.weight"][0],
                        max_position_embeddings=keys["embeddings.position_embeddings.weight"][0],
                        type_vocab_size=keys["embeddings.token_type_embeddings.weight"][0])
    with torch.device("meta"):
        return AutoModel.from_config(config)


def test_text_tower_loads_from_the_published_layout(published):
    tower_spec = published.card.checkpoint.text_tower
    if tower_spec is None or tower_spec.key_prefix is None:
        pytest.skip(f"{published.name}: no text tower in its checkpoint")
    prefix = tower_spec.key_prefix
    tower = SimpleNamespace(model=_tower_model(published.fixture, published.fixture["groups"]["text"]))
    report = load_text_weights(tower, published.card, published.path)
    assert prefix == published.fixture["groups"]["text"]
    filled = [k for k in tower.model.state_dict() if not UNUSED_TOWER_KEYS.match(k)]
    assert sorted(report.loaded) == sorted(filled)
    assert all(UNUSED_TOWER_KEYS.match(k) for k in report.missing)
    assert all(TOWER_EXTRAS.match(k) for k in report.unexpected), report.unexpected[:8]
