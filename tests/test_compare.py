"""`asap-bench report --compare A,B`: the across-settings test on the quoted paper numbers and on run records."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats as sps

from asap_bench import stats
from asap_bench.cli import main
from asap_bench.encoders.registry import build_encoder
from asap_bench.results.paper import paper_dir
from asap_bench.results.record import read_record, write_record
from asap_bench.results.store import load_records


def invoke(*args: str) -> tuple[str, str]:
    result = CliRunner().invoke(main, ["report", *args])
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def p_after(label: str, text: str) -> float:
    return float(re.search(rf"{re.escape(label)}: n = \d+, W = [\d.]+, p = ([0-9.e+-]+)", text).group(1))


# ---------------------------------------------------------------------------
# the shipped paper numbers (quoted data: deterministic)
# ---------------------------------------------------------------------------

def paper_pairs(tables: set[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ASAP and SimCroP in every printed cell where both have a number, read from the JSON files directly."""
    cells: dict[str, dict] = {"asap": {}, "simcrop": {}}
    for path in sorted(paper_dir().glob("table-*.json")):
        data = json.loads(path.read_text())
        if tables is not None and data["table"] not in tables:
            continue
        for e in data["entries"]:
            if e["encoder"] in cells:
                cells[e["encoder"]][(e["protocol"], e["regime"], e["metric"])] = e["mean"]
    keys = sorted(set(cells["asap"]) & set(cells["simcrop"]))
    return np.array([cells["asap"][k] for k in keys]), np.array([cells["simcrop"][k] for k in keys])


def test_paper_asap_vs_simcrop_and_the_papers_p(tmp_path):
    text, err = invoke("--source", "paper", "--compare", "asap,simcrop", "--figures", str(tmp_path / "fig"))
    a, b = paper_pairs()
    main_a, main_b = paper_pairs({"II", "III", "IV", "V", "VI"})
    assert len(a) == 67 and len(main_a) == 55
    assert "n = 67 settings where both have a number; unit: setting (protocol x label ratio x metric)" in text
    assert "by table: II 15, III 12, IV 12, V 10, VI 6, VII 12" in text
    assert "asap better in 67, tied in 0, worse in 0" in text
    relative = (a - b) / ((a + b) / 2)
    assert p_after("relative scale", text) == pytest.approx(sps.wilcoxon(relative).pvalue, rel=1e-2)
    assert p_after("raw differences", text) == pytest.approx(sps.wilcoxon(a - b).pvalue, rel=1e-2)
    assert "scale: symmetric relative difference (A - B) / ((|A| + |B|) / 2) per setting" in text
    assert "normal approximation with tie correction (n = 67 > 50)" in text
    assert "over the 67 settings of all quoted tables: p = 1.12e-12 (relative scale), 1.11e-12 (raw" in text
    assert "over the 55 settings of Tables II-VI: p = 1.11e-10 (relative scale), 1.1e-10 (raw" in text
    assert sps.wilcoxon(main_a - main_b).pvalue == pytest.approx(1.10e-10, rel=1e-2)
    assert "The paper states p = 6.72e-07" in text and "Sec. 4.2.7" in text
    assert "p = 6.72e-07 is not reproducible from the published tables" in text
    assert "computed from numbers quoted from the paper, not measured" in text
    ranks = text.split("Mean ranks", 1)[1]
    assert "over the 27 settings all 14 encoders have" in ranks and ranks.split("\n")[1].strip().startswith("asap 1.00")
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {"critical_difference_paper.png",
                                                              "critical_difference_paper.pdf"}
    assert "2 figure files" in err


def test_paper_json_and_bad_pairs():
    text, _ = invoke("--source", "paper", "--compare", "simcrop,asap", "--format", "json")
    (result,) = json.loads(text)
    assert result["settings"] == 67 and result["losses"] == 67 and result["wilcoxon"]["effect"] < 0
    assert [c["n"] for c in result["paper_claim"]["computed"]] == [67, 55]
    assert result["paper_claim"]["reproducible"] is False
    for pair, message in (("asap", "two different encoders"), ("asap,asap", "two different encoders"),
                          ("asap,nosuch", "no paper results for encoder(s) ['nosuch']")):
        bad = CliRunner().invoke(main, ["report", "--source", "paper", "--compare", pair])
        assert bad.exit_code == 1 and message in bad.output and "Traceback" not in bad.output


# ---------------------------------------------------------------------------
# run records: a real demo run, plus segmentation records with HD95 in mm or in m
# ---------------------------------------------------------------------------

