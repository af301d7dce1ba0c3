"""Where the shipped YAML folders (protocols/, baselines/, datasets/) are found.

A wheel carries them under ``asap_bench/_resources``; a source checkout or an
editable install keeps them at the repository root. Both resolve here, so no
other module needs to know which kind of install it runs from.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
FOLDERS = ("protocols", "baselines", "datasets")


def resource_dir(name: str) -> Path:
    """Return the folder holding the shipped ``name`` YAML files."""
    if name not in FOLDERS:
        raise ValueError(f"unknown resource folder {name!r}; expected one of {FOLDERS}")
    for candidate in (_PACKAGE / "_resources" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"the {name}/ folder was not found next to the asap_bench package ({_PACKAGE}); "
        "reinstall asap-bench (pip install .) so that its package data is present"
    )
