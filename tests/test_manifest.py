"""Dataset cards and manifests: every card loads; a bad manifest names file, column and rows."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from asap_bench.cli import main
from asap_bench.data.cards import DatasetCard, dataset_names, load_card
from asap_bench.data.manifest import ManifestError, label_matrix, load_manifest
from asap_bench.schema import SchemaError, parse_model

from conftest import ctrate_rows, write_table

EIGHTEEN = {"ct-rate", "rad-chestct", "stoic", "luna16", "inspect", "cc-ccii", "msd-lung", "covid19-20",
            "segthor", "fumpe", "btcv", "acdc", "ctrg", "radgenome", "ahph", "rspect", "rider", "covid19-ct-seg"}


def test_all_18_cards_load():
    assert set(dataset_names()) == EIGHTEEN
    for name in EIGHTEEN:
        card = load_card(name)
        assert card.name == name
        for table in card.tables.values():
            assert table.columns()[:3] == ["case_id", "patient_id", "image"]
    assert load_card("ct-rate").table("volumes").labels["abnormality"].n_outputs == 18
    assert load_card("ahph").access == "private"


def test_bad_card_names_field(tmp_path):
    data = load_card("stoic").model_dump(mode="json")
    data["tables"]["volumes"]["labels"]["covid"]["kind"] = "ordinal"
    with pytest.raises(SchemaError, match=r"tables\.volumes\.labels\.covid\.kind"):
        parse_model(DatasetCard, data, tmp_path / "stoic.yaml")
    data = load_card("btcv").model_dump(mode="json")
    data["tables"]["volumes"]["mask"] = {"0": "background", "1": "spleen"}
    with pytest.raises(SchemaError, match="0 is background"):
        parse_model(DatasetCard, data, tmp_path / "btcv.yaml")


def test_manifest_loads_and_hashes(ctrate_root):
    manifest = load_manifest(ctrate_root, "ct-rate")
    assert len(manifest) == len(manifest.frame) and manifest.sha256
    labels = label_matrix(manifest, "abnormality")
    assert labels.shape[1] == 18 and set(labels.stack().unique()) <= {0, 1}
    assert manifest.image_path(manifest.frame.index[0]).parent == ctrate_root / "ct-rate" / "images"
    assert not manifest.synthetic


@pytest.mark.parametrize("corrupt, expected", [
    (lambda rows: rows[3].update({"Cardiomegaly": 2}), "column 'Cardiomegaly' (label set 'abnormality'): expected values [0, 1]"),
    (lambda rows: rows[4].update({"case_id": rows[5]["case_id"]}), "column 'case_id': duplicated"),
    (lambda rows: rows[2].update({"split": "validation"}), "column 'split': not one of ['train', 'val', 'test']"),
    (lambda rows: rows[1].update({"patient_id": ""}), "column 'patient_id': empty in 1 row(s)"),
])
def test_bad_manifest_names_file_column_and_rows(tmp_path, corrupt, expected):
    rows = ctrate_rows(20)
    corrupt(rows)
    path = write_table(tmp_path, "ct-rate", "volumes", rows)
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path, "ct-rate")
    assert str(path) in str(info.value) and expected in str(info.value)


def test_missing_column_and_missing_file(tmp_path):
    path = write_table(tmp_path, "ct-rate", "volumes", ctrate_rows(5))
    path.write_text(path.read_text().replace("Emphysema", "Emphysem"))
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['Emphysema'\]"):
        load_manifest(tmp_path, "ct-rate")
    with pytest.raises(FileNotFoundError, match="inspect/volumes.csv"):
        load_manifest(tmp_path, "inspect")
    with pytest.raises(KeyError, match="has no table 'frames'"):
        load_manifest(tmp_path, "ct-rate", "frames")


def test_survival_columns_are_checked(tmp_path):
    rows = [{"case_id": f"PE{i:x}", "patient_id": f"p{i}", "image": "x", "split": "train", "pe": 0,
             "time": 10.0 * i, "event": i % 2, "mortality_1m": "", "mortality_6m": 1, "mortality_12m": 3 if i == 4 else 0}
            for i in range(8)]
    write_table(tmp_path, "inspect", "volumes", rows)
    with pytest.raises(ManifestError, match="column 'mortality_12m': expected 1, 0 or empty"):
        load_manifest(tmp_path, "inspect")


def test_datasets_cli():
    runner = CliRunner()
    listed = runner.invoke(main, ["datasets", "list"])
    assert listed.exit_code == 0 and "covid19-ct-seg" in listed.output
    shown = runner.invoke(main, ["datasets", "show", "inspect"])
    assert shown.exit_code == 0 and "mortality_12m" in shown.output
    missing = runner.invoke(main, ["datasets", "show", "inspct"])
    assert missing.exit_code == 1 and "unknown dataset 'inspct'" in missing.output
