"""Visual question answering through a Q-former bridge to a causal language model (the ``vqa`` family).

Frozen patch tokens (unpooled, or pooled to the protocol's grid) feed a small
Q-former: learned query tokens that self-attend and cross-attend to the
projected visual tokens (``torch.nn.TransformerDecoder``-style layers; a layer
without cross-attention every ``cross_attention_every``-th when it is above 1).
Its outputs are projected linearly to the language model's embedding width and
put before the tokenised question. The language model is frozen (optionally
with LoRA adapters through ``peft``), or trained with the bridge when
``train_language_model`` is set; the bridge is trained by supervised
fine-tuning on the answer tokens of ``train_samples`` training questions drawn
with the split seed, stratified over the question types, the epoch with the
lowest validation loss is kept, and every test question is answered greedily.

Metrics per question type (BLEU-1..4, ROUGE-L, BERTScore F1, normalised exact
match; see ``metrics.text``), and their macro average over the types, which is
what the record's metrics hold. Per-question units carry everything needed to
recompute both.

The paper's language model is a hub model (frozen, bf16 on GPU). A model given
as a mapping (``{architecture: qwen3, init: random, ...}``) is built from a
transformers config with seeded random weights: the demo's offline stand-in.
Frozen, such a model knows no language, so no answer could depend on the image;
the demo trains it with the bridge (``demo_train_language_model``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..encoders.text import TextModelError, resolve_text_model, text_model_sha256
from ..metrics.text import (BertScore, BertScoreSettings, BleuSettings, exact_match, per_group_metrics,
                            recompute_text, rouge_l, text_units)
from ..protocol import Protocol
from ..schema import content_hash
from .base import TaskFamily, TaskInputs, TaskResult, demo_note, head_params
from .report_generation import text_provenance
from .text_decoding import (batches, check_tokens, grid_from_visual_tokens, load_tokenizer,
                            make_optimizer, require, warmup_cosine)

PARAMS = {"language_model", "chat_template", "visual_tokens", "n_query_tokens", "qformer_layers", "qformer_hidden",
          "qformer_heads", "cross_attention_every", "projection", "lora", "train_samples", "qa_types", "optimizer",
          "lr", "weight_decay", "lr_schedule", "warmup_ratio", "batch_size", "epochs", "select_on", "decoding",
          "max_new_tokens", "bleu", "bertscore", "dropout", "eval_batch_size", "prompt", "train_language_model"}
QA_COLUMNS = ("qa_type", "question", "answer")
DEFAULT_PROMPT = "Question: {question} Answer:"
LM_SEED = 0  # a config-built language model is the same for every encoder and seed


@dataclass(frozen=True)
class VQAParams:
    language_model: str | dict
    chat_template: bool
    grid: tuple[int, int, int] | None
    n_query: int
    qformer_layers: int
    qformer_hidden: int
    qformer_heads: int
    cross_every: int
    dropout: float
    lora: dict
    train_lm: bool  # the language model is trained with the bridge (the demo's random stand-in knows no language)
    train_samples: int
    qa_types: tuple[str, ...]
    optimizer: str
    lr: float
    weight_decay: float
    lr_schedule: str
    warmup_ratio: float
    batch_size: int
    eval_batch_size: int
    epochs: int
    max_new_tokens: int
    prompt: str
    bleu: BleuSettings
    bertscore: BertScoreSettings

    @classmethod
    def read(cls, protocol: Protocol, synthetic: bool) -> tuple["VQAParams", list[str]]:
        where = protocol.id
        if protocol.head.kind != "qformer_bridge":
            raise ValueError(f"{where}: the vqa family fits head kind 'qformer_bridge', not {protocol.head.kind!r}")
        p, replaced = head_params(protocol, synthetic, PARAMS)
        if p.get("select_on", "val_loss") != "val_loss":
            raise ValueError(f"{where}: select_on must be 'val_loss', got {p.get('select_on')!r}")
        if p.get("decoding", "greedy") != "greedy":
            raise ValueError(f"{where}: decoding must be 'greedy', got {p.get('decoding')!r}")
        if p.get("projection", "linear") != "linear":
            raise ValueError(f"{where}: projection must be 'linear', got {p.get('projection')!r}")
        lm = require(p, "language_model", where)
        if not isinstance(lm, (str, dict)):
            raise ValueError(f"{where}: language_model must be a hub id / path or a config mapping, got {lm!r}")
        lora = dict(p.get("lora") or {"enabled": False})
        types = tuple(str(t) for t in require(p, "qa_types", where))
        params = cls(
            language_model=lm, chat_template=bool(p.get("chat_template", True)),
            grid=grid_from_visual_tokens(p.get("visual_tokens"), where),
            n_query=int(p.get("n_query_tokens", 32)), qformer_layers=int(p.get("qformer_layers", 6)),
            qformer_hidden=int(p.get("qformer_hidden", 768)), qformer_heads=int(p.get("qformer_heads", 12)),
            cross_every=int(p.get("cross_attention_every", 1)), dropout=float(p.get("dropout", 0.1)), lora=lora,
            train_lm=bool(p.get("train_language_model", False)),
            train_samples=int(require(p, "train_samples", where)), qa_types=types,
            optimizer=str(p.get("optimizer", "adamw")), lr=float(p.get("lr", 1e-4)),
            weight_decay=float(p.get("weight_decay", 0.0)), lr_schedule=str(p.get("lr_schedule", "cosine")),
            warmup_ratio=float(p.get("warmup_ratio", 0.0)), batch_size=int(p.get("batch_size", 8)),
            eval_batch_size=int(p.get("eval_batch_size", 32)), epochs=int(p.get("epochs", 1)),
            max_new_tokens=int(p.get("max_new_tokens", 128)), prompt=str(p.get("prompt", DEFAULT_PROMPT)),
            bleu=BleuSettings.from_params(p.get("bleu"), where),
            bertscore=BertScoreSettings.from_params(require(p, "bertscore", where), where))
        if params.qformer_hidden % params.qformer_heads:
            raise ValueError(f"{where}: qformer_hidden ({params.qformer_hidden}) must be a multiple of "
                             f"qformer_heads ({params.qformer_heads})")
        for name in ("n_query", "qformer_layers", "cross_every", "train_samples", "batch_size", "epochs",
                     "max_new_tokens"):
            if getattr(params, name) < 1:
                raise ValueError(f"{where}: {name} must be at least 1, got {getattr(params, name)}")
        if not types or len(set(types)) != len(types):
            raise ValueError(f"{where}: qa_types must list distinct question types, got {list(types)}")
        if "{question}" not in params.prompt:
            raise ValueError(f"{where}: prompt must contain '{{question}}', got {params.prompt!r}")
        return params, replaced


# --------------------------------------------------------------------------- the bridge

class QFormer(nn.Module):
    """Learned queries -> [self-attention, cross-attention to visual tokens, MLP] x layers -> linear to the LM width."""

    def __init__(self, visual_dim: int, n_visual: int, out_dim: int, p: VQAParams):
        super().__init__()
        h = p.qformer_hidden
        self.visual = nn.Linear(visual_dim, h)
        self.visual_pos = nn.Parameter(torch.zeros(1, n_visual, h))
        self.queries = nn.Parameter(torch.zeros(1, p.n_query, h))
        nn.init.trunc_normal_(self.visual_pos, std=0.02)
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.layers = nn.ModuleList()
        for i in range(p.qformer_layers):
            if i % p.cross_every == 0:
                layer = nn.TransformerDecoderLayer(h, p.qformer_heads, 4 * h, p.dropout, batch_first=True, norm_first=True)
            else:
                layer = nn.TransformerEncoderLayer(h, p.qformer_heads, 4 * h, p.dropout, batch_first=True, norm_first=True)
            self.layers.append(layer)
        self.norm = nn.LayerNorm(h)
        self.projection = nn.Linear(h, out_dim)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        memory = self.visual(visual) + self.visual_pos
        q = self.queries.expand(len(visual), -1, -1)
        for layer in self.layers:
            q = layer(q, memory) if isinstance(layer, nn.TransformerDecoderLayer) else layer(q)
        return self.projection(self.norm(q))


# --------------------------------------------------------------------------- the language model

@dataclass
class LanguageModel:
    name: str
    model: Any
    tokenizer: Any
    sha256: str
    eos: int
    pad: int
    chat: bool  # the prompt is wrapped in the tokenizer's chat template


def _config_lm(spec: Mapping[str, Any], where: str):
    """A causal LM built from a transformers config with seeded random weights (the demo's offline model)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    known = {"architecture", "init", "layers", "hidden", "heads", "tokenizer", "intermediate"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{where}: unknown language_model key(s) {unknown}; expected {sorted(known)}")
    if spec.get("architecture") != "qwen3" or spec.get("init", "random") != "random":
        raise ValueError(f"{where}: a config-built language_model must be {{architecture: qwen3, init: random}}, "
                         f"got {dict(spec)}")
    loaded = load_tokenizer(str(require(spec, "tokenizer", where)))
    tok = loaded.tokenizer
    hidden, heads = int(require(spec, "hidden", where)), int(require(spec, "heads", where))
    if hidden % heads:
        raise ValueError(f"{where}: language_model hidden ({hidden}) must be a multiple of heads ({heads})")
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    config = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=int(require(spec, "layers", where)),
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
                         intermediate_size=int(spec.get("intermediate", 3 * hidden)), max_position_embeddings=2048,
                         eos_token_id=eos, pad_token_id=pad, bos_token_id=tok.cls_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(LM_SEED)
        model = Qwen3ForCausalLM(config)
    digest = hashlib.sha256(content_hash({k: str(v) for k, v in sorted(spec.items())}).encode())
    digest.update(loaded.sha256.encode())
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    name = f"qwen3 random (seed {LM_SEED}, {config.num_hidden_layers} layers, hidden {hidden}) + tokenizer {loaded.name}"
    return name, model, tok, digest.hexdigest(), eos, pad


def load_language_model(spec: str | Mapping[str, Any], chat_template: bool, device: str, where: str) -> LanguageModel:
    """The frozen causal LM and its tokenizer; TextModelError when a named model is not on this machine."""
    if isinstance(spec, Mapping):
        name, model, tok, sha, eos, pad = _config_lm(spec, where)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = resolve_text_model(spec)
        try:
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
        except Exception as error:
            raise TextModelError(f"language model {spec!r} ({folder}) cannot be loaded: "
                                 f"{type(error).__name__}: {error}") from error
        name, sha = str(spec), text_model_sha256(spec)
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if eos is None:
        raise TextModelError(f"{where}: the language model's tokenizer has no end-of-sequence token")
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    chat = bool(chat_template and getattr(tok, "chat_template", None))
    return LanguageModel(name, model, tok, sha, int(eos), int(pad), chat)


def add_lora(lm: LanguageModel, lora: Mapping[str, Any], where: str) -> None:
    """Wrap the LM with trainable LoRA adapters (peft), when the protocol enables them."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RuntimeError(f"{where}: lora.enabled is true but peft is not installed (pip install peft), "
                           "or set lora.enabled: false") from None
    config = LoraConfig(r=int(lora.get("r", 16)), lora_alpha=int(lora.get("alpha", 32)),
                        lora_dropout=float(lora.get("dropout", 0.05)),
                        target_modules=list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
                        task_type="CAUSAL_LM")
    lm.model = get_peft_model(lm.model, config)


# --------------------------------------------------------------------------- questions

@dataclass
class Questions:
    ids: list[str]
    types: list[str]
    questions: list[str]
    answers: list[str]

    def take(self, rows) -> "Questions":
        return Questions(*[[values[i] for i in rows] for values in (self.ids, self.types, self.questions, self.answers)])


def read_questions(inputs: TaskInputs, ids: list[str], types: tuple[str, ...]) -> tuple[Questions, int]:
    """The questions of ``ids`` whose type is one of ``types`` (and how many others were left out)."""
    frame = inputs.manifest.frame
    missing = [c for c in QA_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{inputs.manifest.path}: VQA needs column(s) {missing}; columns are {list(frame.columns)}")
    rows = frame.loc[ids, list(QA_COLUMNS)]
    keep = rows["qa_type"].isin(types) & rows["question"].notna() & rows["answer"].notna()
    rows = rows[keep]
    return Questions(list(rows.index), rows["qa_type"].astype(str).tolist(), rows["question"].astype(str).tolist(),
                     rows["answer"].astype(str).tolist()), int((~keep).sum())


def stratified_sample(types: list[str], n: int, order: tuple[str, ...], rng: np.random.Generator) -> list[int]:
    """``n`` row indices spread as evenly as the supply allows over ``order``'s types (a type with fewer
    questions gives all of them; the rest is shared by the others), drawn without replacement."""
    by_type = {t: [i for i, x in enumerate(types) if x == t] for t in order}
    quota = {t: 0 for t in order}
    left = min(n, len(types))
    open_types = [t for t in order if by_type[t]]
    while left > 0 and open_types:
        share, extra = divmod(left, len(open_types))
        for k, t in enumerate(list(open_types)):
            give = min(share + (k < extra), len(by_type[t]) - quota[t])
            quota[t] += give
            left -= give
        open_types = [t for t in open_types if quota[t] < len(by_type[t])]
    chosen = []
    for t in order:
        if quota[t]:
            chosen += rng.choice(by_type[t], size=quota[t], replace=False).tolist()
    return sorted(chosen)


# --------------------------------------------------------------------------- the family

class VisualQuestionAnswering(TaskFamily):
    name = "vqa"
    needs = "tokens"

    def token_grid(self, protocol: Protocol) -> tuple[int, int, int] | None:
        return grid_from_visual_tokens(protocol.head.params.get("visual_tokens"), protocol.id)

    def run(self, inputs: TaskInputs) -> TaskResult:
        started = time.perf_counter()
        protocol, device = inputs.protocol, inputs.device
        p, replaced = VQAParams.read(protocol, bool(inputs.manifest.synthetic))
        notes: dict[str, str] = {}
        if replaced:
            notes["demo"] = demo_note(replaced)
        lm = load_language_model(p.language_model, p.chat_template, device, protocol.id)
        if p.lora.get("enabled", False):
            add_lora(lm, p.lora, protocol.id)
        if p.train_lm:
            for parameter in lm.model.parameters():
                parameter.requires_grad_(True)
        scorer = BertScore(p.bertscore, device)

        pool, other = read_questions(inputs, list(inputs.train), p.qa_types)
        rng = np.random.default_rng(int(content_hash([protocol.id, protocol.split.seed, "vqa-train"])[:16], 16))
        train = pool.take(stratified_sample(pool.types, p.train_samples, p.qa_types, rng))
        val, _ = read_questions(inputs, list(inputs.split.val), p.qa_types)
        test, other_test = read_questions(inputs, list(inputs.split.test), p.qa_types)
        for part, q in (("train", train), ("val", val), ("test", test)):
            if not q.ids:
                raise ValueError(f"{inputs.manifest.path}: no {part} question of types {list(p.qa_types)}")
        if other or other_test:
            notes["other_types"] = f"{other} train and {other_test} test question(s) of other types left out"

        probe = check_tokens(inputs.features.tokens(train.ids[:1]), train.ids[:1], f"{protocol.id} tokens")
        torch.manual_seed(int(inputs.seed))
        generator = torch.Generator().manual_seed(int(inputs.seed))
        width = lm.model.get_input_embeddings().embedding_dim
        bridge = QFormer(probe.shape[2], probe.shape[1], width, p).to(device)
        trainable = list(bridge.parameters()) + [q for q in lm.model.parameters() if q.requires_grad]
        optimizer = make_optimizer(p.optimizer, trainable, p.lr, p.weight_decay, protocol.id)
        steps = p.epochs * math.ceil(len(train.ids) / p.batch_size)
        scheduler = warmup_cosine(optimizer, int(round(p.warmup_ratio * steps)), steps, p.lr_schedule)
        train_enc = [self._encode(lm, p, q, a) for q, a in zip(train.questions, train.answers)]
        val_enc = [self._encode(lm, p, q, a) for q, a in zip(val.questions, val.answers)]

        best, best_state, best_epoch, history = math.inf, None, 0, []
        for epoch in range(1, p.epochs + 1):
            bridge.train()
            total, count = 0.0, 0
            for rows in batches(len(train.ids), p.batch_size, generator):
                loss = self._loss(bridge, lm, inputs, [train.ids[i] for i in rows], [train_enc[i] for i in rows])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{protocol.id}: training loss became {loss.item()} at epoch {epoch}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total, count = total + float(loss.detach()) * len(rows), count + len(rows)
            val_loss = self._evaluate(bridge, lm, inputs, val.ids, val_enc, p.eval_batch_size)
            history.append({"epoch": epoch, "train_loss": round(total / count, 5), "val_loss": round(val_loss, 5)})
            if val_loss < best:
                best, best_epoch = val_loss, epoch
                best_state = (copy.deepcopy(bridge.state_dict()),
                              {k: v.detach().clone() for k, v in lm.model.named_parameters() if v.requires_grad})
        bridge.load_state_dict(best_state[0])
        if best_state[1]:
            lm.model.load_state_dict(best_state[1], strict=False)

        answers = self.generate(bridge, lm, inputs, test, p)
        metrics, units, per_type = score_answers(test, answers, p, scorer, list(protocol.metrics))
        notes.update({
            "metrics": f"per question type {list(p.qa_types)}, macro-averaged over the types present; "
                       f"{p.bleu.describe()}; ROUGE-L F1 (rouge-score); {p.bertscore.describe()}; accuracy = "
                       "normalised exact match",
            "per_type": "; ".join(f"{t}: " + ", ".join(f"{m} {v:.4f}" for m, v in vals.items() if v is not None)
                                  for t, vals in per_type.items()),
            "language_model": f"{lm.name}, " + ("trained with the bridge" if p.train_lm else "frozen")
                              + (" with LoRA adapters" if p.lora.get("enabled") else "")
                              + ("; chat template" if lm.chat else f"; prompt {p.prompt!r}"
                                 + (" (the tokenizer has no chat template)" if p.chat_template else "")),
            "selection": f"epoch {best_epoch} of {p.epochs} by validation loss on {len(val.ids)} question(s)",
            "training": f"{len(train.ids)} training question(s) drawn with the split seed, stratified over the types: "
                        + ", ".join(f"{t} {train.types.count(t)}" for t in p.qa_types),
        })
        selected = {"epoch": best_epoch, "val_loss": best, "history": history,
                    "token_grid": list(p.grid) if p.grid else None, "visual_tokens": int(probe.shape[1]),
                    "seconds": round(time.perf_counter() - started, 2)}
        units["per_type"] = per_type
        provenance = text_provenance([(f"language model {lm.name}", lm.sha256),
                                      (f"bertscore {p.bertscore.model} layer {p.bertscore.num_layers}", scorer.sha256)])
        return TaskResult(metrics, notes=notes, selected=selected,
                          sizes={"train": len(train.ids), "val": len(val.ids), "test": len(test.ids),
                                 "train_pool": len(pool.ids)},
                          units=units, provenance=provenance)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _prompt_ids(lm: LanguageModel, p: VQAParams, question: str) -> list[int]:
        if lm.chat:
            text = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                    add_generation_prompt=True)
        else:
            text = p.prompt.format(question=question)
        return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode(self, lm: LanguageModel, p: VQAParams, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids + EOS)."""
        prefix = "" if lm.chat else " "
        answer_ids = list(lm.tokenizer(prefix + answer, add_special_tokens=False)["input_ids"])
        return self._prompt_ids(lm, p, question), answer_ids + [lm.eos]

    @staticmethod
    def _embed(bridge: QFormer, lm: LanguageModel, inputs: TaskInputs, ids: list[str], prompts: list[list[int]],
               answers: list[list[int]] | None, left_pad: bool):
        """inputs_embeds, attention mask and labels of [visual queries | prompt | answer] sequences."""
        device = inputs.device
        visual = torch.from_numpy(check_tokens(inputs.features.tokens(ids), ids, "tokens")).to(device)
        queries = bridge(visual)
        embed = lm.model.get_input_embeddings()
        queries = queries.to(embed.weight.dtype)
        n_q = queries.shape[1]
        texts = [pr + (answers[i] if answers is not None else []) for i, pr in enumerate(prompts)]
        width = max(len(t) for t in texts)
        tokens = torch.full((len(texts), width), lm.pad, dtype=torch.long)
        labels = torch.full((len(texts), n_q + width), -100, dtype=torch.long)
        mask = torch.zeros((len(texts), n_q + width), dtype=torch.long)
        for i, t in enumerate(texts):
            offset = width - len(t) if left_pad else 0
            tokens[i, offset:offset + len(t)] = torch.as_tensor(t)
            if left_pad:  # [pad | queries | prompt]
                mask[i, offset:] = 1
            else:  # [queries | prompt answer | pad]
                mask[i, :n_q + len(t)] = 1
            if answers is not None:
                start = n_q + offset + len(prompts[i])
                labels[i, start:start + len(answers[i])] = torch.as_tensor(answers[i])
        text_embeds = embed(tokens.to(device))
        if left_pad:  # [pad ... pad | queries | prompt]: queries sit right before each prompt
            rows = []
            for i, t in enumerate(texts):
                offset = width - len(t)
                rows.append(torch.cat([text_embeds[i, :offset], queries[i], text_embeds[i, offset:]], dim=0))
            embeds = torch.stack(rows)
        else:
            embeds = torch.cat([queries, text_embeds], dim=1)
        return embeds, mask.to(device), labels.to(device)

    def _loss(self, bridge: QFormer, lm: LanguageModel, inputs: TaskInputs, ids: list[str],
              encoded: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        embeds, mask, labels = self._embed(bridge, lm, inputs, ids, [e[0] for e in encoded], [e[1] for e in encoded],
                                           left_pad=False)
        return answer_loss(lm.model, embeds, mask, labels)

    @torch.no_grad()
    def _evaluate(self, bridge: QFormer, lm: LanguageModel, inputs: TaskInputs, ids: list[str],
                  encoded: list[tuple[list[int], list[int]]], batch_size: int) -> float:
        """Mean answer-token loss over the questions (each batch weighted by its answer tokens)."""
        bridge.eval()
        total, tokens = 0.0, 0
        for start in range(0, len(ids), batch_size):
            chunk = encoded[start:start + batch_size]
            n = sum(len(e[1]) for e in chunk)
            total += float(self._loss(bridge, lm, inputs, ids[start:start + batch_size], chunk)) * n
            tokens += n
        return total / max(tokens, 1)

    @torch.no_grad()
    def generate(self, bridge: QFormer, lm: LanguageModel, inputs: TaskInputs, questions: Questions,
                 p: VQAParams) -> list[str]:
        """Greedy answers, ``eval_batch_size`` questions at a time (left-padded)."""
        bridge.eval()
        out: list[str] = []
        for start in range(0, len(questions.ids), p.eval_batch_size):
            ids = questions.ids[start:start + p.eval_batch_size]
            prompts = [self._prompt_ids(lm, p, q) for q in questions.questions[start:start + p.eval_batch_size]]
            embeds, mask, _ = self._embed(bridge, lm, inputs, ids, prompts, None, left_pad=True)
            generated = lm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=p.max_new_tokens,
                                          do_sample=False, num_beams=1, eos_token_id=lm.eos, pad_token_id=lm.pad)
            for row in generated.tolist():
                row = row[:row.index(lm.eos)] if lm.eos in row else row
                out.append(lm.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip())
        return out


def answer_loss(model, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM's loss on the answer tokens: mean next-token cross-entropy over ``labels != -100``,
    what ``model(..., labels=labels).loss`` gives, but with the vocabulary projection applied only to the
    hidden states that predict an answer token. The query, prompt and padding positions need no logits,
    and for a large vocabulary that projection and its gradient dominate a training step (here about
    seven positions in fifty carry a label)."""
    hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return nn.functional.cross_entropy(logits.float(), target[keep])


def score_answers(questions: Questions, answers: list[str], p: VQAParams, scorer: BertScore,
                  metrics: list[str]) -> tuple[dict[str, float | None], dict[str, Any], dict[str, dict]]:
    """Macro metrics over question types, per-question units, and each type's metrics."""
    refs = questions.answers
    per_case = {"accuracy": exact_match(refs, answers),
                "rouge_l": rouge_l(refs, answers, p.bleu.tokenizer, p.bleu.lowercase),
                "bertscore_f1": scorer.f1(refs, answers)}
    present = [t for t in p.qa_types if t in set(questions.types)]
    units = text_units(questions.ids, refs, answers, p.bleu, per_case, groups=questions.types, group_names=present)
    names = [m for m in metrics]
    return recompute_text(units, names), units, per_group_metrics(units, names)
