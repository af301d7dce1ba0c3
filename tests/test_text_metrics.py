"""Text metrics: BLEU on hand-computed corpora, normalisation, offline sentence splitting, ROUGE-L, BERTScore."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asap_bench.encoders.text import OFFLINE_MINILM, TextModelError
from asap_bench.metrics.text import (BertScore, BertScoreSettings, BleuSettings, bleu_counts, bleu_from_counts,
                                     corpus_bleu_scores, exact_match, normalize, normalize_answer, recompute_text,
                                     rouge_l, sentence_bleu_scores, split_sentences, text_set_metric, text_units)

WORDS = BleuSettings()


def test_corpus_bleu_matches_hand_computation():
    """Two pairs: one exact, one with a substitution and two missing words (pycocoevalcap/sacrebleu counting:
    clipped matches and totals summed over the corpus, brevity penalty from the summed lengths)."""
    refs = ["a b c d", "A b c d e f."]
    hyps = ["a b c d", "a, b x d"]
    # matches/totals: 1-grams 4+3 / 4+4, 2-grams 3+1 / 3+3, 3-grams 2+0 / 2+2, 4-grams 1+0 / 1+1
    p = [7 / 8, 4 / 6, 2 / 4, 1 / 2]
    bp = math.exp(1 - 10 / 8)
    expected = {f"bleu{n}": bp * math.exp(sum(math.log(x) for x in p[:n]) / n) for n in range(1, 5)}
    got = corpus_bleu_scores(refs, hyps, WORDS)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got["bleu1"] == pytest.approx(0.681450685, rel=1e-8)
    assert got["bleu4"] == pytest.approx(0.481272, rel=1e-5)
    assert bleu_counts(refs[1], hyps[1], WORDS) == [3, 1, 0, 0, 4, 3, 2, 1, 4, 6]


def test_unsmoothed_bleu_is_zero_without_a_4gram_match_and_smoothing_is_stated():
    refs, hyps = ["no pleural effusion is seen"], ["no pleural effusion"]
    # nltk's method0 puts sys.float_info.min for the empty order: zero up to ~1e-77
    assert corpus_bleu_scores(refs, hyps, WORDS)["bleu4"] < 1e-70
    # method1 adds epsilon 0.1 to the empty 4-gram count: p4 = 0.1 / 1
    smoothed = corpus_bleu_scores(refs, hyps, BleuSettings(smoothing="method1"))
    bp = math.exp(1 - 5 / 3)
    assert smoothed["bleu4"] == pytest.approx(bp * (1 * 1 * 1 * 0.1) ** 0.25)
    assert "smoothing none" in WORDS.describe()


@pytest.mark.parametrize("smoothing", ["none", "method1", "method2", "method3"])
def test_bleu_from_unit_counts_equals_corpus_bleu(smoothing):
    rng = np.random.default_rng(0)
    vocab = "no yes heart lung nodule effusion pleural the is seen mm left right".split()
    refs = [" ".join(rng.choice(vocab, size=rng.integers(3, 12))) for _ in range(30)]
    hyps = [" ".join(rng.choice(vocab, size=rng.integers(1, 12))) for _ in range(30)]
    settings = BleuSettings(smoothing=smoothing)
    counts = np.array([bleu_counts(r, h, settings) for r, h in zip(refs, hyps)])
    assert bleu_from_counts(counts, settings) == pytest.approx(corpus_bleu_scores(refs, hyps, settings), rel=1e-12)
    # a unit weighted twice is the corpus with that unit duplicated
    W = np.ones((1, 30))
    W[0, 3] = 2
    units = text_units([str(i) for i in range(30)], refs, hyps, settings, {})
    twice = corpus_bleu_scores(refs + [refs[3]], hyps + [hyps[3]], settings)["bleu4"]
    assert text_set_metric(units, "bleu4", W)[0] == pytest.approx(twice, rel=1e-12)


def test_r2gen_clean_keeps_sentence_tokens_and_drops_punctuation():
    text = "The heart is enlarged. No pleural effusion, no 2.5 mm nodule!\nGround-glass opacity (RUL)."
    assert normalize(text, "r2gen_clean") == ["the", "heart", "is", "enlarged", ".", "no", "pleural", "effusion",
                                              "no", "25", "mm", "nodule", ".", "groundglass", "opacity", "rul", "."]
    assert normalize("No.", "words") == ["no"] and normalize("", "r2gen_clean") == []
    with pytest.raises(ValueError, match="unknown text tokenizer 'spacy'"):
        normalize("x", "spacy")


def test_sentence_splitting_works_offline():
    text = ("A 2.5 mm nodule is seen in the right upper lobe. Dr. Smith compared it with the prior study, "
            "e.g. the one from March! Is there an effusion? No. Heart size normal")
    assert split_sentences(text) == [
        "A 2.5 mm nodule is seen in the right upper lobe.",
        "Dr. Smith compared it with the prior study, e.g. the one from March!",
        "Is there an effusion?", "No.", "Heart size normal"]
    assert split_sentences("  ") == []


def test_rouge_l_on_a_hand_example():
    # LCS("the cat sat on the mat", "the cat on the mat today") = "the cat on the mat": P = R = 5/6
    assert rouge_l(["The cat sat on the mat."], ["the cat on the mat today"]) == pytest.approx([5 / 6])
    # LCS = "cat the mat": P = 3/3, R = 3/6 -> F1 = 2/3
    assert rouge_l(["the cat sat on the mat"], ["cat the mat"])[0] == pytest.approx(2 * 1 * 0.5 / (1 + 0.5))
    assert rouge_l(["a b"], [""]) == [0.0]


def test_exact_match_normalises_case_punctuation_and_articles():
    assert normalize_answer("The  Right upper lobe.") == "right upper lobe"
    assert exact_match(["Yes.", "the left lung", "36 mm"], ["yes", "Left lung!", "35 mm"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="2 reference"):
        exact_match(["a", "b"], ["a"])


def test_bertscore_offline_minilm():
    scorer = BertScore(BertScoreSettings(model=OFFLINE_MINILM, num_layers=6))
    f = scorer.f1(["No pleural effusion.", "The heart is enlarged.", "x"],
                  ["No pleural effusion.", "A 3 cm nodule in the left lower lobe.", ""])
    assert f[0] == pytest.approx(1.0, abs=1e-4)
    assert f[1] < 0.9 and f[2] == 0.0
    assert len(scorer.sha256) == 64


def test_bertscore_hub_model_fails_offline_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextModelError, match="roberta-large-not-here/x"):
        BertScore(BertScoreSettings(model="roberta-large-not-here/x", num_layers=17))
    with pytest.raises(ValueError, match="bertscore needs 'model' and 'num_layers'"):
        BertScoreSettings.from_params({"model": "x"}, "rg/x")


def test_grouped_units_macro_average_and_recompute():
    ids = ["q1", "q2", "q3", "q4"]
    refs, hyps = ["yes", "no", "left lung", "36 mm"], ["yes", "yes", "left lung", "36 mm"]
    acc = exact_match(refs, hyps)
    units = text_units(ids, refs, hyps, WORDS, {"accuracy": acc}, groups=["presence", "presence", "location", "size"],
                       group_names=["presence", "location", "size"])
    again = recompute_text(units, ["accuracy", "bleu1"])
    assert again["accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert again["bleu1"] == pytest.approx((0.5 + 1 + 1) / 3)
    with pytest.raises(ValueError, match="bleu.smoothing must be one of"):
        BleuSettings.from_params({"smoothing": "method7"}, "vqa/radgenome")


def test_sentence_bleu_per_report():
    scores = sentence_bleu_scores(["no pleural effusion is seen", "heart normal"],
                                  ["no pleural effusion is seen", ""], WORDS)
    assert scores[0] == pytest.approx(1.0) and scores[1] == 0.0
