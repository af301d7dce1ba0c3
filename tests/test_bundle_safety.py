"""`asap-bench leaderboard add` against bundles made by an attacker: links, special files, stolen names, forgeries."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from asap_bench.cli import main
from asap_bench.encoders import registry
from asap_bench.results.recompute import recompute
from asap_bench.schema import content_hash
from asap_bench.submit import bundle as bundle_module
from asap_bench.submit.bundle import write_manifest

REPO = Path(__file__).resolve().parents[1]
NAME = "probe-vit"
SLUG = "cls__stoic"


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(demo_root, tmp_path_factory):
    """An honest bundle of a card with its own checkpoint (demo size): cls/stoic, one seed, demo cohort."""
    folder = tmp_path_factory.mktemp("safety")
    card = yaml.safe_load((REPO / "baselines" / "random.yaml").read_text())
    card.update(name=NAME, table_label="Probe ViT", group="ssl", title="Probe ViT",
                checkpoint={"availability": "public", "source": [f"{NAME}.safetensors"], "format": "safetensors"})
    card_path = folder / f"{NAME}.yaml"
    card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    before = dict(registry._REGISTERED)
    checkpoint = folder / f"{NAME}.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ASAP_BENCH_DATA", str(demo_root))
        patch.setenv("ASAP_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "submission-cache"))
        encoder = registry.build_encoder(registry.register_card(card_path), "demo")
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(checkpoint))
        result = _invoke("submit", card_path, "--checkpoint", checkpoint, "--variant", "demo", "--task", "cls/stoic",
                         "--seeds", 1, "--out", folder / NAME, "--quiet")
        assert result.exit_code == 0, result.output
    registry._REGISTERED.clear()
    registry._REGISTERED.update(before)
    return {"bundle": folder / NAME, "checkpoint": checkpoint}


@pytest.fixture
def env(demo_root, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ASAP_BENCH_DATA", str(demo_root))
    monkeypatch.setenv("ASAP_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "submission-cache"))
    before = dict(registry._REGISTERED)
    yield
    registry._REGISTERED.clear()
    registry._REGISTERED.update(before)


@pytest.fixture
def bundle(made, tmp_path, env) -> Path:
    """A private copy of the honest bundle, to tamper with."""
    return Path(shutil.copytree(made["bundle"], tmp_path / "bundle" / NAME))


def _tree(root: Path) -> dict[str, bytes | str]:
    """Everything under ``root`` (links as their target), to show nothing changed."""
    out: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root) if root.exists() else []:
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            out[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else (path.read_bytes() if path.is_file() else "")
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _list(bundle: Path, *names: str) -> None:
    """List files in the manifest with the hash of what they point at, as a forger would."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"].update({name: _sha(bundle / name) for name in names})
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _records(bundle: Path, encoder: str = NAME) -> Path:
    return bundle / "records" / encoder / SLUG


def _refused(result, path: Path, reason: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line.strip() for line in result.output.splitlines() if line.strip().startswith(f"{path}: ")]
    assert lines, f"no line names {path}:\n{result.output}"
    assert any(reason in line for line in lines), result.output
    return lines[0]


# --------------------------------------------------------------------------- links, special files, sizes

def _plant_file_link(bundle: Path, outside: Path) -> Path:
    (outside / "secret.txt").write_text("the board must never hold this")
    link = _records(bundle) / "notes.txt"
    link.symlink_to(outside / "secret.txt")
    _list(bundle, "records/probe-vit/cls__stoic/notes.txt")
    return link


def _plant_folder_link(bundle: Path, outside: Path) -> Path:
    (outside / "loot").mkdir()
    (outside / "loot" / "r0.1_s0.json").write_text((_records(bundle) / "r0.1_s0.json").read_text())
    (outside / "loot" / "secret.txt").write_text("the board must never hold this")
    link = bundle / "records" / NAME / "loot"
    link.symlink_to(outside / "loot", target_is_directory=True)
    return link


def _plant_records_of_another(bundle: Path, outside: Path) -> Path:
    """The task folder swapped for a link to records elsewhere (another encoder's, identical bytes)."""
    other = outside / "records" / "asap" / SLUG
    shutil.copytree(_records(bundle), other)
    shutil.rmtree(_records(bundle))
    _records(bundle).symlink_to(other, target_is_directory=True)
    return _records(bundle)


def _plant_fifo(bundle: Path, outside: Path) -> Path:
    fifo = _records(bundle) / "pipe"
    os.mkfifo(fifo)
    return fifo


def _plant_unlisted(bundle: Path, outside: Path) -> Path:
    (bundle / "logs" / ".later").mkdir()
    path = bundle / "logs" / ".later" / "added.txt"
    path.write_text("added after sealing")
    return path


