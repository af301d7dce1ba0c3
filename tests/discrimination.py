"""What the two demo-discrimination modules share: which protocols fine-tune, Holm over all 27, the verdict.

``test_demo_discriminates.py`` tests the 17 frozen-feature protocols (oracle against random)
and ``test_seg_floors_on_demo.py`` the 10 fine-tuning ones (trained against untrained). They
run apart (either can run alone, or on its own worker), so each adjusts its own p-values by
Holm over all 27 with the other module's protocols entered at p = 1: no p-value can be
adjusted below its value in the joint Holm procedure, so a pass in each module is a pass of
the joint test.
"""

from __future__ import annotations

import math

import pytest

from asap_bench import stats
from asap_bench.protocol import Protocol, shipped_protocols
from asap_bench.results.record import read_record, read_units
from asap_bench.results.recompute import recompute

SEEDS = [0]  # the CI seed count
ALPHA = 0.05
N_PROTOCOLS = 27


def trains_the_encoder(protocol: Protocol, protocols: dict[str, Protocol]) -> bool:
    """Segmentation and its transfers fine-tune the encoder: their floor is the untrained model."""
    if protocol.family == "ext":
        return protocols[protocol.transfer.source].family == "seg"
    return protocol.family == "seg"


def protocol_ids(fine_tuning: bool) -> list[str]:
    protocols = shipped_protocols()
    return sorted(pid for pid, p in protocols.items() if trains_the_encoder(p, protocols) == fine_tuning)


def holm_over_all(rows: list[dict]) -> None:
    """``p_holm`` on each row: Holm over the 27 protocols, those not in ``rows`` at p = 1."""
    assert len(shipped_protocols()) == N_PROTOCOLS
    rest = [1.0] * (N_PROTOCOLS - len(rows))
    for row, p_adj in zip(rows, stats.holm([r["p"] for r in rows] + rest)):
        row["p_holm"] = float(p_adj)


def separates(r: dict) -> bool:
    sign = 1 if r["higher_is_better"] else -1
    return math.isfinite(r["p_holm"]) and r["p_holm"] < ALPHA and sign * (r["good_mean"] - r["bad_mean"]) > 0


def line(r: dict) -> str:
    return (f"{r['protocol']} {r['metric']}: {r['good']} {r['good_mean']:.4f} vs {r['bad']} {r['bad_mean']:.4f}, "
            f"p {r['p']:.3g} (Holm {r['p_holm']:.3g}) by {r['test']}")


def show(rows: list[dict], seconds: dict[str, float]) -> None:
    print(f"\n{'protocol':24s} {'metric':14s} {'good':>8s} {'bad':>8s} {'unit':18s} {'n':>4s} {'p':>9s} {'Holm':>9s}")
    for r in rows:
        print(f"{r['protocol']:24s} {r['metric']:14s} {r['good_mean']:8.4f} {r['bad_mean']:8.4f} {r['unit']:18s} "
              f"{r['n']:4d} {r['p']:9.2e} {r['p_holm']:9.2e}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


def records_recompute(paths) -> list:
    """Every record is ok and each metric recomputes from its units; returns the records."""
    records = []
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
        records.append(record)
    return records


def record_paths(folder) -> list:
    return [p for p in folder.rglob("r*_s*.json")
            if not p.name.endswith(".units.json") and not p.name.endswith(".failed.json")]
