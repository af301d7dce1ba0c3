"""Text metrics for generated reports and answers: BLEU, ROUGE-L, BERTScore, exact match.

Conventions (the protocol's ``bleu`` / ``bertscore`` blocks name them):

* Normalisation. ``words``: lowercase, every character that is neither a word
  character nor whitespace deleted, split on whitespace. ``r2gen_clean`` (the
  R2Gen / M2KT report convention): the text is split into sentences, each
  sentence normalised as ``words``, and the sentences joined by a ``.`` token,
  so a report ``"Heart normal. No effusion."`` becomes
  ``heart normal . no effusion .``.
* BLEU-1..4 are corpus-level, from ``nltk.translate.bleu_score.corpus_bleu``
  with uniform cumulative weights, one reference per hypothesis, and the
  protocol's smoothing (``none`` = nltk's method0: an n-gram order with no
  match makes the score 0; ``method1``-``method3`` are nltk's). Each unit's
  clipped n-gram matches, n-gram totals and lengths are kept, so corpus BLEU
  can be recomputed exactly for any subset or bootstrap weighting.
* ROUGE-L: the F1 (beta 1) of ``rouge_score``'s ``rougeL`` on the normalised
  text, averaged over units.
* BERTScore: F1 from ``bert_score`` with the configured model (local folder,
  alias or cached hub id) and layer, no idf and no baseline rescaling unless
  configured; one value per unit, averaged.
* Accuracy: normalised exact match (lowercase, punctuation and the articles
  a / an / the removed, whitespace collapsed).

Sentence splitting is nltk's Punkt algorithm with fixed abbreviation
parameters, so it needs no downloaded model data.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

TOKENIZERS = ("words", "r2gen_clean")
SMOOTHING = ("none", "method1", "method2", "method3")  # count-based nltk methods: exact under re-weighting
SENTENCE_TOKEN = "."
TEXT_TASK = "text_generation"  # units["task"] of report generation and VQA outputs

# Abbreviations common in radiology text; Punkt does not end a sentence after them. "No." is
# left out: in reports it is a whole sentence far more often than "number".
ABBREVIATIONS = ("dr", "mr", "mrs", "ms", "vs", "e.g", "i.e", "approx", "cf", "fig", "etc", "st", "ca",
                 "max", "min", "prof", "incl", "resp")


# --------------------------------------------------------------------------- normalisation

@lru_cache(maxsize=1)
def _punkt():
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (offline Punkt: no model data needed); decimals and listed abbreviations stay inside."""
    text = " ".join(str(text).split())
    return [s.strip() for s in _punkt().tokenize(text) if s.strip()] if text else []


_NON_WORD = re.compile(r"[^\w\s]|_")


def _words(text: str, lowercase: bool) -> list[str]:
    text = text.lower() if lowercase else text
    return _NON_WORD.sub("", text).split()


def normalize(text: str, tokenizer: str = "words", lowercase: bool = True) -> list[str]:
    """Tokens BLEU and ROUGE see (see the module doc for the two conventions)."""
    if tokenizer == "words":
        return _words(str(text), lowercase)
    if tokenizer == "r2gen_clean":
        out: list[str] = []
        for sentence in split_sentences(str(text)):
            words = _words(sentence, lowercase)
            if words:
                out += words + [SENTENCE_TOKEN]
        return out
    raise ValueError(f"unknown text tokenizer {tokenizer!r}; expected one of {list(TOKENIZERS)}")


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Exact-match form of an answer: lowercase, punctuation and articles removed, whitespace collapsed."""
    text = _NON_WORD.sub(" ", str(text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
    _same_length(references, hypotheses)
    return [float(normalize_answer(r) == normalize_answer(h)) for r, h in zip(references, hypotheses)]


def _same_length(references: Sequence, hypotheses: Sequence) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference(s) but {len(hypotheses)} hypothesis/es; expected one each")


# --------------------------------------------------------------------------- BLEU

@dataclass(frozen=True)
class BleuSettings:
    max_order: int = 4
    smoothing: str = "none"
    lowercase: bool = True
    tokenizer: str = "words"

    @classmethod
    def from_params(cls, block: Mapping[str, Any] | None, where: str) -> "BleuSettings":
        """From a protocol's ``bleu`` block; unknown keys or values fail naming ``where``."""
        block = dict(block or {})
        level = block.pop("level", "corpus")
        if level != "corpus":
            raise ValueError(f"{where}: bleu.level must be 'corpus', got {level!r}")
        known = {"max_order", "smoothing", "lowercase", "tokenizer"}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(f"{where}: unknown bleu key(s) {unknown}; expected {sorted(known | {'level'})}")
        settings = cls(**{k: block[k] for k in known if k in block})
        if not isinstance(settings.max_order, int) or not 1 <= settings.max_order <= 4:
            raise ValueError(f"{where}: bleu.max_order must be 1..4, got {settings.max_order!r}")
        if settings.smoothing not in SMOOTHING:
            raise ValueError(f"{where}: bleu.smoothing must be one of {list(SMOOTHING)}, got {settings.smoothing!r}")
        if settings.tokenizer not in TOKENIZERS:
            raise ValueError(f"{where}: bleu.tokenizer must be one of {list(TOKENIZERS)}, got {settings.tokenizer!r}")
        return settings

    def as_dict(self) -> dict[str, Any]:
        return {"max_order": self.max_order, "smoothing": self.smoothing, "lowercase": self.lowercase,
                "tokenizer": self.tokenizer}

    def describe(self) -> str:
        return (f"corpus BLEU-1..{self.max_order} (nltk corpus_bleu, smoothing {self.smoothing}), "
                f"{'lowercased ' if self.lowercase else ''}{self.tokenizer} tokens")


