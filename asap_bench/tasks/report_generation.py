"""Report generation from frozen visual tokens (the ``rg`` family).

The M2KT-style setting of the paper: the language side is the same for every
vision encoder, and only the frozen visual tokens change. Patch tokens pooled
to the protocol's grid are projected linearly to ``d_model`` (with a learned
position embedding), a transformer encoder-decoder (``torch.nn.Transformer``)
is trained from scratch with teacher forcing on the protocol's text column,
tokenised with the protocol's tokenizer (output layer restricted to the
training texts' tokens), and reports are decoded greedily or by beam search.
The checkpoint with the best validation BLEU-4 (ties: BLEU-3, -2, -1, then the
earlier epoch) is kept; test is decoded once with it and scored with corpus
BLEU-1..4 and BERTScore F1 (see ``metrics.text``), with per-report units.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..metrics.text import (BertScore, BertScoreSettings, BleuSettings, corpus_bleu_scores, sentence_bleu_scores,
                            text_units)
from ..protocol import Protocol
from .base import TaskFamily, TaskInputs, TaskResult, demo_note, head_params
from .text_decoding import (Vocabulary, batches, beam_decode, check_tokens, grid_from_visual_tokens,
                            load_tokenizer, make_optimizer, pad_batch, require, warmup_cosine)

PARAMS = {"architecture", "text_column", "tokenizer", "visual_tokens", "encoder_layers", "decoder_layers", "d_model",
          "n_heads", "d_ff", "dropout", "max_len", "optimizer", "lr", "weight_decay", "lr_schedule", "warmup_epochs",
          "batch_size", "epochs", "select_on", "decoding", "beam_size", "bleu", "bertscore", "eval_batch_size",
          "eval_every", "length_penalty"}
ARCHITECTURES = ("r2gen_m2kt",)


@dataclass(frozen=True)
class RGParams:
    text_column: str
    tokenizer: str
    grid: tuple[int, int, int] | None
    encoder_layers: int
    decoder_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    dropout: float
    max_len: int
    optimizer: str
    lr: float
    weight_decay: float
    lr_schedule: str
    warmup_epochs: float
    batch_size: int
    epochs: int
    decoding: str
    beam_size: int
    eval_batch_size: int
    eval_every: int
    length_penalty: float
    bleu: BleuSettings
    bertscore: BertScoreSettings

    @classmethod
    def read(cls, protocol: Protocol, synthetic: bool) -> tuple["RGParams", list[str]]:
        where = protocol.id
        if protocol.head.kind != "transformer_decoder":
            raise ValueError(f"{where}: the rg family fits head kind 'transformer_decoder', not {protocol.head.kind!r}")
        p, replaced = head_params(protocol, synthetic, PARAMS)
        arch = p.get("architecture", "r2gen_m2kt")
        if arch not in ARCHITECTURES:
            raise ValueError(f"{where}: architecture must be one of {list(ARCHITECTURES)}, got {arch!r}")
        if p.get("select_on", "val") != "val":
            raise ValueError(f"{where}: select_on must be 'val' (the checkpoint is never chosen on test)")
        decoding = p.get("decoding", "beam")
        if decoding not in ("beam", "greedy"):
            raise ValueError(f"{where}: decoding must be 'beam' or 'greedy', got {decoding!r}")
        params = cls(
            text_column=str(require(p, "text_column", where)), tokenizer=str(require(p, "tokenizer", where)),
            grid=grid_from_visual_tokens(p.get("visual_tokens"), where),
            encoder_layers=int(p.get("encoder_layers", 3)), decoder_layers=int(p.get("decoder_layers", 3)),
            d_model=int(p.get("d_model", 512)), n_heads=int(p.get("n_heads", 8)), d_ff=int(p.get("d_ff", 512)),
            dropout=float(p.get("dropout", 0.1)), max_len=int(p.get("max_len", 300)),
            optimizer=str(p.get("optimizer", "adam")), lr=float(p.get("lr", 1e-4)),
            weight_decay=float(p.get("weight_decay", 0.0)), lr_schedule=str(p.get("lr_schedule", "cosine")),
            warmup_epochs=float(p.get("warmup_epochs", 0)), batch_size=int(p.get("batch_size", 16)),
            epochs=int(p.get("epochs", 1)), decoding=decoding,
            beam_size=int(p.get("beam_size", 3)) if decoding == "beam" else 1,
            eval_batch_size=int(p.get("eval_batch_size", 32)), eval_every=int(p.get("eval_every", 1)),
            length_penalty=float(p.get("length_penalty", 0.0)),
            bleu=BleuSettings.from_params(p.get("bleu"), where),
            bertscore=BertScoreSettings.from_params(require(p, "bertscore", where), where))
        if params.d_model % params.n_heads:
            raise ValueError(f"{where}: d_model ({params.d_model}) must be a multiple of n_heads ({params.n_heads})")
        for name in ("encoder_layers", "decoder_layers", "max_len", "batch_size", "epochs", "beam_size", "eval_every"):
            if getattr(params, name) < 1:
                raise ValueError(f"{where}: {name} must be at least 1, got {getattr(params, name)}")
        return params, replaced


class ReportModel(nn.Module):
    """Visual tokens -> linear to d_model (+ learned positions) -> transformer encoder; text decoder on top."""

    def __init__(self, visual_dim: int, n_visual: int, vocab_size: int, p: RGParams):
        super().__init__()
        self.visual = nn.Linear(visual_dim, p.d_model)
        self.visual_pos = nn.Parameter(torch.zeros(1, n_visual, p.d_model))
        nn.init.trunc_normal_(self.visual_pos, std=0.02)
        self.embed = nn.Embedding(vocab_size, p.d_model, padding_idx=Vocabulary.PAD)
        self.text_pos = nn.Embedding(p.max_len + 2, p.d_model)
        self.transformer = nn.Transformer(p.d_model, p.n_heads, p.encoder_layers, p.decoder_layers, p.d_ff,
                                          p.dropout, batch_first=True)
        self.out = nn.Linear(p.d_model, vocab_size)
        self.scale = math.sqrt(p.d_model)

    def encode(self, visual: torch.Tensor) -> torch.Tensor:
        return self.transformer.encoder(self.visual(visual) + self.visual_pos)

    def decode(self, memory: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        t = prefix.shape[1]
        x = self.embed(prefix) * self.scale + self.text_pos(torch.arange(t, device=prefix.device))
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=prefix.device, dtype=x.dtype)
        padding = torch.zeros(prefix.shape, dtype=x.dtype, device=prefix.device).masked_fill(
            prefix == Vocabulary.PAD, float("-inf"))
        h = self.transformer.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=padding)
        return self.out(h)

    def forward(self, visual: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(visual), prefix)


class IncrementalStep:
    """``step(prefix, rows)`` for ``beam_decode`` / ``greedy_decode``: the next-token log-probs of
    ``model.decode(memory[rows], prefix)[:, -1]``, computing only the newest position.

    Under the causal mask a decoder layer's inputs at earlier positions do not change as the prefix
    grows, so each layer's inputs are kept per prefix row (re-indexed when beam search reorders or
    drops rows) and only the last position is run through the layers: the same log-probs as decoding
    the whole prefix at every step, at O(T) rather than O(T^2) decoder work per report. A prefix whose
    first t-1 tokens were not the previous call's is decoded in full.
    """

    def __init__(self, model: ReportModel, memory: torch.Tensor):
        self.model, self.memory = model, memory
        self.prefix: torch.Tensor | None = None  # the previous call's prefixes [N, t-1]
        self.rows: list[int] = []  # and the memory row of each
        self.inputs: list[torch.Tensor] = []  # per decoder layer: its inputs [N, t-1, d] for those prefixes

    def _previous_rows(self, prefix: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
        """For each row of ``prefix`` minus its last token, the row of the previous call it extends
        (the same tokens on the same memory row: layer inputs past the first depend on the memory)."""
        if self.prefix is None or self.prefix.shape[1] != prefix.shape[1] - 1:
            return None
        head = prefix[:, :-1]
        if rows == self.rows and torch.equal(head, self.prefix):
            return torch.arange(len(head), device=prefix.device)
        seen = {(r, tuple(row)): i for i, (r, row) in enumerate(zip(self.rows, self.prefix.tolist()))}
        found = [seen.get((r, tuple(row))) for r, row in zip(rows, head.tolist())]
        if any(i is None for i in found):
            return None
        return torch.as_tensor(found, dtype=torch.long, device=prefix.device)

    @torch.no_grad()
    def __call__(self, prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        model, t, listed = self.model, prefix.shape[1], rows.tolist()
        previous = self._previous_rows(prefix, listed)
        first = 0 if previous is None else t - 1  # positions computed in this call: first .. t-1
        x = model.embed(prefix[:, first:]) * model.scale + model.text_pos(torch.arange(first, t, device=prefix.device))
        padding = torch.zeros(prefix.shape, dtype=x.dtype, device=prefix.device).masked_fill(
            prefix == Vocabulary.PAD, float("-inf"))
        causal = (nn.Transformer.generate_square_subsequent_mask(t, device=prefix.device, dtype=x.dtype)
                  if previous is None else None)
        memory = self.memory[rows]
        inputs = []
        for i, layer in enumerate(model.transformer.decoder.layers):
            keys = x if previous is None else torch.cat([self.inputs[i][previous], x], dim=1)
            inputs.append(keys)
            x = _decoder_layer(layer, x, keys, memory, causal, padding)
        self.prefix, self.rows, self.inputs = prefix, listed, inputs
        norm = model.transformer.decoder.norm
        h = x[:, -1] if norm is None else norm(x[:, -1])
        return model.out(h).log_softmax(-1)


def _decoder_layer(layer: nn.TransformerDecoderLayer, x: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                   causal: torch.Tensor | None, padding: torch.Tensor) -> torch.Tensor:
    """``layer`` (eval mode) for the queries ``x`` [N, q, d] that are the last q of its inputs ``keys``."""
    def attend(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return layer.dropout1(layer.self_attn(q, kv, kv, attn_mask=causal, key_padding_mask=padding,
                                              need_weights=False)[0])

    def cross(q: torch.Tensor) -> torch.Tensor:
        return layer.dropout2(layer.multihead_attn(q, memory, memory, need_weights=False)[0])

    def ff(q: torch.Tensor) -> torch.Tensor:
        return layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(q)))))

    if layer.norm_first:
        x = x + attend(layer.norm1(x), layer.norm1(keys))
        x = x + cross(layer.norm2(x))
        return x + ff(layer.norm3(x))
    x = layer.norm1(x + attend(x, keys))
    x = layer.norm2(x + cross(x))
    return layer.norm3(x + ff(x))


@dataclass
class TextData:
    ids: list[str]
    texts: list[str]


class ReportGeneration(TaskFamily):
    name = "rg"
    needs = "tokens"

    def token_grid(self, protocol: Protocol) -> tuple[int, int, int] | None:
        return grid_from_visual_tokens(protocol.head.params.get("visual_tokens"), protocol.id)

    # ------------------------------------------------------------------ data
    @staticmethod
    def _texts(inputs: TaskInputs, column: str, ids: list[str], part: str, notes: dict[str, str]) -> TextData:
        frame = inputs.manifest.frame
        if column not in frame.columns:
            raise ValueError(f"{inputs.manifest.path}: text column {column!r} (head param text_column) is missing; "
                             f"columns are {list(frame.columns)}")
        values = frame.loc[ids, column]
        keep = [i for i, v in zip(ids, values) if isinstance(v, str) and v.strip()]
        if len(keep) < len(ids):
            notes[f"empty_{part}"] = f"{len(ids) - len(keep)} {part} case(s) without {column} text were left out"
        if not keep:
            raise ValueError(f"{inputs.manifest.path}: no {part} case has {column} text")
        return TextData(keep, [str(frame.loc[i, column]) for i in keep])

    # ------------------------------------------------------------------ run
    def run(self, inputs: TaskInputs) -> TaskResult:
        started = time.perf_counter()
        synthetic = bool(inputs.manifest.synthetic)
        p, replaced = RGParams.read(inputs.protocol, synthetic)
        notes: dict[str, str] = {}
        if replaced:
            notes["demo"] = demo_note(replaced)
        loaded = load_tokenizer(p.tokenizer)  # fails the job (TextModelError) when it is not on this machine
        scorer = BertScore(p.bertscore, inputs.device)
        train = self._texts(inputs, p.text_column, list(inputs.train), "train", notes)
        val = self._texts(inputs, p.text_column, list(inputs.split.val), "val", notes)
        test = self._texts(inputs, p.text_column, list(inputs.split.test), "test", notes)
        vocab = Vocabulary(loaded, train.texts)
        device = inputs.device
        probe = check_tokens(inputs.features.tokens(train.ids[:1]), train.ids[:1], f"{inputs.protocol.id} tokens")
        generator = torch.Generator().manual_seed(int(inputs.seed))
        torch.manual_seed(int(inputs.seed))
        model = ReportModel(probe.shape[2], probe.shape[1], len(vocab), p).to(device)
        targets = [vocab.encode(t, p.max_len) for t in train.texts]
        truncated = sum(len(vocab.token_ids(t)) > p.max_len for t in train.texts)
        optimizer = make_optimizer(p.optimizer, model.parameters(), p.lr, p.weight_decay, inputs.protocol.id)
        steps_per_epoch = math.ceil(len(train.ids) / p.batch_size)
        scheduler = warmup_cosine(optimizer, int(round(p.warmup_epochs * steps_per_epoch)),
                                  p.epochs * steps_per_epoch, p.lr_schedule)
        loss_fn = nn.CrossEntropyLoss(ignore_index=Vocabulary.PAD)

        best_key, best_state, best_epoch, history = None, None, 0, []
        for epoch in range(1, p.epochs + 1):
            model.train()
            total, count = 0.0, 0
            for rows in batches(len(train.ids), p.batch_size, generator):
                ids = [train.ids[i] for i in rows]
                visual = torch.from_numpy(check_tokens(inputs.features.tokens(ids), ids, "train tokens")).to(device)
                seq = pad_batch([targets[i] for i in rows], Vocabulary.PAD).to(device)
                logits = model(visual, seq[:, :-1])
                loss = loss_fn(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{inputs.protocol.id}: training loss became {loss.item()} at epoch {epoch}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach()) * len(rows)
                count += len(rows)
            if epoch % p.eval_every and epoch != p.epochs:
                history.append({"epoch": epoch, "train_loss": round(total / count, 5)})
                continue
            scores = corpus_bleu_scores(val.texts, self.generate(model, inputs, val.ids, vocab, p), p.bleu)
            key = tuple(scores[f"bleu{n}"] for n in range(p.bleu.max_order, 0, -1))
            history.append({"epoch": epoch, "train_loss": round(total / count, 5),
                            **{k: round(v, 5) for k, v in scores.items()}})
            inputs.log.debug("%s epoch %d: loss %.4f val %s", inputs.protocol.id, epoch, total / count, scores)
            if best_key is None or key > best_key:
                best_key, best_epoch = key, epoch
                best_state = copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        hypotheses = self.generate(model, inputs, test.ids, vocab, p)
        metrics, units = score_reports(test.ids, test.texts, hypotheses, p.bleu, scorer)
        constant = corpus_bleu_scores(test.texts, [most_common_report(train.texts)] * len(test.ids), p.bleu)
        notes.update({
            "bleu": p.bleu.describe(), "bertscore": p.bertscore.describe(),
            "decoding": f"{p.decoding}" + (f" (beam {p.beam_size}, length penalty {p.length_penalty})"
                                           if p.decoding == "beam" else "")
                        + f", at most {p.max_len} tokens",
            "vocabulary": f"{len(vocab) - Vocabulary.SPECIALS} {p.tokenizer} tokens seen in training texts "
                          f"(+4 specials); {truncated} training text(s) truncated to {p.max_len} tokens",
            "selection": f"epoch {best_epoch} of {p.epochs} by validation BLEU-{p.bleu.max_order} "
                         f"(validation decoded every {p.eval_every} epoch(s) and after the last; "
                         "ties: lower orders, then the earlier epoch)",
            "baseline": "the most common training report, given for every test case, scores test BLEU-4 "
                        f"{constant['bleu4']:.4f} (BLEU-1 {constant['bleu1']:.4f})",
        })
        selected = {"epoch": best_epoch, "val_bleu4": history[best_epoch - 1]["bleu4"],
                    "constant_baseline_bleu4": constant["bleu4"],
                    "token_grid": list(p.grid) if p.grid else None, "visual_tokens": int(probe.shape[1]),
                    "history": history, "seconds": round(time.perf_counter() - started, 2)}
        provenance = text_provenance([(f"tokenizer {loaded.name}", loaded.sha256),
                                      (f"bertscore {p.bertscore.model} layer {p.bertscore.num_layers}", scorer.sha256)])
        return TaskResult(metrics, notes=notes, selected=selected,
                          sizes={"train": len(train.ids), "val": len(val.ids), "test": len(test.ids)},
                          units=units, provenance=provenance)

    @staticmethod
    @torch.no_grad()
    def generate(model: ReportModel, inputs: TaskInputs, ids: list[str], vocab: Vocabulary, p: RGParams) -> list[str]:
        """Decode one report per case, ``eval_batch_size`` cases at a time."""
        model.eval()
        out: list[str] = []
        for start in range(0, len(ids), p.eval_batch_size):
            chunk = ids[start:start + p.eval_batch_size]
            visual = torch.from_numpy(check_tokens(inputs.features.tokens(chunk), chunk, "tokens")).to(inputs.device)
            step = IncrementalStep(model, model.encode(visual))
            decoded = beam_decode(step, len(chunk), Vocabulary.BOS, Vocabulary.EOS, p.max_len + 1, p.beam_size,
                                  inputs.device, p.length_penalty)
            out += [vocab.decode(seq) for seq in decoded]
        return out


def score_reports(ids: list[str], references: list[str], hypotheses: list[str], bleu: BleuSettings,
                  scorer: BertScore) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Corpus BLEU-1..N and mean BERTScore F1 of generated reports, with per-report units."""
    metrics: dict[str, float | None] = dict(corpus_bleu_scores(references, hypotheses, bleu))
    f1 = scorer.f1(references, hypotheses)
    metrics["bertscore_f1"] = float(np.mean(f1))
    units = text_units(ids, references, hypotheses, bleu,
                       {"bertscore_f1": f1, "sentence_bleu4": sentence_bleu_scores(references, hypotheses, bleu)})
    return metrics, units


def text_provenance(models: list[tuple[str, str]]) -> dict[str, str]:
    """Provenance fields for the text models a result used: their names, and one hash over theirs."""
    digest = hashlib.sha256()
    for name, sha in models:
        digest.update(name.encode())
        digest.update(sha.encode())
    return {"text_model": "; ".join(name for name, _ in models), "text_model_sha256": digest.hexdigest()}


def most_common_report(texts: list[str]) -> str:
    """The constant baseline: the most frequent training report (the first of equally frequent ones)."""
    counts = Counter(texts)
    return max(texts, key=lambda t: (counts[t], -texts.index(t)))
