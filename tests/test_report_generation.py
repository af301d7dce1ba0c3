"""Report generation: decoding, vocabulary, settings, the acceptance check against a constant report,
and a tokenizer that cannot be loaded failing its job but not the run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asap_bench.data.demo import CT_RATE_LABELS
from asap_bench.data.manifest import load_manifest
from asap_bench.encoders.text import OFFLINE_MINILM, TextModelError
from asap_bench.metrics.text import corpus_bleu_scores, recompute_text
from asap_bench.protocol import get_protocol
from asap_bench.results.record import read_record
from asap_bench.splits import ensure_split
from asap_bench.tasks.base import FeatureLookup, TaskInputs
from asap_bench.tasks.report_generation import RGParams, ReportGeneration, most_common_report
from asap_bench.tasks.text_decoding import Vocabulary, beam_decode, greedy_decode, load_tokenizer

# a report stating that everything is normal, in the demo's own phrasing
NORMAL_TEMPLATE = ("No medical device is seen. Heart size is normal. No pericardial effusion. No coronary artery "
                   "calcification. No mediastinal or hilar lymphadenopathy. No hiatal hernia. No pulmonary nodule is "
                   "seen. No ground-glass opacity. No consolidation. No emphysema. No pleural effusion.")


pytestmark = pytest.mark.usefixtures("one_thread")


def with_params(protocol_id: str, **params):
    protocol = get_protocol(protocol_id)
    head = protocol.head.model_copy(update={"params": {**protocol.head.params, **params}})
    return protocol.model_copy(update={"head": head})


class FindingTokens(FeatureLookup):
    """The tokens of an encoder that sees the drawn findings: one token per CT-RATE label,
    [one-hot label index, +-1 presence] with a little noise."""

    def __init__(self, manifest, seed: int = 0):
        labels = manifest.frame[list(CT_RATE_LABELS)].to_numpy(dtype=float)
        n, k = labels.shape
        rng = np.random.default_rng(seed)
        tokens = np.concatenate([np.broadcast_to(np.eye(k), (n, k, k)), (2 * labels - 1)[:, :, None]], axis=2)
        self.tokens_ = (tokens + 0.05 * rng.standard_normal(tokens.shape)).astype(np.float32)
        self.rows = {c: i for i, c in enumerate(manifest.frame.index)}

    def global_features(self, case_ids):
        return self.tokens_[[self.rows[c] for c in case_ids]].mean(axis=1)

    def tokens(self, case_ids):
        return self.tokens_[[self.rows[c] for c in case_ids]]


# --------------------------------------------------------------------------- decoding

def _toy_step(table: dict[tuple[int, ...], dict[int, float]], vocab: int):
    """Next-token log-probs from a table keyed by the prefix after BOS (0)."""
    def step(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(prefix), vocab), -1e9)
        for i, seq in enumerate(prefix.tolist()):
            for token, prob in table.get(tuple(seq[1:]), {1: 1.0}).items():
                out[i, token] = math.log(prob)
        return out
    return step


def test_beam_search_finds_the_more_probable_sequence_greedy_misses():
    # BOS 0, EOS 1. Greedy takes A (0.6) then C (0.35) then EOS: p = 0.21; beam keeps B (0.4) -> EOS (0.9): p = 0.36
    A, B, C, D = 2, 3, 4, 5
    table = {(): {A: 0.6, B: 0.4}, (A,): {1: 0.3, C: 0.35, D: 0.35}, (B,): {1: 0.9, C: 0.1}, (A, C): {1: 1.0},
             (A, D): {1: 1.0}, (B, C): {1: 1.0}}
    step = _toy_step(table, 6)
    assert greedy_decode(step, 1, 0, 1, 10) == [[A, C]]
    assert beam_decode(step, 1, 0, 1, 10, beam_size=2) == [[B]]
    assert beam_decode(step, 1, 0, 1, 10, beam_size=1) == [[A, C]]
    # normalised by length (EOS counted): B EOS = log(0.36) / 2 = -0.511 still beats A C EOS = log(0.21) / 3 = -0.520
    assert beam_decode(step, 1, 0, 1, 10, beam_size=3, length_penalty=1.0) == [[B]]
    # a batch of two inputs decodes each independently
    assert beam_decode(step, 2, 0, 1, 10, beam_size=2) == [[B], [B]]


def test_vocabulary_round_trip_and_wordpiece_spacing():
    loaded = load_tokenizer(OFFLINE_MINILM)
    texts = ["A 2.5 mm nodule in the left-lower lobe (RUL).", "No pleural effusion."]
    vocab = Vocabulary(loaded, texts)
    ids = vocab.encode(texts[0], max_len=100)
    assert ids[0] == Vocabulary.BOS and ids[-1] == Vocabulary.EOS
    assert vocab.decode(ids[1:]) == "a 2.5 mm nodule in the left-lower lobe (rul)."
    assert vocab.encode("cardiomegaly", 10)[1] == Vocabulary.UNK  # never seen in training
    assert len(vocab.encode(texts[0], max_len=3)) == 5
    assert len(loaded.sha256) == 64


def test_settings_demo_overrides_grid_and_errors():
    protocol = get_protocol("rg/ctrg")
    paper, replaced = RGParams.read(protocol, synthetic=False)
    assert paper.d_model == 512 and paper.tokenizer == "microsoft/BiomedVLP-CXR-BERT-specialized" and not replaced
    assert paper.bleu.tokenizer == "r2gen_clean" and paper.bleu.smoothing == "none" and paper.beam_size == 3
    demo, replaced = RGParams.read(protocol, synthetic=True)
    assert demo.tokenizer == OFFLINE_MINILM and demo.bertscore.num_layers == 6 and "d_model" in replaced
    assert ReportGeneration().token_grid(protocol) == (7, 7, 7)
    with pytest.raises(ValueError, match=r"unknown head param\(s\) \['beam_szie'\]"):
        RGParams.read(with_params("rg/ctrg", beam_szie=3), synthetic=False)
    with pytest.raises(ValueError, match="visual_tokens must be"):
        ReportGeneration().token_grid(with_params("rg/ctrg", visual_tokens="pooled_7x7"))


def test_most_common_report():
    assert most_common_report(["b", "a", "a", "b", "c"]) == "b"
    assert most_common_report(["x", "y"]) == "x"


# --------------------------------------------------------------------------- acceptance

def test_generated_reports_beat_a_constant_normal_report_on_bleu4(demo_root, tmp_path):
    """With visual tokens that carry the findings, the decoder (demo settings) writes case-specific reports
    that beat a fixed normal template on test BLEU-4. The most common training report (a real report, with
    findings) is the stronger constant; its score is recorded with every result."""
    protocol = with_params("rg/ct-rate", demo_eval_every=15)  # validation decoded once, after the last epoch
    manifest = load_manifest(demo_root, "ct-rate", "volumes")
    split = ensure_split(manifest, protocol, 0, tmp_path / "splits")
    torch.manual_seed(0)
    result = ReportGeneration().run(TaskInputs(protocol, manifest, split, 1.0, 0, FindingTokens(manifest)))
    units = result.units
    references = units["references"]
    template = corpus_bleu_scores(references, [NORMAL_TEMPLATE] * len(references), RGParams.read(protocol, True)[0].bleu)
    print(f"\nBLEU-4 generated {result.metrics['bleu4']:.4f}, most common training report "
          f"{result.selected['constant_baseline_bleu4']:.4f}, normal template {template['bleu4']:.4f}")
    assert result.metrics["bleu4"] > template["bleu4"]
    assert 0 < result.selected["constant_baseline_bleu4"] < 1 and "most common training report" in result.notes["baseline"]
    assert len(set(units["hypotheses"])) > 1  # reports depend on the case
    assert set(result.metrics) == set(protocol.metrics)
    assert recompute_text(units, list(protocol.metrics)) == pytest.approx(result.metrics, rel=1e-12)
    assert units["ids"] == [c for c in split.test]
    assert len(units["per_case"]["bertscore_f1"]) == len(units["ids"])
    assert result.provenance["text_model"].startswith(f"tokenizer {OFFLINE_MINILM}")
    assert len(result.provenance["text_model_sha256"]) == 64
    assert "demo_" not in str(sorted(result.notes)) and "demo cohort" in result.notes["demo"]
    assert result.sizes == {"train": len(split.train), "val": len(split.val), "test": len(split.test)}


# --------------------------------------------------------------------------- failure isolation

def test_a_tokenizer_that_cannot_be_loaded_fails_the_job_not_the_run(demo_root, tmp_path, monkeypatch):
    from asap_bench.runner.jobs import Job
    from asap_bench.runner.local import RunOptions, run_jobs
    import logging

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad = with_params("rg/ctrg", demo_tokenizer="no-such-org/no-such-tokenizer")
    jobs = [Job("random", bad, 1.0, 0), Job("random", bad, 1.0, 1)]
    options = RunOptions(data_root=demo_root, out=tmp_path / "runs", variant="demo", cache_dir=tmp_path / "cache",
                         progress=False)
    outcomes = run_jobs(jobs, options, logging.getLogger("test"))
    assert [o.status for o in outcomes] == ["failed", "failed"]
    for job in jobs:
        record = read_record(job.record_path(options.out))
        assert record.status == "failed"
        assert "TextModelError" in record.error and "no-such-org/no-such-tokenizer" in record.error
        assert "huggingface-cli download" in record.error


def test_unloadable_text_model_raises_before_training(demo_root, tmp_path):
    protocol = with_params("rg/ctrg", demo_bertscore={"model": str(tmp_path / "missing-model"), "num_layers": 6})
    manifest = load_manifest(demo_root, "ctrg", "volumes")
    split = ensure_split(manifest, protocol, 0, tmp_path / "splits")

    class NoTokens(FeatureLookup):
        def global_features(self, case_ids):
            raise AssertionError("features must not be read when a text model is missing")

    with pytest.raises(TextModelError, match="missing-model"):
        ReportGeneration().run(TaskInputs(protocol, manifest, split, 1.0, 0, NoTokens()))


# --------------------------------------------------------------------------- incremental decoding

def _small_model(vocab: int = 14, n_visual: int = 6, visual_dim: int = 10, **params):
    from asap_bench.tasks.report_generation import ReportModel

    fixed = {"demo_encoder_layers": 1, "demo_d_model": 32, "demo_n_heads": 4, "demo_d_ff": 64, "demo_dropout": 0.1,
             "demo_max_len": 40}  # not the shipped demo settings, so that a budget change cannot alter this test
    p, _ = RGParams.read(with_params("rg/ctrg", **{**fixed, **params}), synthetic=True)
    torch.manual_seed(0)
    model = ReportModel(visual_dim, n_visual, vocab, p).eval()  # untrained: inputs finish at different steps
    with torch.no_grad():
        memory = model.encode(torch.randn(5, n_visual, visual_dim))
    return model, memory


def _plain_step(model, memory):
    def step(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return model.decode(memory[rows], prefix)[:, -1].log_softmax(-1)
    return step


@pytest.mark.parametrize("beam_size,length_penalty", [(1, 0.0), (3, 0.0), (3, 1.0), (4, 1.0)])
def test_incremental_step_equals_decoding_the_whole_prefix_through_a_beam_search(beam_size, length_penalty):
    """IncrementalStep's log-probs equal model.decode(memory[rows], prefix)[:, -1].log_softmax(-1) at every
    step of a beam search (beams reordered, finished inputs padded with EOS), and the decoded reports agree."""
    from asap_bench.tasks.report_generation import IncrementalStep

    for layers in (1, 2):
        model, memory = _small_model(demo_decoder_layers=layers)
        plain = _plain_step(model, memory)
        eos = model.out.bias[Vocabulary.EOS].item()
        for shift in np.linspace(-6.0, 4.0, 101):  # an EOS bias at which the inputs finish at different lengths
            with torch.no_grad():
                model.out.bias[Vocabulary.EOS] = eos + shift
                lengths = {len(s) for s in beam_decode(plain, len(memory), Vocabulary.BOS, Vocabulary.EOS, 24,
                                                       beam_size, "cpu", length_penalty)}
            if len(lengths) > 1:
                break
        assert len(lengths) > 1, lengths
        incremental = IncrementalStep(model, memory)
        worst, calls, reused = [0.0], [0], [0]

        def checked(prefix, rows):
            calls[0] += 1
            reused[0] += incremental._previous_rows(prefix, rows.tolist()) is not None  # only the newest position
            got = incremental(prefix, rows)
            worst[0] = max(worst[0], float((got - plain(prefix, rows)).abs().max()))
            return got

        with torch.no_grad():
            want = beam_decode(plain, len(memory), Vocabulary.BOS, Vocabulary.EOS, 24, beam_size, "cpu", length_penalty)
            got = beam_decode(checked, len(memory), Vocabulary.BOS, Vocabulary.EOS, 24, beam_size, "cpu",
                              length_penalty)
        assert calls[0] > 3 and reused[0] == calls[0] - 1  # every call after the first extends the previous one
        assert worst[0] < 1e-5, worst[0]
        assert got == want


def test_incremental_step_follows_reordered_dropped_and_unrelated_rows():
    """Rows reordered, duplicated or dropped between calls reuse the kept layer inputs; a prefix the previous
    call did not hold (or one on another memory row) is decoded in full; all equal the plain computation."""
    from asap_bench.tasks.report_generation import IncrementalStep

    model, memory = _small_model(demo_decoder_layers=2)
    plain = _plain_step(model, memory)
    step = IncrementalStep(model, memory)
    g = torch.Generator().manual_seed(0)
    prefix = torch.cat([torch.full((6, 1), Vocabulary.BOS), torch.randint(4, 14, (6, 2), generator=g)], dim=1)
    rows = torch.tensor([0, 0, 1, 2, 3, 4])
    worst = 0.0
    with torch.no_grad():
        for k, order in enumerate(([0, 1, 2, 3, 4, 5], [5, 3, 3, 0, 2, 1], [2, 0, 1], [1, 1, 0, 2], [3, 0])):
            order = torch.tensor(order)
            # a PAD among the new tokens too: it is masked as a key, as in model.decode
            prefix = torch.cat([prefix[order], torch.randint(0, 14, (len(order), 1), generator=g)], dim=1)
            rows = rows[order]
            assert (step._previous_rows(prefix, rows.tolist()) is not None) == (k > 0)
            worst = max(worst, float((step(prefix, rows) - plain(prefix, rows)).abs().max()))
        assert worst < 1e-5, worst
        # the same tokens on another memory row: layer inputs past the first differ, so it is decoded in full
        moved = (rows + 1) % len(memory)
        longer = torch.cat([prefix, torch.full((len(prefix), 1), 5)], dim=1)
        assert step._previous_rows(longer, moved.tolist()) is None
        assert float((step(longer, moved) - plain(longer, moved)).abs().max()) < 1e-5
        # a prefix that does not extend the previous call's (other tokens) is decoded in full
        other = torch.randint(4, 14, (3, longer.shape[1] + 1), generator=g)
        other[:, 0] = Vocabulary.BOS
        assert step._previous_rows(other, [0, 1, 2]) is None
        assert float((step(other, torch.arange(3)) - plain(other, torch.arange(3))).abs().max()) < 1e-5
