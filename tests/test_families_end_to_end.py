"""cls and prog through the runner on the demo cohort at every regime; every record recomputes from its units.

The other families run end to end in tests/test_demo_discriminates.py (the frozen-feature
vision-language families, a good encoder against a bad one) and tests/test_seg_floors_on_demo.py
(segmentation and its external validations at the shipped demo budget, trained against untrained).
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from asap_bench.cli import main
from discrimination import records_recompute


def _run(root, out, tasks: str, *extra: str) -> list:
    result = CliRunner().invoke(main, ["run", "--encoder", "random", "--task", tasks, "--seeds", "1", "--data-root",
                                       str(root), "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return [p for p in out.rglob("r*_s*.json") if not p.name.endswith(".units.json")]


def test_cls_and_prog_records_recompute_from_units(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    paths = _run(demo_root, out, "cls/*,prog/*,ext/inspect-rspect")
    assert len(paths) == 15 + 6 + 2
    records_recompute(paths)
    severity = json.loads((out / "random" / "prog__stoic-severity" / "r1.0_s0.json").read_text())
    stoic = json.loads((out / "random" / "cls__stoic" / "r1.0_s0.json").read_text())
    assert severity["sizes"]["test"] < 0.75 * stoic["sizes"]["test"]  # the COVID-positive subset only

