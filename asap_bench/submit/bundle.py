"""The result bundle: its layout, its metadata schema, and the sha256 manifest that seals it.

A bundle is a folder::

    bundle.json          BundleInfo: encoder, card and checkpoint hashes, environment,
                         protocol and data fingerprints, the job matrix
    card.yaml            the encoder card exactly as submitted
    load_report.json     checkpoint key coverage (loaded, missing, unexpected, ignored keys)
    records/<encoder>/<family>__<task>/r<ratio>_s<seed>.json (+ .units.json)
    logs/                the runner's logs
    manifest.json        sha256 of every other file, and the bundle schema version

Any change to a file after the bundle was made shows as a hash mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..data.manifest import file_sha256
from ..results.record import write_atomic
from ..schema import StrictModel

BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INFO = "bundle.json"
CARD = "card.yaml"
LOAD_REPORT = "load_report.json"
RECORDS = "records"


class ProtocolEntry(StrictModel):
    """One protocol of the job matrix: what it was when the bundle was made, and whether it ran."""

    version: int
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    regimes: list[float]
    seeds: list[int]
    status: Literal["ran", "skipped"]
    reason: str = ""  # why it was skipped (family not built, data not prepared)


class DataEntry(StrictModel):
    manifest_sha256: str
    data_fingerprint: str


class CheckpointInfo(StrictModel):
    file: str  # the file name as submitted (the path stays on the submitter's machine)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    fraction: float  # share of the module's weights the checkpoint filled
    loaded: int
    missing: int
    unexpected: int
    ignored: int
    adapted: int


class BundleInfo(StrictModel):
    bundle_schema_version: Literal[1] = BUNDLE_SCHEMA_VERSION
    encoder: str
    created: str
    card_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of card.yaml
    card_fingerprint: str  # content hash of the validated card (what the encoder fingerprint uses)
    family: str
    plugin: dict[str, str] | None = None  # distribution and version of the plug-in that provides the family
    checkpoint: CheckpointInfo | None  # None: random initialisation
    variant: str
    synthetic: bool  # made on the demo cohort
    data_root: str  # the data root's folder name (the path stays on the submitter's machine)
    smoke: bool  # a --smoke bundle checks a card; it is not a submission
    seeds: list[int] = Field(min_length=1)
    tasks: list[str]
    protocols: dict[str, ProtocolEntry]
    data: dict[str, DataEntry]  # "<dataset>/<table>" -> fingerprints, as the records carry them
    environment: dict[str, Any]
    jobs: dict[str, int]  # outcome counts: ok, failed, skipped
    smoke_forward: dict[str, Any]


class BundleError(ValueError):
    """A bundle that cannot be accepted; the message lists every reason, naming the file and field."""

    def __init__(self, bundle: Path | str, problems: list[str]):
        self.bundle, self.problems = str(bundle), problems
        shown = problems[:25] + ([f"... and {len(problems) - 25} more"] if len(problems) > 25 else [])
        super().__init__(f"bundle {bundle} refused: {len(problems)} problem(s)\n  " + "\n  ".join(shown))


def bundle_files(folder: Path) -> list[str]:
    """Every file of the bundle except the manifest, as sorted POSIX paths relative to ``folder``."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: Path) -> dict[str, Any]:
    """Hash every file and write ``manifest.json``; returns the manifest."""
    manifest = {"bundle_schema_version": BUNDLE_SCHEMA_VERSION, "algorithm": "sha256",
                "files": {name: file_sha256(folder / name) for name in bundle_files(folder)}}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def check_manifest(folder: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(manifest, problems): schema version, then every file against its hash, and no file unlisted."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, [f"{path}: missing; a bundle is sealed by its manifest (asap-bench submit writes it)"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, [f"{path}: not valid JSON ({err})"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, [f"{path}: field 'files': expected a mapping of file -> sha256"]
    version = manifest.get("bundle_schema_version")
    if version != BUNDLE_SCHEMA_VERSION:
        return None, [f"{path}: field 'bundle_schema_version': got {version!r}, this asap-bench reads "
                      f"version {BUNDLE_SCHEMA_VERSION}; remake the bundle with this version"]
    problems = []
    listed: dict[str, str] = manifest["files"]
    for name, digest in sorted(listed.items()):
        target = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            problems.append(f"{path}: field 'files.{name}': not a path inside the bundle")
        elif not target.is_file():
            problems.append(f"{target}: listed in {MANIFEST} but missing")
        elif file_sha256(target) != digest:
            problems.append(f"{target}: sha256 differs from {MANIFEST}'s ({digest[:12]}...): the file was changed "
                            "after the bundle was made")
    for name in bundle_files(folder):
        if name not in listed:
            problems.append(f"{folder / name}: not listed in {MANIFEST} (added after the bundle was made)")
    return manifest, problems
