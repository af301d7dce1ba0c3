"""What the text-producing families share: demo settings, tokenizers, a compact vocabulary,
greedy and beam decoding, the learning-rate schedule, and the visual-token grid.

Tokenizers are loaded offline through ``encoders.text.resolve_text_model``: a
hub id that is not on this machine fails the job with what to download.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..encoders.text import TextModelError, resolve_text_model, text_model_sha256


# --------------------------------------------------------------------------- settings

def require(params: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in params:
        raise ValueError(f"{where}: head param {key!r} is required")
    return params[key]


_GRID = re.compile(r"pooled_(\d+)x(\d+)x(\d+)$")


def grid_from_visual_tokens(value: str | Sequence[int] | None, where: str) -> tuple[int, int, int] | None:
    """``last_block_pooled_7x7x7`` (or [7, 7, 7]) -> (7, 7, 7); ``last_block_patch_tokens`` -> None (unpooled)."""
    if value is None or value == "last_block_patch_tokens":
        return None
    if isinstance(value, (list, tuple)) and len(value) == 3:
        grid = tuple(int(v) for v in value)
    else:
        match = _GRID.search(str(value))
        if not match:
            raise ValueError(f"{where}: visual_tokens must be 'last_block_patch_tokens', "
                             f"'last_block_pooled_<H>x<W>x<D>' or [H, W, D], got {value!r}")
        grid = tuple(int(g) for g in match.groups())
    if min(grid) < 1:
        raise ValueError(f"{where}: visual token grid must be positive, got {grid}")
    return grid  # type: ignore[return-value]


# --------------------------------------------------------------------------- tokenizers

@dataclass
class LoadedTokenizer:
    name: str
    tokenizer: Any
    sha256: str


def load_tokenizer(name: str) -> LoadedTokenizer:
    """A Hugging Face tokenizer by path, alias or cached hub id; TextModelError when it cannot be loaded."""
    from transformers import AutoTokenizer

    folder = resolve_text_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # a folder without tokenizer files, or one transformers cannot read
        raise TextModelError(f"tokenizer {name!r} ({folder}) cannot be loaded: {type(error).__name__}: {error}") from error
    return LoadedTokenizer(str(name), tokenizer, text_model_sha256(name, weights=False))


_SPLIT_NUMBER = re.compile(r"(\d)\s*\.\s+(\d)")
_SPLIT_HYPHEN = re.compile(r"(\w)\s+-\s+(\w)")
_SPACE_IN_BRACKETS = (re.compile(r"\(\s+"), re.compile(r"\s+\)"))


def detokenize(text: str) -> str:
    """Undo WordPiece spacing the tokenizer's decode leaves around decimals, hyphens and brackets."""
    text = _SPLIT_NUMBER.sub(r"\1.\2", text)
    text = _SPLIT_HYPHEN.sub(r"\1-\2", text)
    text = _SPACE_IN_BRACKETS[0].sub("(", _SPACE_IN_BRACKETS[1].sub(")", text))
    return " ".join(text.split())


