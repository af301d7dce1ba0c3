"""Vocabulary classification and retrieval through trained projections (CT-CLIP protocol)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asap_bench.data.manifest import label_matrix, load_manifest
from asap_bench.data.text_cache import embed_texts
from asap_bench.encoders.text import OFFLINE_MINILM, TextModelError, resolve_text_model
from asap_bench.metrics.classification import score_outputs
from asap_bench.metrics.retrieval import score_units
from asap_bench.protocol import Protocol, get_protocol
from asap_bench.splits import make_split
from asap_bench.tasks.base import FeatureLookup, TaskInputs, get_family
from asap_bench.tasks.contrastive import (
    ContrastiveParams, Projections, Retrieval, VocabularyClassification, report_texts,
)

from conftest import ctrate_rows, write_table


class TableFeatures(FeatureLookup):
    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def global_features(self, case_ids: list[str]) -> np.ndarray:
        return np.stack([self.table[c] for c in case_ids]).astype(np.float32)


def label_features(manifest, dim: int = 64, noise: float = 0.5, seed: int = 0) -> TableFeatures:
    """Features that carry the labels (a random linear map of them) plus noise: something to learn from."""
    Y = label_matrix(manifest, "abnormality").fillna(0).to_numpy(float)
    rng = np.random.default_rng(seed)
    X = Y @ rng.normal(size=(Y.shape[1], dim)) + noise * rng.normal(size=(len(Y), dim))
    return TableFeatures(dict(zip(manifest.frame.index, X)))


def with_params(protocol_id: str, **params) -> Protocol:
    raw = get_protocol(protocol_id).model_dump()
    raw["head"]["params"].update(params)
    return Protocol.model_validate(raw)


def run(family, protocol, manifest, features, cache: Path, seed: int = 0):
    split = make_split(manifest, protocol, seed)
    inputs = TaskInputs(protocol, manifest, split, 1.0, seed, features=features)
    inputs.cache_dir = cache
    return family.run(inputs)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is several times faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text-cache")


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> Path:
    """A 2-layer BERT built from scratch with MiniLM's tokenizer: a frozen text model that embeds the
    demo's reports in a second on a CPU (MiniLM itself takes about a minute for them)."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    source = resolve_text_model(OFFLINE_MINILM)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    return folder


def demo_protocol(protocol_id: str, text_model: Path) -> Protocol:
    return with_params(protocol_id, demo_text_model=str(text_model))


@pytest.fixture(scope="module")
def demo_runs(demo_root, text_cache, tiny_text_model):
    """Both families on the demo CT-RATE stand-in (demo head params), with features that carry the labels."""
    torch.set_num_threads(1)
    manifest = load_manifest(demo_root, "ct-rate")
    features = label_features(manifest)
    ret = run(Retrieval(), demo_protocol("ret/ct-rate", tiny_text_model), manifest, features, text_cache)
    voc = run(VocabularyClassification(), demo_protocol("voc/ct-rate", tiny_text_model), manifest, features,
              text_cache)
    return manifest, features, ret, voc


# --------------------------------------------------------------------------- acceptance on the demo

def test_retrieval_on_the_demo_is_clearly_above_chance(demo_runs):
    _, _, ret, _ = demo_runs
    chance_v2r = 5 / ret.sizes["test_reports"]
    assert ret.sizes["test_reports"] >= 20 and ret.sizes["test_volumes"] > ret.sizes["test_reports"]
    assert ret.metrics["recall@5_v2r"] >= max(0.5, 3 * chance_v2r), ret.metrics
    assert ret.metrics["recall@5_r2v"] >= 0.5, ret.metrics
    assert ret.metrics["recall@1_v2r"] <= ret.metrics["recall@5_v2r"] <= ret.metrics["recall@10_v2r"]
    assert "text_model" in ret.notes["demo"] and "lr" in ret.notes["demo"]
    assert "every query is a hit" in ret.notes["recall@50_v2r"]  # 50 >= the demo's pool of reports


def test_vocabulary_classification_on_the_demo_is_above_chance(demo_runs):
    _, _, _, voc = demo_runs
    assert voc.metrics["auc"] > 0.58, voc.metrics
    assert len(voc.units["per_label"]) == 18 and voc.sizes["labels"] == 18


def test_records_say_which_text_model_and_recompute_from_their_units(demo_runs, tiny_text_model):
    _, _, ret, voc = demo_runs
    for result in (ret, voc):
        assert result.provenance["text_model"] == str(tiny_text_model)
        assert len(result.provenance["text_model_sha256"]) == 64
        assert 1 <= result.selected["epoch"] <= 30
        assert len(result.units["val_curve"]) == 30
    again = score_units(ret.units, list(ret.metrics))
    assert {m: (v.value if v.defined else None) for m, v in again.items()} == pytest.approx(ret.metrics)
    ids = ret.units["ids"]
    assert len(set(ids)) == len(ids) == ret.sizes["test_volumes"] + ret.sizes["test_reports"]
    assert all(len(v) == len(ids) for v in ret.units["per_case"].values())
    units = voc.units
    recomputed = score_outputs(units["task"], np.array(units["labels"], dtype=float),
                               np.array(units["scores"], dtype=float), list(voc.metrics), units["score_names"],
                               units["thresholds"])
    assert {m: v.value for m, v in recomputed.items()} == pytest.approx(voc.metrics)
    assert units["thresholds"] == [0.5] * 18
    assert units["prompts"][:2] == ["Medical material is present.", "Medical material is not present."]


