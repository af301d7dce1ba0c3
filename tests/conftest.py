"""Shared fixtures: small manifests written in the real on-disk format."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from asap_bench.data.cards import load_card


def write_table(root: Path, dataset: str, table: str, rows: list[dict]) -> Path:
    """Write ``rows`` as ``<root>/<dataset>/<table>.csv`` in the card's column order."""
    columns = load_card(dataset).table(table).columns()
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = f"images/{column}.nii.gz" if column in ("image", "mask") else ""
    path = root / dataset / f"{table}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame[columns].to_csv(path, index=False)
    return path


def ctrate_rows(n_patients: int, seed: int = 0, max_volumes: int = 3, test_share: float = 0.2) -> list[dict]:
    """CT-RATE-like rows: several volumes per patient, 18 multi-labels, official train/test."""
    rng = np.random.default_rng(seed)
    labels = load_card("ct-rate").table("volumes").labels["abnormality"].columns
    prevalence = rng.uniform(0.03, 0.4, size=len(labels))
    rows = []
    for patient in range(n_patients):
        part = "valid" if rng.random() < test_share else "train"
        findings = (rng.random(len(labels)) < prevalence).astype(int)
        for k in range(int(rng.integers(1, max_volumes + 1))):
            scan, recon = "ab"[k // 2], k % 2 + 1
            row = {"case_id": f"{part}_{patient}_{scan}_{recon}", "patient_id": f"{part}_{patient}",
                   "image": f"images/{part}_{patient}_{scan}_{recon}.nii.gz",
                   "split": "test" if part == "valid" else "train"}
            row.update(dict(zip(labels, findings.tolist())))
            rows.append(row)
    return rows


@pytest.fixture
def ctrate_root(tmp_path: Path) -> Path:
    write_table(tmp_path, "ct-rate", "volumes", ctrate_rows(120))
    return tmp_path


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """One demo cohort build shared by every test module that reads it."""
    from asap_bench.data import demo

    out = tmp_path_factory.mktemp("demo") / "cohort"
    start = time.perf_counter()
    demo.build_demo(out)
    seconds = time.perf_counter() - start
    print(f"\ndemo cohort built in {seconds:.1f} s")
    assert seconds < 120
    return out


@pytest.fixture
def one_thread():
    """One torch thread for small sequential models: on 2 cores a second thread mostly adds contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