def _smoothing_function(name: str):
    from nltk.translate.bleu_score import SmoothingFunction

    return getattr(SmoothingFunction(), "method0" if name == "none" else name)


def _weights(n: int) -> tuple[float, ...]:
    return tuple([1.0 / n] * n)


def corpus_bleu_scores(references: Sequence[str], hypotheses: Sequence[str], settings: BleuSettings) -> dict[str, float]:
    """``{"bleu1": ..., "bleuN": ...}`` with nltk's corpus_bleu (one reference per hypothesis)."""
    from nltk.translate.bleu_score import corpus_bleu

    _same_length(references, hypotheses)
    if not references:
        raise ValueError("BLEU of an empty corpus is undefined")
    refs = [[normalize(r, settings.tokenizer, settings.lowercase)] for r in references]
    hyps = [normalize(h, settings.tokenizer, settings.lowercase) for h in hypotheses]
    weights = [_weights(n) for n in range(1, settings.max_order + 1)]
    with warnings.catch_warnings():  # nltk warns for every order without a match; the score says it (0)
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(refs, hyps, weights=weights, smoothing_function=_smoothing_function(settings.smoothing))
    scores = scores if isinstance(scores, list) else [scores]
    return {f"bleu{n}": float(s) for n, s in enumerate(scores, start=1)}


def bleu_counts(reference: str, hypothesis: str, settings: BleuSettings) -> list[int]:
    """One unit's BLEU statistics: clipped matches per order, n-gram totals per order, hypothesis and
    reference length (nltk's ``modified_precision`` numerator / denominator, as corpus_bleu sums them)."""
    from nltk.translate.bleu_score import closest_ref_length, modified_precision

    ref = normalize(reference, settings.tokenizer, settings.lowercase)
    hyp = normalize(hypothesis, settings.tokenizer, settings.lowercase)
    fractions = [modified_precision([ref], hyp, n) for n in range(1, settings.max_order + 1)]
    return ([int(f.numerator) for f in fractions] + [int(f.denominator) for f in fractions]
            + [len(hyp), int(closest_ref_length([ref], len(hyp)))])


