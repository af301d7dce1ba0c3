"""Hub download helpers: the right files are asked for, and offline they fail with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

from asap_bench.data.download import DownloadError, allow_patterns, download


def test_default_patterns_are_the_tables_only():
    assert allow_patterns("ct-rate") == ["dataset/multi_abnormality_labels/*", "dataset/radiology_text_reports/*",
                                         "dataset/metadata/*"]
    assert "dataset/valid_fixed/*" in allow_patterns("ct-rate", volumes=True)
    assert allow_patterns("radgenome", ["dataset/radgenome_files/validation_*"]) == ["dataset/radgenome_files/validation_*"]
    with pytest.raises(KeyError, match="hub-hosted datasets: ct-rate, radgenome"):
        allow_patterns("luna16")


def test_download_passes_the_patterns(monkeypatch, tmp_path: Path):
    seen = {}

    def fake(**kw):
        seen.update(kw)
        return kw["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert download("radgenome", tmp_path / "rg", token="t") == tmp_path / "rg"
    assert seen["repo_id"] == "RadGenome/RadGenome-ChestCT" and seen["repo_type"] == "dataset"
    assert seen["allow_patterns"] == ["dataset/radgenome_files/*"] and seen["token"] == "t"


def _gated() -> GatedRepoError:
    error = GatedRepoError.__new__(GatedRepoError)  # its constructor wants a live HTTP response
    Exception.__init__(error, "403 gated")
    return error


@pytest.mark.parametrize("make, message", [
    (lambda: LocalEntryNotFoundError("no connection"), "unreachable or offline"),
    (_gated, "accept its terms"),
])
def test_failures_are_explained(monkeypatch, tmp_path: Path, make, message):
    def fail(**kw):
        raise make()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(DownloadError, match=message):
        download("ct-rate", tmp_path)


def test_offline_command_fails_cleanly(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "asap_bench", "datasets", "download", "ct-rate", "--out",
                             str(tmp_path / "ct-rate")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "Error: cannot download ibrahimhamamci/CT-RATE" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr
