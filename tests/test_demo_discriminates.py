"""The demo cohort tells a good encoder from a bad one on every frozen-feature protocol.

This is the end-to-end proof that each family is wired right: a shuffled label, a report
paired with the wrong volume or tokens that never reach the head would leave the two
sides equal. The 17 protocols that score frozen features (cls, prog, voc, ret, rg, vqa and
the cls-type transfers) compare the test-only ``oracle`` encoder (tests/oracle_encoder.py),
whose features are made of what the generator drew, against ``random``.

Each protocol is tested by the harness's own paired test at the unit it uses for its demo
primary metric (``stats.compare`` with ``unit="auto"``: labels, cases or a paired bootstrap
over cases), Holm's correction over all 27 protocols (the 10 that fine-tune count as
untested, p = 1, so no protocol gains from their absence), alpha 0.05, at the CI seed count
(one seed, full training data). Every record written on the way must recompute from its
units. The 10 protocols that fine-tune UNETR (seg and its transfers) have training itself
as their floor, measured by benchmarks/seg_floor.py (see docs/demo.md).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import oracle_encoder
from asap_bench import stats
from asap_bench.cli import main
from asap_bench.protocol import Protocol, shipped_protocols
from asap_bench.results.record import read_record, read_units
from asap_bench.results.recompute import recompute
from asap_bench.results.store import load_records

SEEDS = [0]  # the CI seed count
ALPHA = 0.05
# Not yet separated at the demo budgets (docs/demo.md): each is expected to fail until it is,
# and a strict xfail turns into a failure the day it passes, so the list cannot go stale.
PENDING = {"rg/ct-rate": "the demo decoder writes the common report whatever the tokens",
           "rg/ctrg": "10 test reports",
           "vqa/radgenome": "the random-init demo language model does not learn to answer from the bridge"}


def trains_the_encoder(protocol: Protocol, protocols: dict[str, Protocol]) -> bool:
    """Segmentation and its transfers fine-tune the encoder: their floor is the untrained model."""
    if protocol.family == "ext":
        return protocols[protocol.transfer.source].family == "seg"
    return protocol.family == "seg"


@pytest.fixture(scope="module")
def discrimination(demo_root, tmp_path_factory):
    """Oracle and random through the CLI on every frozen-feature protocol, one seed, regime 1; the paired tests."""
    protocols = shipped_protocols()
    frozen = [p for p in protocols.values() if not trains_the_encoder(p, protocols)]
    trained = sorted(pid for pid, p in protocols.items() if trains_the_encoder(p, protocols))
    base = tmp_path_factory.mktemp("discriminates")
    out = base / "runs"
    rows, seconds = [], {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASAP_BENCH_CACHE", str(base / "cache"))
        start = time.perf_counter()
        oracle_encoder.install(demo_root, frozen, base / "cache")
        try:
            for encoder in ("oracle", "random"):
                t = time.perf_counter()
                result = CliRunner().invoke(main, [
                    "run", "--encoder", encoder, "--task", ",".join(p.id for p in frozen), "--ratios", "1",
                    "--seed-list", ",".join(map(str, SEEDS)), "--data-root", str(demo_root), "--out", str(out),
                    "--quiet"])
                assert result.exit_code == 0, result.output
                seconds[encoder] = time.perf_counter() - t
        finally:
            oracle_encoder.uninstall()
        frame = load_records(out)
        for p in sorted(frozen, key=lambda p: p.id):
            metric = p.primary(True)
            c = stats.compare(frame, "oracle", "random", protocol=p.id, regime=1.0, metric=metric)
            rows.append({"protocol": p.id, "metric": metric, "good": "oracle", "bad": "random",
                         "good_mean": _mean(frame, "oracle", p.id, metric),
                         "bad_mean": _mean(frame, "random", p.id, metric),
                         "higher_is_better": stats.higher_is_better(metric), "unit": c.unit, "n": c.n, "p": c.p,
                         "test": c.test})
        seconds["total"] = time.perf_counter() - start
    untested = [1.0] * len(trained)  # the fine-tuning protocols, tested elsewhere: Holm over all 27 regardless
    adjusted = stats.holm([r["p"] for r in rows] + untested)
    for row, p_adj in zip(rows, adjusted):
        row["p_holm"] = float(p_adj)
    _print(rows, seconds)
    return {"rows": rows, "out": out, "frozen": sorted(p.id for p in frozen), "seconds": seconds}


def _mean(frame, encoder: str, protocol: str, metric: str) -> float:
    rows = frame[(frame["encoder"] == encoder) & (frame["protocol"] == protocol) & (frame["metric"] == metric)]
    return float(rows["value"].mean())


def _print(rows: list[dict], seconds: dict[str, float]) -> None:
    print(f"\n{'protocol':24s} {'metric':14s} {'good':>8s} {'bad':>8s} {'unit':18s} {'n':>4s} {'p':>9s} {'Holm':>9s}")
    for r in rows:
        print(f"{r['protocol']:24s} {r['metric']:14s} {r['good_mean']:8.4f} {r['bad_mean']:8.4f} {r['unit']:18s} "
              f"{r['n']:4d} {r['p']:9.2e} {r['p_holm']:9.2e}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


def _separates(r: dict) -> bool:
    sign = 1 if r["higher_is_better"] else -1
    return math.isfinite(r["p_holm"]) and r["p_holm"] < ALPHA and sign * (r["good_mean"] - r["bad_mean"]) > 0


def _line(r: dict) -> str:
    return (f"{r['protocol']} {r['metric']}: {r['good']} {r['good_mean']:.4f} vs {r['bad']} {r['bad_mean']:.4f}, "
            f"p {r['p']:.3g} (Holm {r['p_holm']:.3g}) by {r['test']}")


def test_every_frozen_feature_protocol_tells_the_good_encoder_from_the_bad(discrimination):
    rows = discrimination["rows"]
    assert sorted(r["protocol"] for r in rows) == discrimination["frozen"] and len(rows) == 17
    assert set(PENDING) <= set(discrimination["frozen"])
    failures = [_line(r) for r in rows if r["protocol"] not in PENDING and not _separates(r)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("protocol", [pytest.param(pid, marks=pytest.mark.xfail(reason=why, strict=True))
                                      for pid, why in sorted(PENDING.items())])
def test_pending_protocols_separate(discrimination, protocol):
    row = next(r for r in discrimination["rows"] if r["protocol"] == protocol)
    assert _separates(row), f"pending ({PENDING[protocol]}): {_line(row)}"


def test_every_record_on_the_way_recomputes_from_its_units(discrimination):
    paths = [p for p in discrimination["out"].rglob("r*_s*.json")
             if not p.name.endswith(".units.json") and not p.name.endswith(".failed.json")]
    assert len(paths) == 2 * 17
    for path in paths:
        record = read_record(path)
        assert record.status == "ok", (path, record.error)
        units = read_units(path, record)
        again = recompute(units, list(record.metrics))
        for metric, value in record.metrics.items():
            if value is None:
                assert again[metric] is None and metric in record.notes, (path, metric)
            else:
                assert again[metric] == pytest.approx(value, abs=1e-12), (path, metric)
        if record.family in ("rg", "vqa", "voc", "ret"):
            assert record.provenance.text_model and len(record.provenance.text_model_sha256 or "") == 64, path


def test_the_oracle_refuses_data_that_is_not_the_demo_cohort(tmp_path):
    (tmp_path / "stoic").mkdir()
    with pytest.raises(ValueError, match="not the synthetic demo cohort"):
        oracle_encoder.install(tmp_path, [shipped_protocols()["cls/stoic"]], tmp_path / "cache")
    lookup = oracle_encoder.Lookup()
    with pytest.raises(LookupError, match="not a preprocessed volume of the synthetic demo cohort"):
        lookup.find(torch.from_numpy(np.zeros((1, 8, 8, 8), dtype=np.float32)))
