"""VQA: stratified training questions, the Q-former bridge into a frozen LM, per-type and macro metrics,
and clear failures for a missing language model or a LoRA request without peft."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from asap_bench.data.manifest import load_manifest
from asap_bench.encoders.text import TextModelError
from asap_bench.metrics.text import exact_match, recompute_text
from asap_bench.protocol import get_protocol
from asap_bench.splits import ensure_split
from asap_bench.tasks.base import FeatureLookup, TaskInputs
from asap_bench.tasks.vqa import QFormer, VisualQuestionAnswering, VQAParams, stratified_sample

TYPES = ("abnormality", "location", "size", "presence", "disorder")


pytestmark = pytest.mark.usefixtures("one_thread")


def with_params(**params):
    protocol = get_protocol("vqa/radgenome")
    head = protocol.head.model_copy(update={"params": {**protocol.head.params, **params}})
    return protocol.model_copy(update={"head": head})


class ImageTokens(FeatureLookup):
    """Fixed random tokens per image (questions on one volume share them), [n, 8, 12]."""

    def __init__(self, manifest):
        images = sorted(set(manifest.frame["image"]))
        rng = np.random.default_rng(0)
        table = {im: rng.standard_normal((8, 12)).astype(np.float32) for im in images}
        self.by_case = {c: table[im] for c, im in zip(manifest.frame.index, manifest.frame["image"])}

    def global_features(self, case_ids):
        return np.stack([self.by_case[c].mean(0) for c in case_ids])

    def tokens(self, case_ids):
        return np.stack([self.by_case[c] for c in case_ids])


def _inputs(demo_root, tmp_path, protocol):
    manifest = load_manifest(demo_root, "radgenome", "vqa")
    split = ensure_split(manifest, protocol, 0, tmp_path / "splits")
    return TaskInputs(protocol, manifest, split, 1.0, 0, ImageTokens(manifest))


def test_stratified_sample_spreads_over_types_and_gives_scarce_types_all():
    types = ["a"] * 50 + ["b"] * 3 + ["c"] * 50
    rng = np.random.default_rng(0)
    rows = stratified_sample(types, 30, ("a", "b", "c"), rng)
    counts = {t: sum(types[i] == t for i in rows) for t in "abc"}
    assert counts == {"a": 14, "b": 3, "c": 13} and len(set(rows)) == 30
    assert len(stratified_sample(types, 500, ("a", "b", "c"), rng)) == len(types)
    assert stratified_sample(types, 6, ("a", "c"), rng) and all(types[i] != "b" for i in stratified_sample(types, 6, ("a", "c"), rng))


def test_qformer_shapes_and_cross_attention_every():
    p, _ = VQAParams.read(with_params(demo_qformer_layers=3, cross_attention_every=2), synthetic=True)
    bridge = QFormer(visual_dim=12, n_visual=8, out_dim=128, p=p)
    kinds = [type(layer).__name__ for layer in bridge.layers]
    assert kinds == ["TransformerDecoderLayer", "TransformerEncoderLayer", "TransformerDecoderLayer"]
    out = bridge(torch.randn(5, 8, 12))
    assert out.shape == (5, p.n_query, 128)


def test_paper_settings_are_kept_and_demo_settings_replace_them():
    paper, replaced = VQAParams.read(get_protocol("vqa/radgenome"), synthetic=False)
    assert paper.language_model == "Qwen/Qwen3-4B-Instruct-2507" and paper.train_samples == 2000 and not replaced
    assert paper.qa_types == TYPES and paper.grid is None and paper.lora["enabled"] is False
    demo, replaced = VQAParams.read(get_protocol("vqa/radgenome"), synthetic=True)
    assert isinstance(demo.language_model, dict) and "train_samples" in replaced and demo.train_samples < 2000


def test_vqa_runs_on_the_demo_cohort_with_per_type_and_macro_metrics(demo_root, tmp_path):
    protocol = with_params(demo_train_samples=60, demo_epochs=2, demo_max_new_tokens=4)
    inputs = _inputs(demo_root, tmp_path, protocol)
    result = VisualQuestionAnswering().run(inputs)
    units = result.units
    assert set(result.metrics) == set(protocol.metrics)
    assert all(v is None or 0.0 <= v <= 1.0 for v in result.metrics.values())
    # every test question is answered once; units recompute the record's macro metrics
    test_questions = [c for c in inputs.split.test]
    assert sorted(units["ids"]) == sorted(test_questions)
    assert recompute_text(units, list(protocol.metrics)) == result.metrics
    assert units["per_case"]["accuracy"] == exact_match(units["references"], units["hypotheses"])
    assert set(units["per_type"]) == set(units["groups"]) and set(units["per_type"]) <= set(TYPES)
    macro = np.mean([units["per_type"][t]["bertscore_f1"] for t in units["per_type"]])
    assert result.metrics["bertscore_f1"] == pytest.approx(macro)
    # 60 training questions drawn stratified over the five types (12 each when every type has enough)
    assert result.sizes["train"] == 60 and "abnormality 12" in result.notes["training"]
    history = result.selected["history"]
    assert len(history) == 2 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert result.provenance["text_model"].startswith("language model qwen3 random")
    assert len(result.provenance["text_model_sha256"]) == 64
    assert "no chat template" in result.notes["language_model"]


def test_missing_language_model_fails_before_training(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    protocol = with_params(demo_language_model="no-such-org/no-such-llm")
    with pytest.raises(TextModelError, match="no-such-org/no-such-llm.*huggingface-cli download"):
        VisualQuestionAnswering().run(_inputs(demo_root, tmp_path, protocol))


def test_lora_without_peft_fails_with_a_clear_message(demo_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    protocol = with_params(lora={"enabled": True, "r": 4, "alpha": 8})
    with pytest.raises(RuntimeError, match=r"lora.enabled is true but peft is not installed \(pip install peft\)"):
        VisualQuestionAnswering().run(_inputs(demo_root, tmp_path, protocol))


def test_answer_loss_equals_the_language_models_own_loss_and_gradients():
    """answer_loss (vocabulary projection on answer positions only) equals model(..., labels=...).loss,
    with the same gradients for the inputs and every weight, on right-padded rows of different lengths."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from asap_bench.tasks.vqa import answer_loss

    config = Qwen3Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.train()  # as in training (the config has no dropout, so both passes see the same network)
    g = torch.Generator().manual_seed(1)
    lengths, width = [11, 7, 9], 11
    mask = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), -100, dtype=torch.long)
    for i, (n, start) in enumerate(zip(lengths, [5, 3, 6])):
        mask[i, :n] = 1
        labels[i, start:n] = torch.randint(0, 97, (n - start,), generator=g)  # answer tokens, then padding
    base = torch.randn(3, width, 32, generator=g)

    def run(fn):
        model.zero_grad(set_to_none=True)
        embeds = base.clone().requires_grad_(True)
        loss = fn(embeds)
        loss.backward()
        return loss.detach(), embeds.grad, {k: v.grad.clone() for k, v in model.named_parameters()}

    want = run(lambda e: model(inputs_embeds=e, attention_mask=mask, labels=labels).loss)
    got = run(lambda e: answer_loss(model, e, mask, labels))
    assert float(got[0]) == pytest.approx(float(want[0]), abs=1e-5)
    assert torch.allclose(got[1], want[1], atol=1e-6, rtol=1e-4)
    assert want[2].keys() == got[2].keys()
    for name in want[2]:
        assert torch.allclose(got[2][name], want[2][name], atol=1e-6, rtol=1e-4), name
