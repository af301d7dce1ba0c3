"""Every family through the runner on the demo cohort; every record recomputes from its units."""

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
    assert severity["sizes"]["test"] < 40  # the COVID-positive subset only


def test_segmentation_and_vision_language_families_run_and_recompute(demo_root, tmp_path, monkeypatch):
    """seg (with its external validations), rg, vqa, voc and ret: one seed, full training data."""
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    tasks = "seg/*,ext/msd-rider,ext/luna16-c19,ext/covid1920-c19,rg/*,vqa/*,voc/*,ret/*"
    paths = _run(demo_root, out, tasks, "--ratios", "1")
    assert len(paths) == 7 + 3 + 2 + 1 + 2 + 2
    _recomputes(paths)
    families = {read_record(p).family for p in paths}
    assert families == {"seg", "ext", "rg", "vqa", "voc", "ret"}
    for path in paths:
        record = read_record(path)
        if record.family in ("rg", "vqa", "voc", "ret"):
            assert record.provenance.text_model and len(record.provenance.text_model_sha256 or "") == 64, path
