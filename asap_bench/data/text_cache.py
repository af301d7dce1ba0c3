"""Content-keyed cache of frozen text embeddings (reports, prompts).

An entry holds the embeddings of one list of unique texts under one text model
(its weight hash), pooling and maximum length; the key is the hash of all of
them, so seeds, regimes and the families that read the same reports share one
entry, and a different model or text can never be served a stale one. Entries
are written in a temporary folder and renamed into place, and carry the checks
of their array (shape, dtype, size, sha256): a damaged entry is named, discarded
and computed again. The text model is only loaded when an entry has to be computed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..schema import content_hash
from .cache import DamagedEntry, cache_root, discard, open_entry, seal, write_meta
from .cache_kinds import TEXT

if TYPE_CHECKING:
    from ..encoders.card import EncoderCard

FORMAT_VERSION = 2


@dataclass(frozen=True)
class TextWeights:
    """An encoder checkpoint's own text tower (e.g. ASAP's ``bert_encoder.bert.*``), loaded in full into the
    text model in place of the model's own weights; it keys the cache by the checkpoint's sha256."""

    card: "EncoderCard"
    checkpoint: Path
    checkpoint_sha256: str

    def key(self, model_sha256: str) -> str:
        prefix = self.card.checkpoint.text_tower.key_prefix if self.card.checkpoint.text_tower else None
        return content_hash({"text_model": model_sha256, "checkpoint": self.checkpoint_sha256, "prefix": prefix})


@dataclass(frozen=True)
class TextModelInfo:
    """What produced a set of text embeddings; goes into the result's provenance."""

    name: str
    sha256: str
    pooling: str
    max_length: int
    dim: int


def text_key(model_sha256: str, pooling: str, max_length: int, texts: list[str]) -> str:
    return content_hash({"kind": TEXT, "format": FORMAT_VERSION, "model_sha256": model_sha256, "pooling": pooling,
                         "max_length": int(max_length), "texts": content_hash(texts)})


def embed_texts(model: str, texts: list[str], *, pooling: str, max_length: int, root: Path | None = None,
                device: str = "cpu", batch_size: int = 32,
                weights: TextWeights | None = None) -> tuple[np.ndarray, TextModelInfo]:
    """Frozen embeddings [len(texts), dim] float32 of ``texts`` (duplicates computed once), cached.

    ``max_length`` is capped at the model's position-embedding limit; the info says what was used.
    With ``weights``, the model's architecture and tokenizer take the checkpoint's text tower,
    which must fill it completely.
    """
    from ..encoders.text import resolve_text_model, text_model_sha256

    if not texts:
        raise ValueError("no texts to embed")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"{len(bad)} text(s) are empty or not strings, e.g. positions {bad[:5]}")
    unique = list(dict.fromkeys(texts))
    sha = text_model_sha256(model)
    if weights is not None:
        sha = weights.key(sha)
    limit = _position_limit(resolve_text_model(model))
    length = min(int(max_length), limit) if limit else int(max_length)
    key = text_key(sha, pooling, length, unique)
    folder = (root or cache_root()) / TEXT / key
    array = _open(folder, len(unique)) if folder.exists() else None
    if array is None:
        _compute(folder, model, unique, pooling, length, device, batch_size, sha, weights)
        array = _read(folder, len(unique))
    row = {t: i for i, t in enumerate(unique)}
    embeddings = np.asarray(array[[row[t] for t in texts]], dtype=np.float32)
    return embeddings, TextModelInfo(str(model), sha, pooling, length, int(array.shape[1]))


def _read(folder: Path, n_texts: int) -> np.ndarray:
    """The entry's embeddings once its files pass their checks; ``DamagedEntry`` otherwise."""
    meta = open_entry(folder)
    array = np.load(folder / "embeddings.npy")
    if array.ndim != 2 or array.shape[0] != n_texts or meta.get("n_texts") != n_texts:
        raise DamagedEntry(folder / "embeddings.npy", f"holds {array.shape[0]} rows, expected {n_texts}")
    return array


def _open(folder: Path, n_texts: int) -> np.ndarray | None:
    """The embeddings of the finished entry at ``folder``; None (after a warning) when it is damaged."""
    try:
        return _read(folder, n_texts)
    except DamagedEntry as error:
        discard(folder, error)
        return None


def _position_limit(folder: Path) -> int | None:
    """The model's maximum number of positions, from its config (None when it does not say)."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def _compute(folder: Path, model: str, texts: list[str], pooling: str, max_length: int, device: str,
             batch_size: int, sha: str, weights: TextWeights | None = None) -> None:
    import torch

    from ..encoders.text import TextTower, load_text_weights

    tower = TextTower(model, pooling=pooling, max_length=max_length)
    if weights is not None:
        load_text_weights(tower, weights.card, weights.checkpoint, min_fraction=1.0)
    tower = tower.to(device).eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            parts.append(tower(texts[start:start + batch_size]).float().cpu().numpy())
    array = np.concatenate(parts).astype(np.float32)
    if not np.isfinite(array).all():
        raise FloatingPointError(f"text model {model!r} produced non-finite embeddings")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        np.save(tmp / "embeddings.npy", array)
        write_meta(tmp, {"kind": TEXT, "format": FORMAT_VERSION, "model": str(model), "model_sha256": sha,
                         "pooling": pooling, "max_length": max_length, "n_texts": len(texts),
                         "dim": int(array.shape[1]), "files": seal(tmp, ["embeddings.npy"])})
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same entry first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
