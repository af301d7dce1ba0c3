"""Text towers: the offline MiniLM, a clear offline error for hub ids, weights from an encoder checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from asap_bench.encoders.registry import get_card
from asap_bench.encoders.text import OFFLINE_MINILM, TextModelError, TextTower, load_text_weights, resolve_text_model


def test_offline_minilm_embeds_meaningfully():
    tower = TextTower(OFFLINE_MINILM).eval()
    with torch.inference_mode():
        a, b, c = tower(["A small pleural effusion on the left.", "Left pleural effusion, small.",
                         "The heart size is normal."])
    cos = torch.nn.functional.cosine_similarity
    assert a.shape == (384,) and tower.embed_dim == 384
    assert cos(a, b, dim=0) > cos(a, c, dim=0)
    assert len(tower.fingerprint()) == 64 and tower.fingerprint() == TextTower(OFFLINE_MINILM).fingerprint()


def test_hub_id_fails_offline_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextModelError, match="huggingface-cli download microsoft/BiomedVLP-CXR-BERT-specialized"):
        resolve_text_model("microsoft/BiomedVLP-CXR-BERT-specialized")


def test_text_weights_load_from_an_asap_checkpoint(tmp_path):
    """ASAP keeps its CXR-BERT under bert_encoder.*; a tower built from the same config takes them."""
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    torch.manual_seed(1)
    trained = BertModel(config).eval()
    folder = tmp_path / "tiny-bert"
    torch.manual_seed(2)
    BertModel(config).save_pretrained(folder)
    # MiniLM's tokenizer has BERT's vocabulary, so it serves the tiny model's folder
    AutoTokenizer.from_pretrained(resolve_text_model(OFFLINE_MINILM)).save_pretrained(folder)
    checkpoint = {"model": {**{f"bert_encoder.{k}": v for k, v in trained.state_dict().items()},
                            "blocks.0.attn.qkv.weight": torch.zeros(3)}}
    torch.save(checkpoint, tmp_path / "asap.pth")
    tower = TextTower(folder, pooling="cls").eval()
    report = load_text_weights(tower, get_card("asap"), tmp_path / "asap.pth")
    assert report.fraction == 1.0 and report.ignored == ["blocks.0.attn.qkv.weight"]
    batch = tower.tokens(["no pleural effusion"])
    with torch.inference_mode():
        assert torch.allclose(tower.model(**batch).last_hidden_state, trained(**batch).last_hidden_state)