def test_same_seed_same_result_and_seeds_reuse_cached_text(demo_runs, text_cache, tiny_text_model, monkeypatch):
    manifest, features, ret, _ = demo_runs
    protocol = demo_protocol("ret/ct-rate", tiny_text_model)

    def no_model(*args, **kwargs):
        raise AssertionError("the text model was loaded although its embeddings are cached")

    monkeypatch.setattr("asap_bench.encoders.text.TextTower", no_model)
    again = run(Retrieval(), protocol, manifest, features, text_cache)
    assert again.metrics == ret.metrics and again.units["rank"] == ret.units["rank"]
    other = run(Retrieval(), protocol, manifest, features, text_cache, seed=1)
    assert other.units["val_curve"] != ret.units["val_curve"]


# --------------------------------------------------------------------------- the mechanism

@pytest.fixture(scope="module")
def real_layout_root(tmp_path_factory) -> Path:
    """A small CT-RATE-shaped table that is not the demo cohort, so the paper's head params apply."""
    root = tmp_path_factory.mktemp("real-layout")
    rows = ctrate_rows(40, seed=3, max_volumes=1, test_share=0.3)
    for row in rows:
        row["findings"], row["impression"] = f"Report of {row['case_id']}.", "No acute finding."
    write_table(root, "ct-rate", "volumes", rows)
    return root


def test_a_hub_text_model_that_is_not_on_disk_fails_the_job_with_what_to_do(real_layout_root, text_cache):
    manifest = load_manifest(real_layout_root, "ct-rate")
    assert not manifest.synthetic
    protocol = get_protocol("ret/ct-rate")  # the paper's CXR-BERT, named by hub id
    with pytest.raises(TextModelError, match="not on this machine.*huggingface-cli download"):
        run(Retrieval(), protocol, manifest, label_features(manifest), text_cache)


def test_both_families_are_registered():
    assert isinstance(get_family(get_protocol("voc/ahph")), VocabularyClassification)
    assert isinstance(get_family(get_protocol("ret/ct-rate")), Retrieval)


def test_demo_params_apply_only_to_the_synthetic_cohort():
    protocol = get_protocol("voc/ct-rate")
    paper = ContrastiveParams.from_protocol(protocol, synthetic=False)
    demo = ContrastiveParams.from_protocol(protocol, synthetic=True)
    assert paper.text_model == "microsoft/BiomedVLP-CXR-BERT-specialized" and paper.text_pooling == "cls"
    assert (paper.batch_size, paper.lr, paper.epochs, paper.projection_dim) == (128, 1e-4, 30, 512)
    assert paper.demo_keys == ()
    assert demo.text_model == OFFLINE_MINILM and demo.text_pooling == "mean" and demo.batch_size == 32
    assert set(demo.demo_keys) == {"text_model", "text_pooling", "batch_size", "lr"}


