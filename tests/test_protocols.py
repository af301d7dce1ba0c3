"""The shipped protocol suite, its schema errors, fingerprints, and the protocols CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.protocol import FAMILIES, INHERITED, Protocol, load_protocol_file, select_protocols, shipped_protocols
from asap_bench.resources import resource_dir
from asap_bench.schema import SchemaError

PAPER_TASKS = {
    "cls": {"ct-rate": [0.01, 0.1, 1.0], "stoic": [0.01, 0.1, 1.0], "rad-chestct": [0.1, 1.0],
            "luna16": [0.1, 1.0], "inspect-pe": [0.1, 1.0], "cc-ccii": [0.01, 0.1, 1.0]},
    "seg": {"luna16-lung": [0.01, 0.1, 1.0], "msd-lung": [0.1, 1.0], "covid19-20": [0.1, 1.0],
            "segthor": [0.1, 1.0], "fumpe": [1.0], "btcv": [1.0], "acdc": [1.0]},
    "prog": {"inspect-mortality": [0.01, 0.1, 1.0], "stoic-severity": [0.01, 0.1, 1.0]},
    "rg": {"ctrg": [1.0], "ct-rate": [1.0]},
    "voc": {"ct-rate": [1.0], "ahph": [1.0]},
    "ret": {"ct-rate": [1.0], "ahph": [1.0]},
    "vqa": {"radgenome": [1.0]},
    "ext": {"ct-rate-ahph": [0.01, 0.1, 1.0], "inspect-rspect": [0.1, 1.0], "msd-rider": [0.1, 1.0],
            "luna16-c19": [0.01, 0.1, 1.0], "covid1920-c19": [0.1, 1.0]},
}


def test_all_27_protocols_validate_with_the_paper_regimes():
    protocols = shipped_protocols()
    expected = {f"{family}/{name}": regimes for family, tasks in PAPER_TASKS.items() for name, regimes in tasks.items()}
    assert set(protocols) == set(expected)
    assert len(protocols) == 27
    for pid, protocol in protocols.items():
        assert protocol.regimes == expected[pid], pid
        assert protocol.seeds == 5
        assert protocol.primary_metric in protocol.metrics


def test_cli_list_and_validate_pass():
    runner = CliRunner()
    listed = runner.invoke(main, ["protocols", "list"])
    assert listed.exit_code == 0, listed.output
    assert "27 protocols" in listed.output
    valid = runner.invoke(main, ["protocols", "validate"])
    assert valid.exit_code == 0, valid.output
    assert "27 valid, 0 invalid" in valid.output


def test_show_prints_resolved_defaults_and_fingerprint():
    result = CliRunner().invoke(main, ["protocols", "show", "cls/stoic"])
    assert result.exit_code == 0, result.output
    protocol = shipped_protocols()["cls/stoic"]
    assert protocol.fingerprint in result.output
    shown = yaml.safe_load(result.output)
    assert shown["preprocessing"]["orientation"] == "RAS"  # a default, resolved
    typo = CliRunner().invoke(main, ["protocols", "show", "cls/stoik"])
    assert typo.exit_code != 0 and "did you mean cls/stoic" in typo.output


def _write(tmp_path: Path, change, family="cls", name="ct-rate") -> Path:
    data = yaml.safe_load((resource_dir("protocols") / "cls" / "ct-rate.yaml").read_text())
    change(data)
    path = tmp_path / family / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


BROKEN = {
    "unknown field": (lambda d: d.update(learning_rate=0.1), "learning_rate", "unknown field"),
    "wrong type": (lambda d: d.update(seeds="five"), "seeds", "integer"),
    "unknown family": (lambda d: d.update(family="detection"), "family", "'cls', 'seg'"),
    "ratio above 1": (lambda d: d.update(regimes=[0.1, 1.5]), "regimes", "(0, 1]"),
    "ratio zero": (lambda d: d.update(regimes=[0.0, 1.0]), "regimes", "(0, 1]"),
    "missing metric": (lambda d: d.pop("metrics"), "metrics", "Field required"),
    "primary not listed": (lambda d: d.update(primary_metric="dice"), "<root>", "primary_metric 'dice'"),
    "unknown metric": (lambda d: d.update(metrics=["auc", "aucc"]), "<root>", "unknown metric"),
    "nested unknown field": (lambda d: d["split"].update(val_fractoin=0.2), "split.val_fractoin", "unknown field"),
    "bad window": (lambda d: d["preprocessing"].update(hu_window=[1000, -1000]), "preprocessing", "low < high"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_yaml_names_file_and_field(tmp_path, case):
    change, field, expected = BROKEN[case]
    path = _write(tmp_path, change)
    with pytest.raises(SchemaError) as info:
        load_protocol_file(path)
    message = str(info.value)
    assert str(path) in message and f"field '{field}" in message and expected in message, message

    result = CliRunner().invoke(main, ["protocols", "validate", str(path)])
    assert result.exit_code == 1
    assert str(path) in result.output and field in result.output and "0 valid, 1 invalid" in result.output


def test_syntax_error_and_cross_file_errors_are_named(tmp_path):
    bad = tmp_path / "cls" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("id: cls/bad\nfamily: [cls\n")
    result = CliRunner().invoke(main, ["protocols", "validate", str(bad)])
    assert result.exit_code == 1 and str(bad) in result.output and "line" in result.output

    wrong_target = _write(tmp_path, lambda d: d["data"].update(target="abnormalities"), name="ct-rate")
    result = CliRunner().invoke(main, ["protocols", "validate", str(wrong_target)])
    assert result.exit_code == 1 and "data.target" in result.output and "'abnormality'" in result.output

    moved = _write(tmp_path, lambda d: None, family="seg", name="elsewhere")
    result = CliRunner().invoke(main, ["protocols", "validate", str(moved)])
    assert result.exit_code == 1 and "must match the file location" in result.output


def test_valid_folder_passes(tmp_path):
    path = _write(tmp_path, lambda d: d.update(version=2))
    result = CliRunner().invoke(main, ["protocols", "validate", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert str(path) in result.output


def test_fingerprint_is_a_hash_of_the_resolved_config():
    protocol = shipped_protocols()["cls/ct-rate"]
    data = protocol.model_dump()
    same = Protocol.model_validate(data)
    assert same.fingerprint == protocol.fingerprint
    # writing a default out explicitly does not change the identity
    explicit = dict(data, seeds=5)
    assert Protocol.model_validate(explicit).fingerprint == protocol.fingerprint
    changed = dict(data, head={**data["head"], "params": {**data["head"]["params"], "max_iter": 99}})
    assert Protocol.model_validate(changed).fingerprint != protocol.fingerprint


def test_ext_protocols_inherit_from_their_source():
    protocols = shipped_protocols()
    assert {p.family for p in protocols.values()} == set(FAMILIES)
    for protocol in protocols.values():
        if protocol.family == "ext":
            source = protocols[protocol.transfer.source]
            for field in INHERITED:
                assert getattr(protocol, field) == getattr(source, field), (protocol.id, field)
            assert protocol.split_owner == source.id


def test_ext_protocol_must_not_restate_inherited_fields(tmp_path):
    data = yaml.safe_load((resource_dir("protocols") / "ext" / "msd-rider.yaml").read_text())
    data["split"] = {"source": "none"}
    path = tmp_path / "ext" / "msd-rider.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["protocols", "validate", str(path)])
    assert result.exit_code == 1 and "field 'split': inherited from transfer.source" in result.output
    data.pop("split")
    data["transfer"]["source"] = "seg/msd-lungs"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["protocols", "validate", str(path)])
    assert result.exit_code == 1 and "'seg/msd-lungs' is not a defined cls or seg protocol" in result.output


def test_task_selectors():
    ids = lambda *specs: [p.id for p in select_protocols(specs)]
    assert len(ids("all")) == 27
    assert ids("prog") == ["prog/inspect-mortality", "prog/stoic-severity"]
    assert ids("seg/*") == sorted(p for p in shipped_protocols() if p.startswith("seg/"))
    assert ids("cls/ct-rate,rg/ctrg") == ["cls/ct-rate", "rg/ctrg"]
    with pytest.raises(KeyError, match="did you mean"):
        select_protocols(["cls/ct-rat"])
