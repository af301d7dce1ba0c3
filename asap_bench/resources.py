"""Where the shipped folders (protocols/, baselines/, datasets/, results/paper/) are found.

A wheel carries them under ``asap_bench/_resources``; a source checkout or an
editable install keeps them at the repository root. Both resolve here, so no
other module needs to know which kind of install it runs from.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
FOLDERS = ("protocols", "baselines", "datasets", "paper")
# where each folder sits in a checkout, relative to the repository root
CHECKOUT_PATHS = {"protocols": "protocols", "baselines": "baselines", "datasets": "datasets", "paper": "results/paper"}


def resource_dir(name: str) -> Path:
    """Return the folder holding the shipped ``name`` files."""
    if name not in FOLDERS:
        raise ValueError(f"unknown resource folder {name!r}; expected one of {FOLDERS}")
    for candidate in (_PACKAGE / "_resources" / name, _PACKAGE.parent / CHECKOUT_PATHS[name]):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"the {name}/ folder was not found next to the asap_bench package ({_PACKAGE}); "
        "reinstall asap-bench (pip install .) so that its package data is present"
    )
