"""A non-editable install must carry protocols/, baselines/ and datasets/ as package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import asap_bench
from asap_bench.resources import CHECKOUT_PATHS, FOLDERS, resource_dir

REPO = Path(__file__).resolve().parents[1]


def test_resource_folders_resolve():
    for name in FOLDERS:
        assert any(resource_dir(name).rglob("*.yaml")) or any(resource_dir(name).glob("*.json")), name


@pytest.mark.skipif(not (REPO / "pyproject.toml").exists(), reason="needs the source tree")
def test_wheel_carries_every_yaml(tmp_path):
    """Build the wheel (no network: hatchling comes with the test extra) and list its files."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    wheel = next(tmp_path.glob("asap_bench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in FOLDERS:
        source = REPO / CHECKOUT_PATHS[folder]
        shipped = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
        assert shipped, folder
        prefix = f"asap_bench/_resources/{folder}/"
        packed = {n.removeprefix(prefix) for n in names if n.startswith(prefix)}
        assert packed == shipped, folder
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_package_reads_its_own_resources():
    """When imported from site-packages (as `make test` and CI do), resources come from the wheel."""
    package = Path(asap_bench.__file__).resolve().parent
    if "site-packages" not in str(package):
        pytest.skip("running from a source checkout")
    assert resource_dir("protocols") == package / "_resources" / "protocols"
