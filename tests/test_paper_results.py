"""The quoted numbers of the ASAP paper (results/paper/): schema, completeness, and fidelity to the paper."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from asap_bench.encoders.card import encoder_names
from asap_bench.protocol import shipped_protocols
from asap_bench.results.paper import (ENV_VAR, TABLES, load_paper_table, load_paper_tables, paper_dir,
                                      paper_frame)
from asap_bench.schema import SchemaError

ALL_14 = {"random", "mae", "pcrlv2", "hi-end-mae", "m3ae", "mrm", "ct-clip", "m3d-clip", "merlin", "fvlm",
          "visd-boost", "hlip", "simcrop", "asap"}
NO_CNN = ALL_14 - {"merlin", "visd-boost"}
# table: (encoders, number of columns)
SHAPE = {
    "II": (ALL_14, 15),
    "III": (NO_CNN, 12),
    "IV": (ALL_14, 12),
    "V": (NO_CNN, 10),
    "VI": (NO_CNN, 6),
    "VII": ({"hi-end-mae", "ct-clip", "fvlm", "hlip", "simcrop", "asap"}, 12),
}

# Hand-copied from the paper text; the comment is the cell as the text extraction prints it.
SPOT = [
    # table, encoder, protocol, regime, metric, mean, std, dagger
    ("II", "asap", "cls/ct-rate", 0.01, "auc", 82.2, 0.1, True),        # 82.20.1{82.2_{0.1}^{\bm{\dagger}}}
    ("II", "hi-end-mae", "cls/luna16", 0.1, "auc", 67.0, 0.2, False),   # HEMAE 67.00.267.0_{0.2}
    ("II", "visd-boost", "cls/cc-ccii", 1.0, "acc", 91.0, 0.3, False),  # ViSDB 91.00.391.0_{0.3}
    ("II", "asap", "cls/inspect-pe", 1.0, "auc", 65.9, 0.3, False),     # 65.90.3{65.9_{0.3}} (no dagger)
    ("III", "random", "seg/msd-lung", 0.1, "dice", 25.6, 9.2, False),   # 25.69.225.6_{9.2}
    ("III", "asap", "seg/btcv", 1.0, "dice", 81.7, 0.1, False),         # 81.70.1{81.7_{0.1}}
    ("III", "m3d-clip", "seg/covid19-20", 0.1, "dice", 37.4, 0.9, False),  # M3D 37.40.937.4_{0.9}
    ("IV", "merlin", "prog/inspect-mortality", 0.01, "c_index", 73.0, 0.4, False),  # 73.00.473.0_{0.4}
    ("IV", "asap", "prog/inspect-mortality", 0.1, "auc_6m", 81.3, 0.0, True),   # 81.30.081.3_{0.0}^{\bm{\dagger}}
    ("IV", "m3ae", "prog/inspect-mortality", 1.0, "auc_12m", 75.6, 0.1, False),  # 75.60.175.6_{0.1}
    ("V", "mrm", "rg/ctrg", 1.0, "bleu1", 61.0, 0.5, False),            # 61.00.561.0_{0.5}
    ("V", "hlip", "rg/ct-rate", 1.0, "bertscore_f1", 75.9, 0.3, False), # 75.90.375.9_{0.3}
    ("V", "asap", "rg/ctrg", 1.0, "bertscore_f1", 79.5, 0.2, False),    # 79.50.279.5_{0.2} (no dagger)
    ("VI", "simcrop", "ret/ct-rate", 1.0, "recall@50_v2r", 35.1, 0.3, False),  # 35.10.335.1_{0.3}
    ("VI", "asap", "voc/ahph", 1.0, "auc", 69.2, 0.4, True),            # 69.20.469.2_{0.4}^{\bm{\dagger}}
    ("VI", "random", "ret/ahph", 1.0, "recall@50_r2v", 4.3, 0.3, False),  # 4.30.34.3_{0.3}
    ("VII", "asap", "ext/ct-rate-ahph", 0.01, "auc", 68.2, None, False),  # 68.268.2
    ("VII", "hlip", "ext/luna16-c19", 0.1, "dice", 81.4, None, False),    # 81.4
    ("VII", "ct-clip", "ext/msd-rider", 1.0, "dice", 31.7, None, False),  # 31.7
]


@pytest.fixture(scope="module")
def tables():
    return load_paper_tables()


@pytest.fixture(scope="module")
def by_key(tables):
    return {(t, e.encoder, e.protocol, e.regime, e.metric): e for t, table in tables.items() for e in table.entries}


def test_all_six_tables_load_from_the_checkout(tables):
    assert list(tables) == list(TABLES)
    for tag, table in tables.items():
        assert table.source == "paper" and table.unit == "percent"
        assert "quoted" in table.quoted.lower() and "not measured" in table.quoted
        assert all(e.source == "paper" and e.table == tag for e in table.entries)


@pytest.mark.parametrize("tag", TABLES)
def test_counts_and_full_grid_per_table(tables, tag):
    encoders, n_columns = SHAPE[tag]
    entries = tables[tag].entries
    assert {e.encoder for e in entries} == encoders
    settings = {(e.protocol, e.regime, e.metric) for e in entries}
    assert len(settings) == n_columns
    assert len(entries) == len(encoders) * n_columns  # e.g. Table II: 14 encoders x 15 columns = 210


def test_entries_name_real_encoders_protocols_metrics_and_regimes(tables):
    protocols = shipped_protocols()
    names = set(encoder_names())
    for table in tables.values():
        for e in table.entries:
            assert e.encoder in names
            protocol = protocols[e.protocol]
            assert e.metric in protocol.metrics, (e.protocol, e.metric)
            assert e.regime in protocol.regimes, (e.protocol, e.regime)
            assert protocol.reference.table == table.table, (e.protocol, protocol.reference.table, table.table)


@pytest.mark.parametrize("spot", SPOT, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}-{s[3]}-{s[4]}")
def test_spot_values_match_the_paper(by_key, spot):
    tag, encoder, protocol, regime, metric, mean, std, dagger = spot
    entry = by_key[(tag, encoder, protocol, regime, metric)]
    assert entry.mean == mean
    assert entry.std == std
    assert entry.dagger is dagger


def test_daggers_are_asaps_only_and_where_the_paper_puts_them(tables):
    expected = {"II": 13, "III": 8, "IV": 12, "V": 4, "VI": 6, "VII": 0}
    for tag, table in tables.items():
        daggers = [e for e in table.entries if e.dagger]
        assert len(daggers) == expected[tag], tag
        assert {e.encoder for e in daggers} <= {"asap"}
    assert tables["VII"].significance is None
    assert all(e.std is None for e in tables["VII"].entries)
    assert all(e.std is not None for t in TABLES[:-1] for e in tables[t].entries)


def test_paper_frame_is_an_aggregated_frame_in_percent():
    frame = paper_frame()
    assert len(frame) == 210 + 144 + 168 + 120 + 72 + 72
    assert {"encoder", "protocol", "regime", "metric", "mean", "std", "n_seeds", "source", "dagger"} <= set(frame)
    assert set(frame["source"]) == {"paper"}
    assert frame["mean"].between(0, 100).all()
    assert frame.loc[frame["table"] == "VII", "n_seeds"].isna().all()
    assert (frame.loc[frame["table"] == "II", "n_seeds"] == 5).all()
    only = paper_frame(tables=["VI"])
    assert set(only["table"]) == {"VI"} and len(only) == 72


def test_missing_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert (paper_dir() / "table-ii.json").is_file()  # shipped with the package
    with pytest.raises(FileNotFoundError, match="absent"):
        paper_dir(tmp_path / "absent")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        paper_dir()


def test_env_var_points_at_another_copy(tmp_path, monkeypatch):
    source = paper_dir() / "table-vi.json"
    (tmp_path / "table-vi.json").write_text(source.read_text())
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert list(load_paper_tables()) == ["VI"]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    return path


def test_schema_refuses_duplicates_mislabelled_and_unknown_fields(tmp_path):
    data = json.loads((paper_dir() / "table-vi.json").read_text())
    dup = dict(data, entries=data["entries"] + data["entries"][:1])
    with pytest.raises(SchemaError, match="duplicate"):
        load_paper_table(_write(tmp_path, dup))
    wrong = dict(data, entries=[dict(data["entries"][0], table="II")] + data["entries"][1:])
    with pytest.raises(SchemaError, match="table"):
        load_paper_table(_write(tmp_path, wrong))
    extra = dict(data, entries=[dict(data["entries"][0], p_value=0.01)] + data["entries"][1:])
    with pytest.raises(SchemaError, match="p_value"):
        load_paper_table(_write(tmp_path, extra))
    no_test = dict(data, significance=None)
    with pytest.raises(SchemaError, match="dagger"):
        load_paper_table(_write(tmp_path, no_test))


# --------------------------------------------------------------------------- against the paper's text

PAPER_TEXT = Path(os.environ.get("ASAP_PAPER_TEXT", "/work/shared/asap-paper.txt"))
_LABELS = {"Random init": "random", "MAE": "mae", "PCRLv2": "pcrlv2", "HEMAE": "hi-end-mae", "M3AE": "m3ae",
           "MRM": "mrm", "CT-CLIP": "ct-clip", "M3D": "m3d-clip", "Merlin": "merlin", "fVLM": "fvlm",
           "ViSDB": "visd-boost", "HLIP": "hlip", "SimCroP": "simcrop", "ASAP (Ours)": "asap"}
_ROW = re.compile(r"^(?:CTRG |CT-Rate )?(" + "|".join(re.escape(k) for k in _LABELS) + r")(?:\s\[\d+\])?\s(.*)$")
# A cell prints as mean+std run together, then its LaTeX: 82.20.1{82.2_{0.1}^{\bm{\dagger}}}
_CELL = re.compile(r"^(?P<m>\d+\.\d)(?P<s>\d+\.\d)\{?(?P=m)_\{(?P=s)\}(?P<d>\^\{\\bm\{\\dagger\}\})?\}?$")


def _paper_rows(lines: list[str], tag: str, next_tag: str) -> list[tuple[str, list[tuple]]]:
    start = next(i for i, l in enumerate(lines) if l.startswith(f"TABLE {tag}:"))
    stop = next(i for i, l in enumerate(lines) if l.startswith(f"TABLE {next_tag}:"))
    rows = []
    for line in lines[start + 1:stop]:
        found = _ROW.match(line)
        if not found:
            continue
        cells = []
        for token in found.group(2).split():
            if tag == "VII":
                cells.append((float(token[: len(token) // 2] if token == token[: len(token) // 2] * 2 else token),
                              None, False))
            else:
                cell = _CELL.match(token)
                assert cell, (tag, line[:40], token)
                cells.append((float(cell["m"]), float(cell["s"]), bool(cell["d"])))
        rows.append((_LABELS[found.group(1)], cells))
    return rows


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text is not available (set ASAP_PAPER_TEXT)")
def test_every_number_matches_the_paper_text(tables):
    lines = PAPER_TEXT.read_text(encoding="utf-8").splitlines()
    order = list(TABLES) + ["VIII"]
    checked = 0
    for k, tag in enumerate(TABLES):
        rows = _paper_rows(lines, tag, order[k + 1])
        if tag == "V":  # two stacked blocks (CTRG, then CT-Rate) of the same 12 methods
            half = len(rows) // 2
            rows = [(enc, a + b) for (enc, a), (_, b) in zip(rows[:half], rows[half:])]
        ours: dict[str, list[tuple]] = {}
        for e in tables[tag].entries:  # entries are stored row by row, in the paper's column order
            ours.setdefault(e.encoder, []).append((e.mean, e.std, e.dagger))
        assert [enc for enc, _ in rows] == list(ours), tag
        for encoder, cells in rows:
            assert ours[encoder] == cells, (tag, encoder)
            checked += len(cells)
    assert checked == 786
