"""cls and prog through the runner on the demo cohort at every regime; every record recomputes from its units.

Segmentation and its external validations run here too (at the shipped demo budget); the
frozen-feature vision-language families run end to end in tests/test_demo_discriminates.py,
which also checks that they tell a good encoder from a bad one.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.results.record import read_record, read_units
from asap_bench.results.recompute import recompute


def _run(root, out, tasks: str, *extra: str) -> list:
    result = CliRunner().invoke(main, ["run", "--encoder", "random", "--task", tasks, "--seeds", "1", "--data-root",
                                       str(root), "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return [p for p in out.rglob("r*_s*.json") if not p.name.endswith(".units.json")]


def _recomputes(paths) -> None:
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


def test_cls_and_prog_records_recompute_from_units(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    paths = _run(demo_root, out, "cls/*,prog/*,ext/inspect-rspect")
    assert len(paths) == 15 + 6 + 2
    _recomputes(paths)
    severity = json.loads((out / "random" / "prog__stoic-severity" / "r1.0_s0.json").read_text())
    stoic = json.loads((out / "random" / "cls__stoic" / "r1.0_s0.json").read_text())
    assert severity["sizes"]["test"] < 0.75 * stoic["sizes"]["test"]  # the COVID-positive subset only


def test_segmentation_and_its_external_validations_run_and_recompute(demo_root, tmp_path, monkeypatch):
    """seg with its external validations, one seed, full training data: one fit per (protocol, seed)."""
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    paths = _run(demo_root, out, "seg/*,ext/msd-rider,ext/luna16-c19,ext/covid1920-c19", "--ratios", "1")
    assert len(paths) == 7 + 3
    _recomputes(paths)
    records = {r.protocol: r for r in map(read_record, paths)}
    sources = {"ext/msd-rider": "seg/msd-lung", "ext/luna16-c19": "seg/luna16-lung",
               "ext/covid1920-c19": "seg/covid19-20"}
    for ext, source in sources.items():  # one trains, the other reuses that very model
        assert ("fit" in records[ext].notes) != ("fit" in records[source].notes), (ext, source)
        assert records[ext].selected == records[source].selected
    assert sum("fit" in r.notes for r in records.values()) == 3