class Vocabulary:
    """The tokenizer's ids that occur in the training texts, renumbered compactly after four specials.

    A decoder trained from scratch cannot learn a token it never saw, so its output
    layer spans only these (unseen ones map to UNK); decoding maps back to the
    tokenizer's ids and uses its ``decode``.
    """

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = 4

    def __init__(self, loaded: LoadedTokenizer, texts: Sequence[str]):
        self.loaded = loaded
        special = set(loaded.tokenizer.all_special_ids)
        seen = sorted({i for t in texts for i in self.token_ids(t)} - special)
        self.to_tokenizer = np.array([-1] * self.SPECIALS + seen, dtype=np.int64)
        self.from_tokenizer = {int(t): i + self.SPECIALS for i, t in enumerate(seen)}

    def __len__(self) -> int:
        return len(self.to_tokenizer)

    def token_ids(self, text: str) -> list[int]:
        """The tokenizer's ids of ``text``, without special tokens."""
        return list(self.loaded.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def encode(self, text: str, max_len: int) -> list[int]:
        """[BOS] + up to ``max_len`` token ids + [EOS]."""
        ids = [self.from_tokenizer.get(i, self.UNK) for i in self.token_ids(text)][:max_len]
        return [self.BOS, *ids, self.EOS]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if i >= self.SPECIALS:
                out.append(int(self.to_tokenizer[i]))
        return detokenize(self.loaded.tokenizer.decode(out, skip_special_tokens=True,
                                                       clean_up_tokenization_spaces=True))


def pad_batch(sequences: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


# --------------------------------------------------------------------------- decoding

# step(prefix [N, t] token ids, rows [N] indices into the batch's encoded inputs) -> log-probs [N, V] of the next token
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def greedy_decode(step: Step, batch: int, bos: int, eos: int, max_steps: int, device: str = "cpu") -> list[list[int]]:
    """The most probable token at each step until EOS or ``max_steps``; token ids without BOS / EOS."""
    prefix = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_steps):
        nxt = step(prefix, rows).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        prefix = torch.cat([prefix, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return [_strip(seq[1:].tolist(), eos) for seq in prefix]


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


@torch.no_grad()
def beam_decode(step: Step, batch: int, bos: int, eos: int, max_steps: int, beam_size: int,
                device: str = "cpu", length_penalty: float = 0.0) -> list[list[int]]:
    """Beam search per input: keep the ``beam_size`` prefixes with the highest summed log-probability;
    a prefix that emits EOS is finished, and the finished hypothesis with the best score wins, the score
    being the summed log-probability divided by length ** ``length_penalty`` (0: no normalisation). An
    input stops when ``beam_size`` hypotheses are finished or (without normalisation) when no open beam
    can beat the best finished one; with none finished after ``max_steps`` its best open prefix is returned."""
    if beam_size <= 1:
        return greedy_decode(step, batch, bos, eos, max_steps, device)
    k = beam_size
    prefix = torch.full((batch * k, 1), bos, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal: keep one, or the first step picks k copies of one token
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    active = torch.ones(batch, dtype=torch.bool, device=device)
    for t in range(max_steps):
        logp = step(prefix, rows)  # [batch*k, V]
        V = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(batch, k * V)
        top, index = total.topk(2 * k, dim=1)  # room for k open beams after the finished ones leave
        beam, token = index // V, index % V
        new_prefix, new_scores = [], torch.full((batch, k), float("-inf"), device=device)
        for b in range(batch):
            kept = 0
            source = torch.zeros(k, dtype=torch.long, device=device)
            chosen = torch.full((k,), eos, dtype=torch.long, device=device)
            if active[b]:
                for j in range(2 * k):
                    s = float(top[b, j])
                    if s == float("-inf"):
                        break
                    tok, src = int(token[b, j]), int(beam[b, j])
                    if tok == eos:
                        if len(finished[b]) < k:
                            length = t + 1  # tokens including EOS
                            finished[b].append((s / length ** length_penalty, prefix[b * k + src, 1:].tolist()))
                        continue
                    source[kept], chosen[kept] = src, tok
                    new_scores[b, kept] = s
                    kept += 1
                    if kept == k:
                        break
                best_open = float(new_scores[b, 0]) if kept else float("-inf")
                # stop when k hypotheses are finished and no open beam can beat the best of them
                if len(finished[b]) >= k or (length_penalty == 0 and finished[b]
                                             and max(f[0] for f in finished[b]) >= best_open):
                    active[b] = False
            new_prefix.append(torch.cat([prefix[b * k + source], chosen[:, None]], dim=1))
        prefix = torch.cat(new_prefix, dim=0)
        scores = new_scores
        if not bool(active.any()):
            break
    out = []
    for b in range(batch):
        if finished[b]:
            out.append(max(finished[b], key=lambda f: f[0])[1])
        else:
            out.append(_strip(prefix[b * k, 1:].tolist(), eos))
    return out


# --------------------------------------------------------------------------- optimisation

def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps`` (or constant)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {schedule!r}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(name: str, parameters, lr: float, weight_decay: float, where: str) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"{where}: optimizer must be 'adam' or 'adamw', got {name!r}")


def batches(n: int, size: int, generator: torch.Generator | None = None) -> list[np.ndarray]:
    """Index batches over ``n`` items, shuffled with ``generator`` when given."""
    order = torch.randperm(n, generator=generator).numpy() if generator is not None else np.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]


def check_tokens(array: np.ndarray, ids: Sequence[str], what: str) -> np.ndarray:
    """Frozen tokens [n, T, D] as float32, with a clear error for a wrong shape or non-finite values."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 3 or len(array) != len(ids):
        raise ValueError(f"{what}: expected patch tokens [{len(ids)}, T, D], got shape {array.shape}")
    bad = ~np.isfinite(array).reshape(len(array), -1).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: non-finite tokens for {[ids[i] for i in np.flatnonzero(bad)[:5]]}")
    return array