def _plant_oversized(bundle: Path, outside: Path) -> Path:
    path = bundle / "logs" / "huge.log"
    with open(path, "wb") as handle:
        handle.truncate(bundle_module.MAX_FILE_BYTES + 1)  # sparse: no disk used
    _list(bundle, "logs/huge.log")
    return path


def _plant_failed_rerun(bundle: Path, outside: Path) -> Path:
    """A failed rerun recorded beside an ok record: the job matrix has no place for it."""
    record = json.loads((_records(bundle) / "r1.0_s0.json").read_text())
    record.update(status="failed", error="RuntimeError: out of memory", metrics={})
    path = _records(bundle) / "r1.0_s0.failed.json"
    path.write_text(json.dumps(record))
    write_manifest(bundle)
    return path


def _plant_manifest_link(bundle: Path, outside: Path) -> Path:
    shutil.move(bundle / "manifest.json", outside / "manifest.json")
    (bundle / "manifest.json").symlink_to(outside / "manifest.json")
    return bundle / "manifest.json"


def _plant_info_link(bundle: Path, outside: Path) -> Path:
    shutil.move(bundle / "bundle.json", outside / "bundle.json")
    (bundle / "bundle.json").symlink_to(outside / "bundle.json")
    return bundle / "bundle.json"


@pytest.mark.parametrize("plant, reason", [
    (_plant_file_link, "a symbolic link"),
    (_plant_folder_link, "a symbolic link"),
    (_plant_records_of_another, "a symbolic link"),
    (_plant_fifo, "a FIFO"),
    (_plant_unlisted, "not listed in manifest.json"),
    (_plant_oversized, "bytes per file"),
    (_plant_failed_rerun, "not part of the bundle's job matrix"),
    (_plant_manifest_link, "a symbolic link"),
    (_plant_info_link, "a symbolic link"),
], ids=["file-link", "folder-link", "records-link", "fifo", "unlisted", "oversized", "failed-rerun", "manifest-link",
         "info-link"])
def test_links_special_unlisted_and_oversized_files_are_refused(bundle, tmp_path, plant, reason):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = plant(bundle, outside)
    root = tmp_path / "board"
    (root / "demo").mkdir(parents=True)
    (root / "demo" / "keep.txt").write_text("already here")
    board_before, outside_before = _tree(root), _tree(outside)

    result = _invoke("leaderboard", "add", bundle, "--root", root)
    line = _refused(result, path, reason)
    assert "\n" not in line and len(line) < 400
    assert _tree(root) == board_before and _tree(outside) == outside_before


def test_a_bundle_over_the_total_limit_is_refused(bundle, tmp_path, monkeypatch):
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    monkeypatch.setattr(bundle_module, "MAX_BUNDLE_BYTES", total - 1)
    result = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "board")
    assert result.exit_code == 1 and f"{bundle}: {total} bytes in all, over the limit of {total - 1}" in result.output
    assert not (tmp_path / "board").exists()


def test_write_manifest_never_follows_a_link(bundle, tmp_path):
    (tmp_path / "secret.txt").write_text("outside")
    (bundle / "logs" / "link.txt").symlink_to(tmp_path / "secret.txt")
    manifest = write_manifest(bundle)
    assert "logs/link.txt" not in manifest["files"] and "records/probe-vit/cls__stoic/r0.1_s0.json" in manifest["files"]


def test_an_encoder_name_that_is_not_a_folder_name_is_refused(bundle, tmp_path):
    info = json.loads((bundle / "bundle.json").read_text())
    info["encoder"] = "../../escaped"
    (bundle / "bundle.json").write_text(json.dumps(info))
    write_manifest(bundle)
    result = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "board")
    assert result.exit_code == 1 and f"{bundle / 'bundle.json'}: field 'encoder'" in result.output
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "board").exists()


# --------------------------------------------------------------------------- names and load reports

def _rename(bundle: Path, name: str) -> None:
    """Relabel a bundle, consistently, as another encoder's: card, bundle.json, records, seal."""
    card = yaml.safe_load((bundle / "card.yaml").read_text())
    card["name"] = name
    (bundle / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    from asap_bench.encoders.card import EncoderCard
    from asap_bench.schema import load_model

    info = json.loads((bundle / "bundle.json").read_text())
    (bundle / "records" / info["encoder"]).rename(bundle / "records" / name)
    info.update(encoder=name, card_sha256=_sha(bundle / "card.yaml"),
                card_fingerprint=content_hash(load_model(EncoderCard, bundle / "card.yaml").model_dump(mode="json")))
    (bundle / "bundle.json").write_text(json.dumps(info))
    for path in (bundle / "records" / name).rglob("r*_s?.json"):
        record = json.loads(path.read_text())
        record["encoder"] = record["provenance"]["encoder"] = name
        path.write_text(json.dumps(record))
    write_manifest(bundle)


def test_a_built_in_name_on_another_card_is_refused(bundle, tmp_path):
    _rename(bundle, "asap")  # a modified card claiming the ASAP row
    result = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "board")
    _refused(result, bundle / "card.yaml", "'asap' is a built-in encoder's name and this card differs from "
                                            "the shipped baselines/asap.yaml")
    assert not (tmp_path / "board").exists()

    _rename(bundle, "asap-probe")  # the same card under a name of its own is fine
    result = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "board")
    assert result.exit_code == 0, result.output


