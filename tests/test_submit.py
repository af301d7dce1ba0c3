"""`asap-bench submit`, and the worked example of docs/submitting.md run line by line as written."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from asap_bench.cli import main
from asap_bench.data.manifest import file_sha256
from asap_bench.encoders import registry
from asap_bench.protocol import shipped_protocols

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "submitting.md"
PLUGIN = REPO / "examples" / "tiny_vit_plugin"
MARKER = "<!-- worked-example"


@pytest.fixture(autouse=True)
def registered_cards():
    """Cards a test registers (submit registers its card file) do not outlive the test."""
    before = dict(registry._REGISTERED)
    yield
    registry._REGISTERED.clear()
    registry._REGISTERED.update(before)


@pytest.fixture
def env(demo_root, tmp_path, tmp_path_factory, monkeypatch):
    """The demo cohort as the data, a cache shared with test_leaderboard, and an empty working folder."""
    monkeypatch.setenv("ASAP_BENCH_DATA", str(demo_root))
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "submission-cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def worked_example() -> list[str]:
    """The command lines of the guide's worked example (the bash block after the marker)."""
    text = DOC.read_text(encoding="utf-8")
    assert MARKER in text, f"{DOC} lost its worked-example marker"
    block = text.split(MARKER, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def _pip_install(package: Path, target: Path) -> None:
    """Install as `pip install` would, into a folder put on sys.path (CI installs asap-bench non-editable)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(package)], check=True, capture_output=True)


@pytest.fixture
def installs(tmp_path):
    """Run `pip install` lines into a private site folder; undone afterwards."""
    site = tmp_path / "site"
    yield site
    if str(site) in sys.path:
        sys.path.remove(str(site))
    for name in [m for m in sys.modules if m == "tiny_vit_plugin" or m.startswith("tiny_vit_plugin.")]:
        del sys.modules[name]
    registry.plugins.cache_clear()


def _run_line(line: str, site: Path) -> str:
    words = shlex.split(line)
    words = [str(REPO / w) if w.startswith("examples/") else w for w in words]
    if words[:2] == ["pip", "install"]:
        _pip_install(Path(words[2]), site)
        sys.path.insert(0, str(site))
        registry.plugins.cache_clear()
        return ""
    if words[:3] == ["python", "-m", "tiny_vit_plugin.export"]:
        from tiny_vit_plugin.export import main as export

        export(words[3:])
        return ""
    assert words[0] == "asap-bench", f"the worked example has a line the test cannot run: {line!r}"
    result = CliRunner().invoke(main, words[1:])
    assert result.exit_code == 0, f"{line}\n{result.output}"
    return result.output


def test_worked_example_runs_end_to_end(env, installs):
    lines = worked_example()
    outputs = {line: _run_line(line, installs) for line in lines}
    assert len(outputs) == len(lines) == 9

    smoke = next(o for line, o in outputs.items() if "--smoke" in line)
    assert "card: tiny-vit (family tiny_vit" in smoke and "from tiny-vit-plugin 0.1.0" in smoke
    assert "loaded 30 tensors, 100.0% of the module's state" in smoke and "ignored (1): decoder.weight" in smoke
    assert "smoke forward (demo): input [2, 1, 32, 32, 16] -> global [2, 64]" in smoke and "grid [2, 2, 2]" in smoke
    assert "cls/stoic" in smoke and "smoke bundle" in smoke

    info = json.loads((env / "bundles" / "tiny-vit" / "bundle.json").read_text())
    assert info["plugin"]["distribution"] == "tiny-vit-plugin" and info["variant"] == "demo" and info["synthetic"]
    assert info["checkpoint"]["sha256"] == file_sha256(env / "tiny-vit.safetensors")
    assert info["checkpoint"]["fraction"] == 1.0 and info["checkpoint"]["ignored"] == 1
    assert info["seeds"] == [0, 1] and info["jobs"] == {"ok": 6, "failed": 0, "skipped": 0}
    assert info["protocols"]["cls/stoic"]["fingerprint"] == shipped_protocols()["cls/stoic"].fingerprint
    assert info["protocols"]["cls/stoic"]["status"] == "ran" and set(info["data"]) == {"stoic/volumes"}
    manifest = json.loads((env / "bundles" / "tiny-vit" / "manifest.json").read_text())
    assert manifest["bundle_schema_version"] == 1 and "card.yaml" in manifest["files"]
    assert "records/tiny-vit/cls__stoic/r0.01_s1.units.json" in manifest["files"]

    board = env / "results" / "leaderboard" / "demo"
    assert (board / "records" / "tiny-vit" / "cls__stoic" / "r1.0_s1.json").is_file()
    assert (board / "entries" / "tiny-vit" / "card.yaml").is_file()
    added = next(o for line, o in outputs.items() if line.endswith("add bundles/tiny-vit"))
    assert "6 record(s) recomputed from their units" in added and "added tiny-vit" in added

    show = outputs["asap-bench leaderboard show"]
    ranking = show.split("\n\n")[1].splitlines()
    assert ranking[0].split() == ["rank", "encoder", "mean_rank", "settings", "best", "best_sig", "behind_sig"]
    assert {row.split()[1] for row in ranking[2:]} == {"tiny-vit", "random"}
    assert all(row.split()[3] == "3" for row in ranking[2:])  # stoic's 3 regimes
    assert "Holm over 6 tests" in show and "| TinyViT |" in show and "| Random init |" in show

    report = outputs[lines[-1]]
    assert "TinyViT" in report and "Random init" in report and "over 2 seeds" in report

    refused = CliRunner().invoke(main, ["leaderboard", "add", "bundles/tiny-vit-smoke"])
    assert refused.exit_code == 1 and "bundle.json: field 'smoke': true" in refused.output


def _card(tmp_path: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((REPO / "baselines" / "random.yaml").read_text())
    data.update(name=name, **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_bad_cards_are_refused_before_anything_runs(env, tmp_path):
    typo = _card(tmp_path, "my-encoder", embed_dims=768)
    result = CliRunner().invoke(main, ["submit", str(typo), "--smoke"])
    assert result.exit_code == 1 and "my-encoder.yaml" in result.output
    assert "field 'embed_dims': unknown field" in result.output

    family = _card(tmp_path, "my-other", family="vit3e")
    result = CliRunner().invoke(main, ["submit", str(family), "--smoke"])
    assert result.exit_code == 1 and "unknown architecture family 'vit3e'; did you mean vit3d" in result.output

    taken = _card(tmp_path, "asap")
    result = CliRunner().invoke(main, ["submit", str(taken), "--smoke"])
    assert result.exit_code == 1 and "'asap': the name is a built-in encoder's" in result.output
    assert not (env / "bundles").exists()


def test_checkpoint_coverage_is_printed_and_enforced(env, tmp_path):
    card = _card(tmp_path, "my-vit", group="ssl", title="My ViT",
                 checkpoint={"availability": "public", "source": ["my-vit.safetensors"], "format": "safetensors"})
    encoder = registry.build_encoder(registry.register_card(card), "demo")
    state = {k: v.contiguous() for k, v in encoder.state_dict().items() if not k.startswith("blocks.1.")}
    save_file(state, str(tmp_path / "partial.safetensors"))
    result = CliRunner().invoke(main, ["submit", str(card), "--checkpoint", str(tmp_path / "partial.safetensors"),
                                       "--variant", "demo", "--smoke"])
    assert result.exit_code == 1, result.output
    assert "partial.safetensors: only" in result.output and "of my-vit's weights were loaded" in result.output
    assert "blocks.1." in result.output
    assert not (env / "bundles" / "my-vit-smoke" / "records").exists()  # nothing ran


def test_register_card_makes_a_card_file_a_name_for_this_process(tmp_path):
    card = registry.register_card(_card(tmp_path, "my-registered"))
    assert registry.get_card("my-registered") == card and "my-registered" in registry.all_encoder_names()
    registry.forget_card("my-registered")
    with pytest.raises(KeyError, match="unknown encoder 'my-registered'"):
        registry.get_card("my-registered")
    assert registry.register_card(REPO / "baselines" / "random.yaml") == registry.get_card("random")