SEG = {("seg/btcv", 0.1): (0.40, 30.0), ("seg/btcv", 1.0): (0.55, 18.0),
       ("seg/segthor", 0.1): (0.35, 40.0), ("seg/segthor", 1.0): (0.60, 12.0)}


def add_seg_records(out, hd95_factor: float) -> None:
    """Segmentation records made from the real run's records (same provenance), written with write_record.

    mae wins Dice by a little and loses HD95 by many millimetres: raw differences in mm
    and in m rank these settings differently; the relative scale does not.
    """
    for path in sorted(out.glob("*/cls__stoic/r1.0_s?.json")):
        real = read_record(path)
        for (protocol, regime), (dice, hd95) in SEG.items():
            worse = real.encoder == "mae"
            metrics = {"dice": dice + (0.01 if worse else 0.0) + 0.002 * real.seed,
                       "hd95": (hd95 + (9.0 if worse else 0.0) + real.seed) * hd95_factor}
            record = real.model_copy(update={
                "protocol": protocol, "family": "seg", "regime": regime, "metrics": metrics, "units_file": None,
                "units_sha256": None,
                "provenance": real.provenance.model_copy(update={"protocol_id": protocol,
                                                                 "protocol_fingerprint": f"fp-{protocol}"})})
            target = out / real.encoder / protocol.replace("/", "__") / f"r{regime}_s{real.seed}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            write_record(target, record)


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    """random and mae (other random weights) on cls/stoic, 2 seeds, 2 label ratios."""
    tmp = tmp_path_factory.mktemp("compare")
    torch.manual_seed(11)
    checkpoint = tmp / "mae-demo.pth"
    torch.save({"model": build_encoder("mae", "demo").state_dict()}, checkpoint)
    out = tmp / "runs"
    env = {"ASAP_BENCH_CACHE": str(tmp / "cache")}
    for extra in (["--encoder", "random"], ["--encoder", "mae", "--checkpoint", str(checkpoint), "--variant", "demo"]):
        result = CliRunner(env=env).invoke(main, ["run", *extra, "--task", "cls/stoic", "--ratios", "0.1,1",
                                                  "--seeds", "2", "--data-root", str(demo_root), "--out", str(out),
                                                  "--quiet"])
        assert result.exit_code == 0, result.output
    folders = {}
    for name, factor in (("mm", 1.0), ("m", 1e-3)):
        folder = tmp / name
        folder.mkdir()
        for path in out.rglob("*.json"):  # the real records, copied byte for byte
            target = folder / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
        add_seg_records(folder, factor)
        folders[name] = folder
    return folders


def test_run_records_with_hd95_in_mm_or_m(runs, tmp_path):
    outputs, errors = {}, {}
    for name, folder in runs.items():
        text, errors[name] = invoke("--records", str(folder), "--compare", "mae,random", "--metric", "all",
                         "--figures", str(tmp_path / name))
        outputs[name] = text
    mm, m = outputs["mm"], outputs["m"]
    assert "mae vs random: measured (synthetic demo)" in mm
    assert "n = 12 settings where both have a number; unit: setting (protocol x label ratio x metric), " \
           "valued by its mean over seeds" in mm
    assert "metric units: fraction, mm" in mm
    assert "raw differences: not tested: the settings mix units (fraction, mm)" in mm
    assert p_after("relative scale", mm) == p_after("relative scale", m)
    assert mm == m  # HD95 in metres: the same report, to the last digit
    assert "over the 12 settings all 2 encoders have" in mm
    assert "no critical-difference diagram (a critical-difference analysis needs at least 3 encoders, got 2)" in errors["mm"]

    both, err = invoke("--source", "both", "--records", str(runs["mm"]), "--compare", "asap,simcrop")
    assert both.startswith("asap vs simcrop: quoted (paper)") and "n = 67 settings" in both
    assert "demo: not compared (no demo results for encoder(s) ['asap', 'simcrop']; encoders there: mae, random)" in err

    frames = {name: load_records(folder) for name, folder in runs.items()}
    raw = {name: stats.across_settings(f, "mae", "random", scale="raw") for name, f in frames.items()}
    assert raw["mm"].p != pytest.approx(raw["m"].p, rel=0.1)  # the data can tell the units apart
    relative = stats.across_settings(frames["mm"], "mae", "random")
    assert relative.n == 12 and p_after("relative scale", mm) == pytest.approx(relative.p, rel=1e-2)