def _edit_report(field: str, value):
    def edit(bundle: Path) -> None:
        report = json.loads((bundle / "load_report.json").read_text())
        report[field] = value(report[field])
        (bundle / "load_report.json").write_text(json.dumps(report))
    return edit


def _drop_report(bundle: Path) -> None:
    (bundle / "load_report.json").unlink()


def _garble_report(bundle: Path) -> None:
    (bundle / "load_report.json").write_text('{"loaded": [')


@pytest.mark.parametrize("change, reason", [
    (_edit_report("missing", lambda keys: keys + ["blocks.0.attn.qkv.weight"]), "field 'missing': 1 key(s), but"),
    (_edit_report("loaded", lambda keys: keys[1:]), "field 'loaded':"),
    (_edit_report("fraction", lambda f: 0.5), "field 'fraction': 0.5, but"),
    (_edit_report("sha256", lambda s: "0" * 64), "field 'sha256':"),
    (_drop_report, "missing; bundle.json declares a checkpoint"),
    (_garble_report, "not valid JSON"),
], ids=["missing", "loaded", "fraction", "sha256", "absent", "garbled"])
def test_a_load_report_that_disagrees_with_bundle_json_is_refused(bundle, tmp_path, change, reason):
    change(bundle)
    write_manifest(bundle)
    result = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "board")
    _refused(result, bundle / "load_report.json", reason)


# --------------------------------------------------------------------------- forgeries and reruns

def _forge(bundle: Path) -> None:
    """Scores set to the labels, metrics recomputed from them, the manifest resealed: self-consistent."""
    for path in sorted(_records(bundle).glob("r*_s?.json")):
        record = json.loads(path.read_text())
        sidecar = path.with_name(record["units_file"])
        units = json.loads(sidecar.read_text())
        units["scores"] = units["labels"]
        sidecar.write_text(json.dumps(units, sort_keys=True))
        record["metrics"] = recompute(units, list(record["metrics"]))
        if "units_sha256" in record:
            record["units_sha256"] = _sha(sidecar)
        path.write_text(json.dumps(record, indent=1))
    write_manifest(bundle)


def test_a_resealed_forgery_passes_the_seal_but_not_a_rerun(bundle, made, tmp_path):
    _forge(bundle)
    sealed = _invoke("leaderboard", "add", bundle, "--root", tmp_path / "sealed")  # what the seal cannot prove
    assert sealed.exit_code == 0, sealed.output
    board = tmp_path / "sealed" / "demo" / "records" / NAME / SLUG
    assert json.loads((board / "r1.0_s0.json").read_text())["metrics"]["auc"] == 1.0

    root = tmp_path / "board"
    result = _invoke("leaderboard", "add", bundle, "--root", root, "--verify-rerun", 1, "--rerun-seed", 3,
                     "--checkpoint", made["checkpoint"])
    assert result.exit_code == 1, result.output
    assert "--rerun-seed 3" in result.output
    chosen = [line for line in result.output.splitlines() if line.startswith("  rerun: ")]
    assert len(chosen) == 1, result.output
    ratio = chosen[0].split()[3]  # "  rerun: probe-vit cls/stoic 0.1 seed 0"
    path = _records(bundle) / f"r{float(ratio)!r}_s0.json"
    line = _refused(result, path, "field 'metrics.auc': 1.0 in the bundle, but")
    assert "on rerun" in line
    assert not root.exists()


def test_an_honest_bundle_passes_a_rerun(bundle, made, tmp_path):
    root = tmp_path / "board"
    refused = _invoke("leaderboard", "add", bundle, "--root", root, "--verify-rerun", 1)
    _refused(refused, bundle / "bundle.json", "field 'checkpoint.sha256'")
    assert "--checkpoint" in refused.output
    other = tmp_path / "other.safetensors"
    other.write_bytes(made["checkpoint"].read_bytes()[:-1] + b" ")
    wrong = _invoke("leaderboard", "add", bundle, "--root", root, "--verify-rerun", 1, "--checkpoint", other)
    _refused(wrong, other, "sha256")
    assert not root.exists()

    result = _invoke("leaderboard", "add", bundle, "--root", root, "--verify-rerun", 1,
                     "--checkpoint", made["checkpoint"])
    assert result.exit_code == 0, result.output
    assert "rerun 1 of 3 job(s)" in result.output and "  rerun: probe-vit cls/stoic " in result.output
    assert "every metric matches" in result.output and f"added {NAME}" in result.output
