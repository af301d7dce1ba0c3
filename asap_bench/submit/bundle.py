"""The result bundle: its layout, its metadata schema, and the sha256 manifest that seals it.

A bundle is a folder::

    bundle.json          BundleInfo: encoder, card and checkpoint hashes, environment,
                         protocol and data fingerprints, the job matrix
    card.yaml            the encoder card exactly as submitted
    load_report.json     checkpoint key coverage (loaded, missing, unexpected, ignored keys)
    records/<encoder>/<family>__<task>/r<ratio>_s<seed>.json (+ .units.json)
    logs/                the runner's logs
    manifest.json        sha256 of every other file, and the bundle schema version

Any change to a file after the bundle was made shows as a hash mismatch. A bundle
holds regular files and folders only, within the size limits below: it is read
by lstat and ``O_NOFOLLOW``, so a link or a special file is refused before
anything in the bundle is opened, and nothing outside it is ever read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator, Literal

from pydantic import Field

from ..encoders.card import _NAME as ENCODER_NAME
from ..results.record import write_atomic
from ..schema import StrictModel

BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INFO = "bundle.json"
CARD = "card.yaml"
LOAD_REPORT = "load_report.json"
RECORDS = "records"

MAX_FILE_BYTES = 64 << 20  # per file: records, units sidecars and logs are far smaller
MAX_BUNDLE_BYTES = 1 << 30  # all files together
MAX_FILES = 100_000


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
    encoder: str = Field(pattern=ENCODER_NAME, max_length=100)  # also a folder name on the leaderboard
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


_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFBLK: "block device", stat.S_IFCHR: "character device"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "special file")


class UnsafeFile(ValueError):
    """A bundle path that is not a regular file within the size limit; the message names it."""


@dataclass
class Scan:
    files: dict[str, int] = field(default_factory=dict)  # POSIX path relative to the bundle -> size
    problems: list[str] = field(default_factory=list)


def scan_bundle(folder: Path) -> Scan:
    """Every entry under ``folder`` by lstat, links never followed: regular files, or a problem naming each."""
    found, stack, total = Scan(), [Path(folder)], 0
    while stack:
        here = stack.pop()
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as err:
            found.problems.append(f"{here}: cannot be listed ({err.strerror})")
            continue
        for entry in entries:
            path = Path(entry.path)
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                found.problems.append(f"{path}: a symbolic link (to {os.readlink(path)}); a bundle holds regular "
                                      "files and folders only")
            elif stat.S_ISDIR(mode):
                stack.append(path)
            elif not stat.S_ISREG(mode):
                found.problems.append(f"{path}: a {_kind(mode)}; a bundle holds regular files and folders only")
            else:
                size = entry.stat(follow_symlinks=False).st_size
                total += size
                found.files[path.relative_to(folder).as_posix()] = size
                if size > MAX_FILE_BYTES:
                    found.problems.append(f"{path}: {size} bytes, over the limit of {MAX_FILE_BYTES} bytes per file")
        if len(found.files) > MAX_FILES:
            found.problems.append(f"{folder}: more than {MAX_FILES} files, over the limit per bundle")
            break
    if total > MAX_BUNDLE_BYTES:
        found.problems.append(f"{folder}: {total} bytes in all, over the limit of {MAX_BUNDLE_BYTES} bytes per bundle")
    return found


@contextmanager
def open_regular(path: Path) -> Iterator[IO[bytes]]:
    """``path`` opened for reading only if it is a regular file within the size limit, never through a link."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        why = "a symbolic link" if err.errno == errno.ELOOP else f"cannot be read ({err.strerror})"
        raise UnsafeFile(f"{path}: {why}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{path}: a {_kind(info.st_mode)}; a bundle holds regular files and folders only")
        if info.st_size > MAX_FILE_BYTES:
            raise UnsafeFile(f"{path}: {info.st_size} bytes, over the limit of {MAX_FILE_BYTES} bytes per file")
        yield handle


def read_bytes(path: Path) -> bytes:
    with open_regular(path) as handle:
        return handle.read(MAX_FILE_BYTES + 1)


def read_text(path: Path) -> str:
    return read_bytes(path).decode("utf-8")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(folder: Path) -> list[str]:
    """Every regular file of the bundle except the manifest (links and special files left out), sorted."""
    return sorted(name for name in scan_bundle(folder).files if name != MANIFEST)


def write_manifest(folder: Path) -> dict[str, Any]:
    """Hash every regular file and write ``manifest.json``; returns the manifest."""
    manifest = {"bundle_schema_version": BUNDLE_SCHEMA_VERSION, "algorithm": "sha256",
                "files": {name: sha256_of(folder / name) for name in bundle_files(folder)}}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _inside(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


def check_manifest(folder: Path, files: dict[str, int] | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """(manifest, problems): schema version, then every file against its hash, and no file unlisted.

    ``files`` is the bundle's scan (``scan_bundle``); a bundle with links or special
    files is refused before its manifest is read.
    """
    if files is None:
        scan = scan_bundle(folder)
        if scan.problems:
            return None, scan.problems
        files = scan.files
    path = folder / MANIFEST
    if MANIFEST not in files:
        return None, [f"{path}: missing; a bundle is sealed by its manifest (asap-bench submit writes it)"]
    try:
        manifest = json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, [f"{path}: not valid JSON ({err})"]
    except UnsafeFile as err:
        return None, [str(err)]
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
        if not _inside(name) or name == MANIFEST:
            problems.append(f"{path}: field 'files.{name}': not a path of a file inside the bundle")
        elif name not in files:
            problems.append(f"{target}: listed in {MANIFEST} but missing")
        else:
            try:
                changed = sha256_of(target) != digest
            except UnsafeFile as err:
                problems.append(str(err))
                continue
            if changed:
                problems.append(f"{target}: sha256 differs from {MANIFEST}'s ({str(digest)[:12]}...): the file was "
                                "changed after the bundle was made")
    for name in sorted(files):
        if name not in listed and name != MANIFEST:
            problems.append(f"{folder / name}: not listed in {MANIFEST} (added after the bundle was made)")
    return manifest, problems
