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


def _tiny_bert(seed: int) -> BertModel:
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    torch.manual_seed(seed)
    return BertModel(config).eval()


def _saved(model: BertModel, folder):
    """``model`` as a local text-model folder; MiniLM's tokenizer has BERT's vocabulary, so it serves it."""
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_text_model(OFFLINE_MINILM)).save_pretrained(folder)
    return folder


def test_text_weights_load_from_an_asap_checkpoint(tmp_path):
    """ASAP keeps its CXR-BERT encoder under bert_encoder.bert.*; a tower built from the same config takes them."""
    trained = _tiny_bert(1)
    folder = _saved(_tiny_bert(2), tmp_path / "tiny-bert")
    checkpoint = {"model": {**{f"bert_encoder.bert.{k}": v for k, v in trained.state_dict().items()},
                            "blocks.0.attn.qkv.weight": torch.zeros(3)}}
    torch.save(checkpoint, tmp_path / "asap.pth")
    tower = TextTower(folder, pooling="cls").eval()
    report = load_text_weights(tower, get_card("asap"), tmp_path / "asap.pth")
    pooler = sorted(f"bert_encoder.bert.{k}" for k in trained.state_dict() if k.startswith("pooler."))
    assert report.fraction == 1.0  # the pooler never runs: the checkpoint's is ignored
    assert report.ignored == sorted(["blocks.0.attn.qkv.weight", *pooler])
    batch = tower.tokens(["no pleural effusion"])
    with torch.inference_mode():
        assert torch.allclose(tower.model(**batch).last_hidden_state, trained(**batch).last_hidden_state)


def test_a_bert_whose_config_needs_remote_code_loads_as_bert_and_runs_none(tmp_path):
    """CXR-BERT-specialized's config names model_type 'cxr-bert' with an auto_map to its repository's code."""
    import json

    reference = _tiny_bert(3)
    folder = _saved(reference, tmp_path / "cxr-bert-like")
    sentinel = tmp_path / "remote-code-ran"
    (folder / "configuration_cxrbert.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="cxr-bert", architectures=["CXRBertModel"],
               auto_map={"AutoConfig": "configuration_cxrbert.CXRBertConfig",
                         "AutoModel": "modeling_cxrbert.CXRBertModel"})
    (folder / "config.json").write_text(json.dumps(raw))
    tower = TextTower(folder, pooling="cls").eval()
    assert not sentinel.exists()
    assert not any(k.startswith("pooler.") for k in tower.model.state_dict())
    batch = tower.tokens(["small left pleural effusion"])
    with torch.inference_mode():
        assert torch.allclose(tower.model(**batch).last_hidden_state, reference(**batch).last_hidden_state)
