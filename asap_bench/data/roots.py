"""Which data root a command reads: an explicit one, $ASAP_BENCH_DATA, or the demo cohort."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_data_root(option: str | Path | None = None) -> Path:
    """The prepared data root to use; with none configured, the demo cohort (built on first use)."""
    chosen = option or os.environ.get("ASAP_BENCH_DATA")
    if chosen:
        root = Path(chosen).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} does not exist (from "
                                    f"{'--data-root' if option else '$ASAP_BENCH_DATA'})")
        return root
    from .demo import ensure_demo

    return ensure_demo()


def default_splits_dir(data_root: Path) -> Path:
    """Split files live beside the data they split, so every run on that data reuses them."""
    return data_root / "_splits"
