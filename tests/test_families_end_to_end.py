"""Classification and prognosis through the runner on the demo cohort; every record recomputes from its units."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.results.record import read_record, read_units
from asap_bench.results.recompute import recompute


def test_cls_and_prog_records_recompute_from_units(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, ["run", "--encoder", "random", "--task", "cls/*,prog/*,ext/inspect-rspect",
                                       "--seeds", "1", "--data-root", str(demo_root), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    paths = [p for p in out.rglob("r*_s*.json") if not p.name.endswith(".units.json")]
    assert len(paths) == 15 + 6 + 2
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
    severity = json.loads((out / "random" / "prog__stoic-severity" / "r1.0_s0.json").read_text())
    assert severity["sizes"]["test"] < 40  # the COVID-positive subset only