def bleu_from_counts(counts: np.ndarray, settings: BleuSettings) -> dict[str, float]:
    """Corpus BLEU-1..N from summed unit statistics (``bleu_counts`` rows, possibly weighted),
    following corpus_bleu's steps: brevity penalty, smoothing, weighted log-precision sum."""
    from nltk.translate.bleu_score import Fraction, brevity_penalty

    n = settings.max_order
    total = np.asarray(counts, dtype=float)
    total = total.sum(axis=0) if total.ndim == 2 else total
    if not np.allclose(total, np.round(total)):
        raise ValueError("BLEU statistics must be whole counts (integer weights)")
    total = np.round(total).astype(int)
    num, den, hyp_len, ref_len = total[:n], total[n:2 * n], int(total[2 * n]), int(total[2 * n + 1])
    if num[0] == 0:
        return {f"bleu{k}": 0.0 for k in range(1, n + 1)}
    bp = brevity_penalty(ref_len, hyp_len)
    p_n = [Fraction(int(a), int(b), _normalize=False) for a, b in zip(num, den)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        p_n = _smoothing_function(settings.smoothing)(p_n, references=None, hypothesis=None, hyp_len=hyp_len)
    out = {}
    for k in range(1, n + 1):
        s = math.fsum(w * math.log(p) for w, p in zip(_weights(k), p_n[:k]) if p > 0)
        out[f"bleu{k}"] = float(bp * math.exp(s))
    return out


def sentence_bleu_scores(references: Sequence[str], hypotheses: Sequence[str], settings: BleuSettings,
                         order: int = 4) -> list[float]:
    """Per-unit BLEU-``order`` (nltk sentence_bleu with smoothing method1, so one missing 4-gram does not
    zero a report): a per-report quantity for case-level tests, not the corpus metric."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    _same_length(references, hypotheses)
    smooth = SmoothingFunction().method1
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for r, h in zip(references, hypotheses):
            ref, hyp = normalize(r, settings.tokenizer, settings.lowercase), normalize(h, settings.tokenizer, settings.lowercase)
            out.append(float(sentence_bleu([ref], hyp, weights=_weights(order), smoothing_function=smooth)) if hyp else 0.0)
    return out


# --------------------------------------------------------------------------- ROUGE-L

def rouge_l(references: Sequence[str], hypotheses: Sequence[str], tokenizer: str = "words",
            lowercase: bool = True) -> list[float]:
    """ROUGE-L F1 per unit (rouge_score's LCS-based rougeL), on the same normalised tokens as BLEU."""
    from rouge_score import rouge_scorer

    _same_length(references, hypotheses)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    out = []
    for r, h in zip(references, hypotheses):
        ref = " ".join(t for t in normalize(r, tokenizer, lowercase) if t != SENTENCE_TOKEN)
        hyp = " ".join(t for t in normalize(h, tokenizer, lowercase) if t != SENTENCE_TOKEN)
        out.append(float(scorer.score(ref, hyp)["rougeL"].fmeasure))
    return out


# --------------------------------------------------------------------------- BERTScore

@dataclass(frozen=True)
class BertScoreSettings:
    model: str = "roberta-large"
    num_layers: int = 17
    idf: bool = False
    rescale_with_baseline: bool = False
    batch_size: int = 32

    @classmethod
    def from_params(cls, block: Mapping[str, Any] | None, where: str) -> "BertScoreSettings":
        block = dict(block or {})
        known = {"model", "num_layers", "idf", "rescale_with_baseline", "batch_size"}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(f"{where}: unknown bertscore key(s) {unknown}; expected {sorted(known)}")
        if "model" not in block or "num_layers" not in block:
            raise ValueError(f"{where}: bertscore needs 'model' and 'num_layers' (got {sorted(block)})")
        if block.get("rescale_with_baseline"):
            raise ValueError(f"{where}: bertscore.rescale_with_baseline needs bert-score's baseline files, which "
                             "exist only for its hub model names; set it to false")
        return cls(**block)

    def describe(self) -> str:
        return (f"BERTScore F1 ({self.model}, layer {self.num_layers}, idf {self.idf}, "
                f"rescaled {self.rescale_with_baseline})")


class BertScore:
    """A loaded BERTScore model: resolve the text model once (offline), score many batches."""

    def __init__(self, settings: BertScoreSettings, device: str = "cpu"):
        from bert_score import BERTScorer

        from ..encoders.text import resolve_text_model, text_model_sha256

        self.settings = settings
        self.folder = resolve_text_model(settings.model)  # TextModelError when it is not on this machine
        self.sha256 = text_model_sha256(settings.model)
        self.scorer = BERTScorer(model_type=str(self.folder), num_layers=int(settings.num_layers),
                                 idf=bool(settings.idf), batch_size=int(settings.batch_size), device=device,
                                 rescale_with_baseline=False)

    def f1(self, references: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
        _same_length(references, hypotheses)
        if not references:
            return []
        if self.settings.idf:
            self.scorer.compute_idf([str(r) for r in references])
        # an empty text scores 0 (bert-score's own rule); it is kept out of the model call, whose
        # empty-string path does not run under transformers 5
        out = [0.0] * len(references)
        keep = [i for i, (r, h) in enumerate(zip(references, hypotheses)) if str(r).strip() and str(h).strip()]
        if keep:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, _, f = self.scorer.score([str(hypotheses[i]) for i in keep], [str(references[i]) for i in keep],
                                            verbose=False)
            for i, v in zip(keep, f.tolist()):
                out[i] = float(v)
        return out


# --------------------------------------------------------------------------- units and recomputation

def text_units(ids: Sequence[str], references: Sequence[str], hypotheses: Sequence[str], settings: BleuSettings,
               per_case: Mapping[str, Sequence[float]], groups: Sequence[str] | None = None,
               group_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-unit outputs of a text task: texts, BLEU statistics and per-unit scores, aligned with ``ids``.

    With ``groups`` (VQA question types) every metric is computed per group and macro-averaged."""
    units: dict[str, Any] = {
        "task": TEXT_TASK, "ids": list(ids), "references": list(references), "hypotheses": list(hypotheses),
        "bleu": settings.as_dict(),
        "bleu_counts": [bleu_counts(r, h, settings) for r, h in zip(references, hypotheses)],
        "per_case": {m: [None if v is None or not math.isfinite(v) else float(v) for v in values]
                     for m, values in per_case.items()},
    }
    if groups is not None:
        units["groups"] = list(groups)
        units["group_names"] = list(group_names) if group_names is not None else sorted(set(groups))
    return units


def _group_rows(units: Mapping[str, Any]) -> dict[str | None, np.ndarray]:
    if "groups" not in units:
        return {None: np.arange(len(units["ids"]))}
    groups = np.asarray(units["groups"], dtype=object)
    return {g: np.flatnonzero(groups == g) for g in units["group_names"]}


def _one_group(units: Mapping[str, Any], metric: str, rows: np.ndarray, W: np.ndarray,
               settings: BleuSettings) -> np.ndarray | None:
    """``metric`` over the units at ``rows`` for each weight row of W [replicates, units]; NaN where undefined."""
    Wr = W[:, rows]
    weight = Wr.sum(axis=1)
    if metric.startswith("bleu") and metric[4:].isdigit():
        if int(metric[4:]) > settings.max_order:
            return None
        counts = np.asarray(units["bleu_counts"], dtype=float).reshape(-1, 2 * settings.max_order + 2)[rows]
        summed = Wr @ counts
        return np.array([bleu_from_counts(c, settings)[metric] if w > 0 else np.nan for c, w in zip(summed, weight)])
    per_case = units.get("per_case", {})
    if metric not in per_case:
        return None
    values = np.array([np.nan if v is None else v for v in per_case[metric]], dtype=float)[rows]
    defined = np.isfinite(values)
    wd = Wr[:, defined]
    total = wd.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wd @ values[defined] / np.where(total > 0, total, 1), np.nan)


def text_set_metric(units: Mapping[str, Any], metric: str, W: np.ndarray) -> np.ndarray | None:
    """``metric`` recomputed from text units under case weights W [replicates, units] (the stats layer's
    bootstrap): corpus BLEU from summed statistics, other metrics as weighted means; macro over groups."""
    if units.get("task") != TEXT_TASK:
        return None
    W = np.atleast_2d(np.asarray(W, dtype=float))
    settings = BleuSettings(**units["bleu"])
    per_group = []
    for rows in _group_rows(units).values():
        value = _one_group(units, metric, rows, W, settings)
        if value is None:
            return None
        per_group.append(value)
    M = np.array(per_group)
    count = np.isfinite(M).sum(axis=0)
    return np.where(count > 0, np.where(np.isfinite(M), M, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)


def per_group_metrics(units: Mapping[str, Any], metrics: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Each group's metrics (unweighted), e.g. VQA per question type."""
    settings = BleuSettings(**units["bleu"])
    out: dict[str, dict[str, float | None]] = {}
    for group, rows in _group_rows(units).items():
        values = {}
        for metric in metrics:
            v = _one_group(units, metric, rows, np.ones((1, len(units["ids"]))), settings)
            values[metric] = None if v is None or not np.isfinite(v[0]) else float(v[0])
        out[str(group)] = values
    return out


def recompute_text(units: Mapping[str, Any], metrics: Sequence[str]) -> dict[str, float | None]:
    """A text record's metrics from its units; None where undefined (e.g. an empty group everywhere)."""
    out = {}
    for metric in metrics:
        v = text_set_metric(units, metric, np.ones((1, len(units["ids"]))))
        out[metric] = None if v is None or not np.isfinite(v[0]) else float(v[0])
    return out