@pytest.mark.parametrize("params, message", [
    ({"learning_rate": 0.1}, "unknown head param"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of"),
    ({"prompts": {"positive": "present", "negative": "{X} absent"}}, "prompts must be"),
    ({"epochs": 0}, "epochs must be positive"),
    ({"balanced_acc_threshold": 1.5}, r"threshold must be in \(0, 1\)"),
])
def test_bad_head_params_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveParams.from_protocol(with_params("voc/ct-rate", **params), synthetic=False)


def test_loss_is_clip_infonce_and_identical_reports_are_not_negatives():
    torch.manual_seed(0)
    model = Projections(6, 5, 4, 1.0)
    x, t = torch.randn(5, 6), torch.randn(5, 5)
    logits = model.scale() * model.embed_visual(x) @ model.embed_text(t).T
    labels = torch.arange(5)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert model.loss(x, t, torch.arange(5)).item() == pytest.approx(clip.item(), rel=1e-6)
    # pairs 0 and 1 carry one report: each row's target is split between both
    t[1] = t[0]
    logits = model.scale() * model.embed_visual(x) @ model.embed_text(t).T
    target = torch.eye(5)
    target[:2, :2] = 0.5
    manual = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert model.loss(x, t, torch.tensor([0, 0, 1, 2, 3])).item() == pytest.approx(manual.item(), rel=1e-6)


def test_text_cache_keys_on_the_texts(text_cache):
    a, info = embed_texts(OFFLINE_MINILM, ["No effusion.", "Cardiomegaly.", "No effusion."], pooling="mean",
                          max_length=512, root=text_cache)
    assert a.shape == (3, info.dim) and np.array_equal(a[0], a[2])
    b, _ = embed_texts(OFFLINE_MINILM, ["Cardiomegaly."], pooling="mean", max_length=512, root=text_cache)
    assert np.allclose(a[1], b[0], atol=1e-5)
    assert info.max_length == 512 and info.sha256 and not math.isnan(float(a.sum()))
    with pytest.raises(ValueError, match="empty"):
        embed_texts(OFFLINE_MINILM, ["fine", "  "], pooling="mean", max_length=16, root=text_cache)


def test_report_text_joins_the_protocol_columns_and_skips_cases_without_text(real_layout_root):
    import dataclasses

    manifest = load_manifest(real_layout_root, "ct-rate")
    frame = manifest.frame.copy()
    a, b, c = frame.index[:3]
    frame.loc[a, ["findings", "impression"]] = ["Effusion.", ""]
    frame.loc[b, ["findings", "impression"]] = [float("nan"), "  "]
    frame.loc[c, ["findings", "impression"]] = ["Nodule.", "Follow up."]
    manifest = dataclasses.replace(manifest, frame=frame)
    texts = report_texts(manifest, ("findings", "impression"), [a, b, c])
    assert texts == {a: "Effusion.", c: "Nodule. Follow up."}
    with pytest.raises(ValueError, match=r"report column\(s\) \['Findings_EN'\] are missing"):
        report_texts(manifest, ("Findings_EN",), [a])


# --------------------------------------------------------------------------- an encoder's own text tower

def _asap_checkpoint(path: Path, text_state: dict | None) -> Path:
    """ASAP's save_model layout: vision keys at the top of 'model', the CXR-BERT tower under bert_encoder.bert."""
    import argparse

    model = {"blocks.0.norm1.weight": torch.ones(48)}
    if text_state is not None:
        model.update({f"bert_encoder.bert.{k}": v for k, v in text_state.items()})
    torch.save({"model": model, "epoch": 1, "args": argparse.Namespace(mask_ratio=0.75)}, path)
    return path


def test_voc_and_ret_can_take_the_encoders_own_text_tower(demo_root, text_cache, tiny_text_model, tmp_path):
    """``text_tower: encoder`` loads the checkpoint's tower in full into the text model; its weights key the
    cache and the provenance, so it never shares embeddings with the text model's own weights."""
    from transformers import BertModel

    from asap_bench.encoders.registry import get_card
    from asap_bench.tasks.base import CheckpointRef

    manifest = load_manifest(demo_root, "ct-rate")
    features = label_features(manifest)
    torch.manual_seed(5)
    own = BertModel.from_pretrained(tiny_text_model).state_dict()
    tuned = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in own.items()}
    checkpoint = _asap_checkpoint(tmp_path / "asap.pth", tuned)
    ref = CheckpointRef(get_card("asap"), checkpoint, None)

    def job(protocol_id: str, family, ref):
        protocol = with_params(protocol_id, demo_text_model=str(tiny_text_model), text_tower="encoder")
        split = make_split(manifest, protocol, 0)
        inputs = TaskInputs(protocol, manifest, split, 1.0, 0, features=features, cache_dir=text_cache, checkpoint=ref)
        return family.run(inputs)

    voc = job("voc/ct-rate", VocabularyClassification(), ref)
    ret = job("ret/ct-rate", Retrieval(), ref)
    plain = run(VocabularyClassification(), demo_protocol("voc/ct-rate", tiny_text_model), manifest, features,
                text_cache)
    for result in (voc, ret):
        assert "asap's own text tower (asap.pth, under 'bert_encoder.bert.') loaded in full" in result.notes["text_tower"]
        assert result.provenance["text_model_sha256"] != plain.provenance["text_model_sha256"]
        assert all(v is None or math.isfinite(v) for v in result.metrics.values())
    assert voc.metrics != plain.metrics  # other text weights, other prompt embeddings

    empty = CheckpointRef(get_card("asap"), _asap_checkpoint(tmp_path / "vision-only.pth", None), None)
    with pytest.raises(Exception, match="vision-only.pth: no text-tower weights under 'bert_encoder.bert.'"):
        job("voc/ct-rate", VocabularyClassification(), empty)
    partial = {k: v for k, v in tuned.items() if not k.startswith("encoder.layer.1.")}
    short = CheckpointRef(get_card("asap"), _asap_checkpoint(tmp_path / "short.pth", partial), None)
    with pytest.raises(Exception, match=r"short.pth: only .* of asap text tower's weights were loaded"):
        job("ret/ct-rate", Retrieval(), short)
    with pytest.raises(ValueError, match="text_tower 'encoder' needs a checkpoint; random has none"):
        job("voc/ct-rate", VocabularyClassification(), CheckpointRef(get_card("random"), None, None))
