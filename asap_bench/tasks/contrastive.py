"""Vocabulary classification (``voc``) and volume-report retrieval (``ret``): the CT-CLIP protocol.

Both families keep the vision encoder and a text model frozen and train only two
linear maps without bias (frozen global feature -> shared space, frozen report
embedding -> shared space) and a learnable log logit scale, with a symmetric
InfoNCE loss on the regime's training pairs. The epoch is chosen on the
validation loss (all validation pairs scored as one batch, so the choice does not
depend on the batch size); test is scored once with the chosen projections.

Pairs whose report texts are identical (reconstructions of one scan share a report,
and short normal reports repeat) are not treated as negatives of each other: the
InfoNCE target of a row is spread evenly over every pair in the batch with the same
report text.

``voc`` scores each label of the protocol's label set by the softmax over the
similarities of a volume to "{X} is present." and "{X} is not present."; AUC per
label and macro, balanced accuracy at the protocol's fixed threshold. Its units are
the classification units of the ``cls`` family, so the same statistics apply.

``ret`` ranks the deduplicated test reports for every test volume (V2R) and the
test volumes for every unique test report (R2V) by cosine similarity; a hit is the
query's own report text (R2V: any volume that carries it). Ties count against the
query (metrics/retrieval.py). Units hold one rank, the number of relevant candidates
and one hit per query and metric, and the chance level of each metric for this pool.
Recall@K is None (with the reason in the notes) where K reaches every query's worst
possible rank, so that it is 1 whatever the scores (R@50 over the demo's few dozen
test reports); the notes state the chance level of every metric.

Text embeddings of reports and prompts are computed once per text model and text
set and cached under the feature cache root (data/text_cache.py). On the synthetic
demo cohort ``demo_<key>`` head params replace ``<key>`` (an offline text model; a
smaller batch and a larger learning rate for its ~200 training pairs); the notes
say which.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..data.cache import cache_root
from ..data.manifest import Manifest, file_sha256, label_matrix
from ..data.text_cache import TextModelInfo, TextWeights, embed_texts
from ..metrics.classification import score_outputs
from ..metrics.retrieval import chance_units, parse_metric, per_query_hits, score_units, truth_ranks
from ..protocol import Protocol
from ..schema import content_hash
from .base import TaskFamily, TaskInputs, TaskResult, demo_note, head_params
from .linear_probe import _jsonable, feature_matrix

MAX_LOG_SCALE = math.log(100.0)  # CLIP's cap on the logit scale

# head param -> (default, allowed values or None for free values)
CHOICES: dict[str, tuple[Any, tuple | None]] = {
    "text_model": (None, None),
    "text_tower": ("protocol", ("protocol", "encoder")),  # encoder: the checkpoint's own text weights
    "report_text": (None, None),
    "text_max_len": (512, None),
    "text_pooling": ("cls", ("cls", "mean")),
    "visual_feature": ("global", ("global",)),
    "projection": ("linear", ("linear",)),
    "projection_dim": (512, None),
    "temperature_init": (1.0, None),
    "loss": ("symmetric_infonce", ("symmetric_infonce",)),
    "optimizer": ("adamw", ("adamw",)),
    "lr": (1e-4, None),
    "weight_decay": (0.01, None),
    "lr_schedule": ("cosine", ("cosine", "constant")),
    "batch_size": (128, None),
    "epochs": (30, None),
    "select_on": ("val_loss", ("val_loss",)),
    "prompts": ({"positive": "{X} is present.", "negative": "{X} is not present."}, None),
    "score": ("softmax_present", ("softmax_present",)),
    "balanced_acc_threshold": (0.5, None),
    "retrieval_pool": ("test_unique_reports", ("test_unique_reports",)),
    "recall_k": ([1, 5, 10, 50], None),
}


@dataclass(frozen=True)
class ContrastiveParams:
    """The head parameters of a voc / ret protocol, with the demo overrides applied where they apply."""

    text_model: str
    text_tower: str
    report_text: tuple[str, ...]
    text_max_len: int
    text_pooling: str
    projection_dim: int
    temperature_init: float
    lr: float
    weight_decay: float
    lr_schedule: str
    batch_size: int
    epochs: int
    prompts: tuple[str, str]
    threshold: float
    recall_k: tuple[int, ...]
    demo_keys: tuple[str, ...] = field(default=())

    @classmethod
    def from_protocol(cls, protocol: Protocol, synthetic: bool) -> "ContrastiveParams":
        pid, head = protocol.id, protocol.head
        if head.kind != "contrastive_projection":
            raise ValueError(f"{pid}: the {protocol.family} family trains head kind 'contrastive_projection', "
                             f"not {head.kind!r}")
        raw, used_demo = head_params(protocol, synthetic, set(CHOICES))
        values = {}
        for key, (default, allowed) in CHOICES.items():
            value = raw.get(key, default)
            if value is None:
                raise ValueError(f"{pid}: head.params.{key} is required")
            if allowed is not None and value not in allowed:
                raise ValueError(f"{pid}: head.params.{key} must be one of {list(allowed)}, got {value!r}")
            values[key] = value

        def number(key: str, kind=float, positive: bool = True):
            try:
                value = kind(values[key])
            except (TypeError, ValueError):
                raise ValueError(f"{pid}: head.params.{key} must be a number, got {values[key]!r}") from None
            if not math.isfinite(value) or (positive and value <= 0) or (not positive and value < 0):
                raise ValueError(f"{pid}: head.params.{key} must be {'positive' if positive else '>= 0'}, "
                                 f"got {values[key]!r}")
            return value

        report_text = values["report_text"]
        if isinstance(report_text, str):
            report_text = [report_text]
        if not report_text or not all(isinstance(c, str) and c for c in report_text):
            raise ValueError(f"{pid}: head.params.report_text must list report columns, got {values['report_text']!r}")
        prompts = values["prompts"]
        if not isinstance(prompts, dict) or set(prompts) != {"positive", "negative"} or \
                not all(isinstance(p, str) and "{X}" in p for p in prompts.values()):
            raise ValueError(f"{pid}: head.params.prompts must be {{positive: '...{{X}}...', negative: "
                             f"'...{{X}}...'}}, got {prompts!r}")
        threshold = number("balanced_acc_threshold")
        if not 0 < threshold < 1:
            raise ValueError(f"{pid}: head.params.balanced_acc_threshold must be in (0, 1), got {threshold}")
        ks = values["recall_k"]
        if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
            raise ValueError(f"{pid}: head.params.recall_k must list positive integers, got {ks!r}")
        return cls(text_model=str(values["text_model"]), text_tower=values["text_tower"],
                   report_text=tuple(report_text),
                   text_max_len=number("text_max_len", int), text_pooling=values["text_pooling"],
                   projection_dim=number("projection_dim", int),
                   temperature_init=number("temperature_init", positive=False),
                   lr=number("lr"), weight_decay=number("weight_decay", positive=False),
                   lr_schedule=values["lr_schedule"], batch_size=number("batch_size", int),
                   epochs=number("epochs", int), prompts=(prompts["positive"], prompts["negative"]),
                   threshold=threshold, recall_k=tuple(sorted(set(ks))), demo_keys=tuple(used_demo))


def text_source(inputs: TaskInputs, params: ContrastiveParams) -> tuple[str, TextWeights | None]:
    """(text model, weights): the protocol's frozen text model (CT-CLIP's protocol), or with ``text_tower:
    encoder`` the encoder checkpoint's own tower, in the card's text model (the demo's, on the demo cohort)."""
    if params.text_tower == "protocol":
        return params.text_model, None
    pid, ref = inputs.protocol.id, inputs.checkpoint
    if ref is None or ref.path is None:
        name = ref.card.name if ref is not None else "the encoder"
        raise ValueError(f"{pid}: head.params.text_tower 'encoder' needs a checkpoint; {name} has none")
    tower = ref.card.checkpoint.text_tower
    if tower is None or tower.key_prefix is None:
        raise ValueError(f"{pid}: head.params.text_tower 'encoder': the card of {ref.card.name!r} declares no text "
                         "tower in its checkpoint (checkpoint.text_tower.key_prefix)")
    model = params.text_model if "text_model" in params.demo_keys else tower.model_id
    return model, TextWeights(ref.card, ref.path, ref.sha256 or file_sha256(ref.path))


# ---------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------

def report_texts(manifest: Manifest, columns: tuple[str, ...], ids: list[str]) -> dict[str, str]:
    """Report text per case: the non-empty ``columns`` joined by a space; cases with no text are left out."""
    missing = [c for c in columns if c not in manifest.frame.columns]
    if missing:
        raise ValueError(f"{manifest.path}: report column(s) {missing} are missing; the table has "
                         f"{list(manifest.frame.columns)}")
    frame = manifest.frame.loc[list(ids), list(columns)]
    out = {}
    for case, row in frame.iterrows():
        parts = [str(v).strip() for v in row.tolist() if not pd.isna(v) and str(v).strip()]
        if parts:
            out[str(case)] = " ".join(parts)
    return out


def report_id(text: str) -> str:
    """A stable id for a report text, the same for every encoder and seed (paired tests over reports)."""
    return "report:" + content_hash(text)[:16]


# ---------------------------------------------------------------------------
# the projections and their training
# ---------------------------------------------------------------------------

class Projections(nn.Module):
    """CT-CLIP's to_visual_latent / to_text_latent (linear, no bias) and its learnable log logit scale."""

    def __init__(self, visual_dim: int, text_dim: int, dim: int, log_scale: float):
        super().__init__()
        self.visual = nn.Linear(visual_dim, dim, bias=False)
        self.text = nn.Linear(text_dim, dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(float(log_scale)))

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=MAX_LOG_SCALE).exp()

    def embed_visual(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x), dim=-1)

    def embed_text(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(t), dim=-1)

    def loss(self, x: torch.Tensor, t: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE; pairs with the same report text (``groups``) share the target mass."""
        logits = self.scale() * self.embed_visual(x) @ self.embed_text(t).T
        same = (groups[:, None] == groups[None, :]).to(logits.dtype)
        target = same / same.sum(dim=1, keepdim=True)
        v2t = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
        t2v = -(target * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
        return (v2t + t2v) / 2


@dataclass
class Pairs:
    """Volume features, report embeddings and report-text group ids of aligned pairs."""

    ids: list[str]
    x: torch.Tensor
    t: torch.Tensor
    groups: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Trained:
    model: Projections
    epoch: int  # 1-based epoch chosen on validation
    curve: list[dict[str, float | None]]
    note: str = ""


def train_projections(train: Pairs, val: Pairs, params: ContrastiveParams, seed: int, device: str) -> Trained:
    """Fit the projections on ``train``; keep the epoch with the lowest validation loss (earliest on ties)."""
    if len(train) < 2:
        raise ValueError(f"contrastive training needs at least 2 training pairs with report text, got {len(train)}")
    torch.manual_seed(seed)
    model = Projections(train.x.shape[1], train.t.shape[1], params.projection_dim, params.temperature_init).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(train) / params.batch_size)
    total = steps_per_epoch * params.epochs
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total) if params.lr_schedule == "cosine"
                else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    generator = torch.Generator().manual_seed(seed)
    x, t, g = train.x.to(device), train.t.to(device), train.groups.to(device)
    vx, vt, vg = val.x.to(device), val.t.to(device), val.groups.to(device)
    best, best_loss, best_epoch, curve = None, math.inf, params.epochs, []
    for epoch in range(1, params.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator).to(device)
        losses = []
        for start in range(0, len(train), params.batch_size):
            batch = order[start:start + params.batch_size]
            loss = model.loss(x[batch], t[batch], g[batch])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"contrastive loss became {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.item()) * len(batch))
        val_loss = None
        if len(val) >= 2:
            model.eval()
            with torch.no_grad():
                val_loss = float(model.loss(vx, vt, vg).item())
            if val_loss < best_loss:
                best, best_loss, best_epoch = copy.deepcopy(model.state_dict()), val_loss, epoch
        curve.append({"epoch": epoch, "train_loss": sum(losses) / len(train), "val_loss": val_loss})
    note = ""
    if best is None:
        note = (f"validation has {len(val)} pair(s) with report text, too few for a contrastive loss; "
                f"the last epoch ({params.epochs}) is used without selection")
    else:
        model.load_state_dict(best)
    model.eval()
    return Trained(model, best_epoch, curve, note)


# ---------------------------------------------------------------------------
# the families
# ---------------------------------------------------------------------------

@dataclass
class Prepared:
    """What both families share: params, the trained projections, text embeddings and bookkeeping."""

    params: ContrastiveParams
    trained: Trained
    text: TextModelInfo
    texts: dict[str, str]  # case id -> report text (every case of train, val and test that has one)
    embeddings: dict[str, np.ndarray]  # report text -> frozen text embedding (every report of the table)
    notes: dict[str, str]
    sizes: dict[str, int]


class _Contrastive(TaskFamily):
    """Trains the projections (shared by both families); subclasses score test."""

    needs = "global"

    def prepare(self, inputs: TaskInputs) -> Prepared:
        protocol, manifest = inputs.protocol, inputs.manifest
        if inputs.features is None:
            raise ValueError(f"{protocol.id}: the {self.name} family needs frozen global features")
        params = ContrastiveParams.from_protocol(protocol, manifest.synthetic)
        notes: dict[str, str] = {}
        if params.demo_keys:
            notes["demo"] = demo_note(list(params.demo_keys))
        split = inputs.split
        train_ids, val_ids, test_ids = list(inputs.train), list(split.val), list(split.test)
        if not train_ids:
            raise ValueError(f"{protocol.id}: the regime {inputs.ratio} subset of train is empty")
        # every report of the table is embedded once, so seeds and regimes read one cache entry
        every = report_texts(manifest, params.report_text, list(manifest.frame.index))
        texts = {c: every[c] for c in dict.fromkeys(train_ids + val_ids + test_ids) if c in every}
        for part, ids in (("train", train_ids), ("val", val_ids), ("test", test_ids)):
            lacking = [c for c in ids if c not in texts]
            if lacking:
                notes[f"no_report[{part}]"] = (f"{len(lacking)} {part} case(s) have no report text in "
                                               f"{list(params.report_text)}, e.g. {lacking[:3]}; left out of pairs")
        if not texts:
            raise ValueError(f"{protocol.id}: no case has report text in {list(params.report_text)}")
        unique = sorted(set(every.values()))
        root = inputs.cache_dir or cache_root()
        model, weights = text_source(inputs, params)
        if weights is not None:
            notes["text_tower"] = (f"{weights.card.name}'s own text tower ({weights.checkpoint.name}, under "
                                   f"{weights.card.checkpoint.text_tower.key_prefix!r}) loaded in full into {model}")
        vectors, info = embed_texts(model, unique, pooling=params.text_pooling,
                                    max_length=params.text_max_len, root=root, device=inputs.device, weights=weights)
        if info.max_length < params.text_max_len:
            notes["text_max_len"] = (f"{params.text_model} has {info.max_length} positions; reports truncated at "
                                     f"{info.max_length} tokens, not {params.text_max_len}")
        embeddings = dict(zip(unique, vectors))
        group_of = {text: i for i, text in enumerate(unique)}

        def pairs(ids: list[str], what: str) -> Pairs:
            kept = [c for c in ids if c in texts]
            x = feature_matrix(inputs.features, kept, what) if kept else np.empty((0, 0))
            t = np.stack([embeddings[texts[c]] for c in kept]) if kept else np.empty((0, info.dim))
            groups = [group_of[texts[c]] for c in kept]
            return Pairs(kept, torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(t, dtype=torch.float32),
                         torch.as_tensor(groups, dtype=torch.long))

        train, val = pairs(train_ids, "train"), pairs(val_ids, "val")
        if len(val) and val.x.shape[1] != train.x.shape[1]:
            raise ValueError(f"{protocol.id}: val features have {val.x.shape[1]} dims, train {train.x.shape[1]}")
        trained = train_projections(train, val, params, inputs.seed, inputs.device)
        if trained.note:
            notes["selection"] = trained.note
        sizes = {"train": len(train), "val": len(val), "test": len(test_ids), "dim": int(train.x.shape[1]),
                 "text_dim": info.dim, "projection_dim": params.projection_dim}
        return Prepared(params, trained, info, texts, embeddings, notes, sizes)

    def visual(self, inputs: TaskInputs, prepared: Prepared, ids: list[str], what: str) -> torch.Tensor:
        x = torch.as_tensor(feature_matrix(inputs.features, ids, what), dtype=torch.float32, device=inputs.device)
        with torch.no_grad():
            return prepared.trained.model.embed_visual(x)

    def text(self, inputs: TaskInputs, prepared: Prepared, vectors: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(vectors), dtype=torch.float32, device=inputs.device)
        with torch.no_grad():
            return prepared.trained.model.embed_text(t)

    def result(self, prepared: Prepared, metrics: dict[str, float | None], notes: dict[str, str],
               units: dict[str, Any], sizes: dict[str, int]) -> TaskResult:
        trained = prepared.trained
        units["val_curve"] = trained.curve
        return TaskResult(
            metrics=metrics,
            notes={**prepared.notes, **notes},
            selected={"epoch": trained.epoch, "logit_scale": float(trained.model.scale().item())},
            sizes={**prepared.sizes, **sizes},
            units=units,
            provenance={"text_model": prepared.text.name, "text_model_sha256": prepared.text.sha256},
        )


class VocabularyClassification(_Contrastive):
    """Each label scored by the prompt pair "{X} is present." / "{X} is not present."."""

    name = "voc"

    def run(self, inputs: TaskInputs) -> TaskResult:
        protocol = inputs.protocol
        target = protocol.data.target
        if target is None:
            raise ValueError(f"{protocol.id}: a voc protocol names its label set in data.target")
        spec = inputs.manifest.table.labels[target]
        if spec.kind not in ("binary", "multilabel"):
            raise ValueError(f"{protocol.id}: vocabulary classification scores binary or multi-label sets, "
                             f"not {spec.kind!r} ({target})")
        unsupported = [m for m in protocol.metrics if m not in ("auc", "balanced_acc")]
        if unsupported:
            raise ValueError(f"{protocol.id}: vocabulary classification reports auc and balanced_acc, not {unsupported}")
        prepared = self.prepare(inputs)
        params = prepared.params
        names = list(spec.columns)
        prompts = [template.replace("{X}", name) for name in names for template in params.prompts]
        model, weights = text_source(inputs, params)
        vectors, info = embed_texts(model, prompts, pooling=params.text_pooling,
                                    max_length=params.text_max_len,
                                    root=inputs.cache_dir or cache_root(), device=inputs.device, weights=weights)
        test_ids = list(inputs.split.test)
        if test_ids:
            v = self.visual(inputs, prepared, test_ids, "test")
            p = self.text(inputs, prepared, vectors).reshape(len(names), 2, -1)
            with torch.no_grad():
                logits = prepared.trained.model.scale() * torch.einsum("nd,lkd->nlk", v, p)
                scores = logits.softmax(dim=-1)[..., 0].double().cpu().numpy()
        else:
            scores = np.empty((0, len(names)))
        labels = label_matrix(inputs.manifest, target).loc[test_ids].to_numpy(dtype=float)
        thresholds = [params.threshold] * len(names)
        values = score_outputs(spec.kind, labels, scores, list(protocol.metrics), names, thresholds)
        auc = values.get("auc") or score_outputs(spec.kind, labels, scores, ["auc"], names)["auc"]
        notes = {m: v.reason for m, v in values.items() if v.reason}
        units = {
            "kind": "case", "task": spec.kind, "ids": test_ids, "label_names": names, "score_names": names,
            "labels": _jsonable(labels), "scores": _jsonable(scores), "thresholds": thresholds,
            "per_label": {n: (None if math.isnan(a) else a) for n, a in auc.per_label.items()},
            "prompts": prompts,
        }
        metrics = {m: (v.value if v.defined else None) for m, v in values.items()}
        return self.result(prepared, metrics, notes, units, {"labels": len(names)})


def chance_note(chance: dict[str, float], pool: dict[str, int]) -> str:
    """The record's note on chance level: the value per metric and the formula for each direction."""
    shown = ", ".join(f"{m} {v:.3f}" for m, v in chance.items())
    return (f"chance level (a uniformly random ranking): {shown}; V2R: K/P with P = {pool['v2r']} test reports; "
            f"R2V: mean over reports of 1 - C(V-m, K)/C(V, K) with V = {pool['r2v']} test volumes and m the "
            "volumes carrying the report")


class Retrieval(_Contrastive):
    """Volume -> report and report -> volume recall@K on the test set, reports deduplicated by text."""

    name = "ret"

    def run(self, inputs: TaskInputs) -> TaskResult:
        protocol = inputs.protocol
        for metric in protocol.metrics:
            parse_metric(metric)
        prepared = self.prepare(inputs)
        params = prepared.params
        asked = sorted({parse_metric(m)[0] for m in protocol.metrics})
        off_list = [k for k in asked if k not in params.recall_k]
        if off_list:
            raise ValueError(f"{protocol.id}: metrics ask for recall at K={off_list}, not in head.params.recall_k "
                             f"{list(params.recall_k)}")
        test_ids = [c for c in inputs.split.test if c in prepared.texts]
        if not test_ids:
            raise ValueError(f"{protocol.id}: no test case has report text; nothing to retrieve")
        pool = sorted(set(prepared.texts[c] for c in test_ids))
        column = {text: j for j, text in enumerate(pool)}
        owner = np.array([column[prepared.texts[c]] for c in test_ids])
        v = self.visual(inputs, prepared, test_ids, "test")
        r = self.text(inputs, prepared, np.stack([prepared.embeddings[text] for text in pool]))
        with torch.no_grad():
            similarity = (v @ r.T).double().cpu().numpy()
        relevant = owner[:, None] == np.arange(len(pool))[None, :]
        ranks_v2r = truth_ranks(similarity, relevant)
        ranks_r2v = truth_ranks(similarity.T, relevant.T)
        ids = test_ids + [report_id(text) for text in pool]
        directions = ["v2r"] * len(test_ids) + ["r2v"] * len(pool)
        ranks = [int(x) for x in ranks_v2r] + [int(x) for x in ranks_r2v]
        pools = {"v2r": len(pool), "r2v": len(test_ids)}
        counts = [int(x) for x in relevant.sum(axis=1)] + [int(x) for x in relevant.sum(axis=0)]
        names = list(protocol.metrics)
        units = {"kind": "query", "task": "retrieval", "ids": ids, "direction": directions, "rank": ranks,
                 "relevant": counts,
                 "per_case": per_query_hits(ranks, directions, names, pool=pools, relevant=counts),
                 "report_of": {c: report_id(prepared.texts[c]) for c in test_ids},
                 "pool": pools,
                 "tie_rule": "rank = 1 + irrelevant candidates scoring >= the best relevant one"}
        units["chance"] = chance_units(units, names)
        values = score_units(units, names)
        notes = {m: v.reason for m, v in values.items() if v.reason}
        notes["chance"] = chance_note(units["chance"], pools)
        metrics = {m: (v.value if v.defined else None) for m, v in values.items()}
        return self.result(prepared, metrics, notes, units, {"test_volumes": len(test_ids),
                                                             "test_reports": len(pool)})

