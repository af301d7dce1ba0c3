"""End to end through the CLI on the demo cohort: build, default data root, split files."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.data import demo
from asap_bench.data.manifest import load_manifest
from asap_bench.data.roots import resolve_data_root
from asap_bench.protocol import shipped_protocols


def test_demo_build_reports_every_table(demo_root):
    result = CliRunner().invoke(main, ["demo", "build", "--out", str(demo_root)])
    assert result.exit_code == 0, result.output
    marker = json.loads((demo_root / "demo.json").read_text())
    assert len(marker["datasets"]) == 18 and marker["synthetic"] is True
    for dataset in marker["datasets"]:
        assert dataset in result.output


def test_every_protocol_has_demo_data_and_it_is_marked_synthetic(demo_root):
    for protocol in shipped_protocols().values():
        refs = [protocol.data] + ([protocol.transfer.target] if protocol.transfer else [])
        for ref in refs:
            manifest = load_manifest(demo_root, ref.dataset, ref.table)
            assert len(manifest) > 0 and manifest.synthetic, (protocol.id, ref.dataset)


def test_no_data_root_means_the_demo_cohort(demo_root, tmp_path, monkeypatch):
    monkeypatch.delenv("ASAP_BENCH_DATA", raising=False)
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path))
    (tmp_path / f"demo-v{demo.GENERATOR_VERSION}").symlink_to(demo_root)  # reuse the session build
    assert resolve_data_root(None).resolve() == demo_root.resolve()
    monkeypatch.setenv("ASAP_BENCH_DATA", str(tmp_path / "missing"))
    result = CliRunner().invoke(main, ["splits", "make", "cls/stoic"])
    assert result.exit_code == 1 and "missing does not exist" in result.output


def test_splits_make_all_then_reuse_and_isolate_failures(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data, symlinks=True)
    splits = tmp_path / "splits"
    runner = CliRunner()
    args = ["splits", "make", "all", "--data-root", str(data), "--splits-dir", str(splits), "--seeds", "2"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    owners = {p.split_owner for p in shipped_protocols().values()}
    assert len(list(splits.rglob("seed*.json"))) == 2 * len(owners)
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and again.output == first.output

    # one broken manifest fails its own tasks only, and the command says so
    csv = data / "stoic" / "volumes.csv"
    csv.write_text(csv.read_text().replace(",1,", ",7,", 1))
    broken = runner.invoke(main, args)
    assert broken.exit_code == 1
    assert "stoic/volumes.csv" in broken.output and "FAILED" in broken.output
    assert "cls/ct-rate" in broken.output and "2 task(s) failed" in broken.output
