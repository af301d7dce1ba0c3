"""Content-keyed caches: preprocessed volumes and frozen features.

A cache entry's key is the hash of everything its content depends on, never
a name: volumes are keyed by (manifest hash, InputSpec) and each volume's file
by the identity of the image it was made from (path, size, mtime, and sha256
with ``ASAP_BENCH_HASH_CONTENT=1``); features by (encoder fingerprint with its
checkpoint sha256, InputSpec, manifest hash, identity of every image). Change
any part, or any input file, and the key changes, so a stale entry can never be
read. Every entry carries its own integrity data (shape, dtype, byte size and
sha256 of each array file), checked when it is opened: a damaged entry is
named in a warning, discarded and rebuilt. Entries are built in a temporary
folder (or file) and renamed into place, so a killed run leaves no
half-written entry; features are stored as memory-mapped ``.npy`` arrays, so
reading them does not load the whole dataset into memory, preallocated so a
full disk is an error for the job that needed the space, not a SIGBUS.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .. import files
from ..encoders.card import InputSpec
from ..schema import content_hash
from .cache_kinds import FEATURES, KINDS, VOLUMES
from .io import read_error
from .manifest import Manifest, file_identity, file_sha256, files_identity

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2
INTEGRITY = "__integrity__"  # the member of a cached .npz that holds the checks of the others
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$ASAP_BENCH_CACHE``, else ``$XDG_CACHE_HOME`` (or ~/.cache) ``/asap-bench``."""
    cache = os.environ.get("ASAP_BENCH_CACHE")
    if cache:
        return Path(cache).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "asap-bench"


# --------------------------------------------------------------------------- writing and checking

class DamagedEntry(RuntimeError):
    """A cache file that fails its integrity check: discarded and rebuilt, never read."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


class DiskFullError(OSError):
    """No room on the cache's disk for an entry: fails the job that needed it, names the file and size."""


def write_error(path: Path, error: OSError, nbytes: int, what: str) -> OSError:
    """``error`` from writing ``path``, as one line naming the file (ENOSPC and EDQUOT say how much was needed)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        out: OSError = DiskFullError(f"{path}: no space left on device to store {nbytes} bytes of {what}")
    else:
        out = OSError(f"{path}: cannot write {what} ({error.strerror or error})")
    out.errno = error.errno
    return out


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], what: str, nbytes: int) -> None:
    """``files.write_atomic``, with a failure as one line naming the cache file (and the space a full disk lacked)."""
    try:
        files.write_atomic(path, write)
    except OSError as err:
        raise write_error(path, err, nbytes, what) from err


_VERIFIED: set[tuple] = set()  # files checked in this process, by inode, size, mtime and ctime (see ``_seen``)


def _seen(path: Path, *extra: Any) -> tuple:
    """What a file is remembered by once checked: any write to it, or a ``utime``, moves its ctime."""
    stat = path.stat()
    return (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, *extra)


def _array_check(array: np.ndarray, checksum: bool = True) -> dict[str, Any]:
    check = {"bytes": int(array.nbytes), "shape": list(array.shape), "dtype": array.dtype.str}
    if checksum:
        check["sha256"] = hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()
    return check


def write_arrays(path: Path, arrays: dict[str, np.ndarray], what: str) -> None:
    """``arrays`` as one ``.npz`` that also holds each array's shape, dtype and sha256, written atomically."""
    checks = json.dumps({name: _array_check(a) for name, a in arrays.items()}).encode()
    payload = {**arrays, INTEGRITY: np.frombuffer(checks, dtype=np.uint8)}
    write_atomic(path, lambda out: np.savez(out, **payload), what, sum(a.nbytes for a in arrays.values()))


def read_arrays(path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of a file written by ``write_arrays``; ``DamagedEntry`` unless each one matches its check.

    The checksums are computed on the first read in a process; later reads of the unchanged file
    (same inode, size, mtime and ctime) only check names, shapes and dtypes.
    """
    try:
        seen = _seen(path)
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with data:
            arrays = {name: data[name] for name in data.files}
        checks = json.loads(arrays.pop(INTEGRITY).tobytes())
        if not isinstance(checks, dict) or not all(isinstance(c, dict) for c in checks.values()):
            raise ValueError("its integrity record is not a mapping of checks")
    except KeyError:
        raise DamagedEntry(path, "holds no integrity record") from None
    except Exception as err:  # truncated, garbled, not a zip: every way a file can be unreadable
        raise DamagedEntry(path, f"unreadable ({type(err).__name__}: {_first_line(err)})") from None
    if set(arrays) != set(checks) or not set(names) <= set(arrays):
        raise DamagedEntry(path, f"holds arrays {sorted(arrays)}, its record lists {sorted(checks)}, "
                                 f"expected {sorted(names)}")
    checksum = seen not in _VERIFIED
    for name, array in arrays.items():
        found = _array_check(array, checksum)
        expected = checks[name] if checksum else {k: v for k, v in checks[name].items() if k != "sha256"}
        if found != expected:
            raise DamagedEntry(path, f"array {name!r}: {_difference(found, expected)}")
    _VERIFIED.add(seen)
    return arrays


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def _difference(found: dict[str, Any], expected: dict[str, Any]) -> str:
    for field in ("bytes", "shape", "dtype", "sha256"):
        if found.get(field) != expected.get(field):
            return f"{field} {found.get(field)} where the entry recorded {expected.get(field)}"
    return "differs from its record"


def file_check(path: Path) -> dict[str, Any]:
    """What a file of an entry is checked against when opened: byte size and sha256, and shape and dtype of an .npy."""
    check: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        check.update(shape=list(array.shape), dtype=array.dtype.str)
        del array
    return check


def verify_file(path: Path, expected: dict[str, Any]) -> None:
    """``DamagedEntry`` unless ``path`` has the size, header and sha256 it had when the entry was written.

    Reads the whole file, once per process while it is unchanged (any write moves its ctime).
    """
    try:
        seen = _seen(path, json.dumps(expected, sort_keys=True))
    except OSError:
        raise DamagedEntry(path, "missing") from None
    if seen in _VERIFIED:
        return
    if seen[3] != expected.get("bytes"):
        raise DamagedEntry(path, f"{seen[3]} bytes where the entry recorded {expected.get('bytes')} "
                                 "(truncated or overwritten)")
    try:
        found = file_check(path)
    except Exception as err:
        raise DamagedEntry(path, f"unreadable ({type(err).__name__}: {err})") from None
    if found != expected:
        raise DamagedEntry(path, _difference(found, expected))
    _VERIFIED.add(seen)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """The entry's ``meta.json``, written atomically (a meta.json marks a finished entry)."""
    payload = json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "format": FORMAT_VERSION, **meta},
                         indent=1, sort_keys=True).encode()
    write_atomic(folder / "meta.json", lambda out: out.write(payload), "cache metadata", len(payload))


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DamagedEntry(path, "missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DamagedEntry(path, f"unreadable ({err})") from None
    if not text.strip():
        raise DamagedEntry(path, "empty")
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise DamagedEntry(path, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DamagedEntry(path, f"expected a JSON object, got {type(meta).__name__}")
    return meta


def _listed_files(folder: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    files = meta.get("files")
    plain = isinstance(files, dict) and all(  # file names inside the entry, nothing outside it
        isinstance(name, str) and Path(name).name == name and not name.startswith(".") and isinstance(check, dict)
        for name, check in files.items())
    if not files or not plain:
        raise DamagedEntry(folder / "meta.json", "lists no files with their checks")
    return files


def seal(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The checks of an entry's files, for its meta (``files``)."""
    return {name: file_check(folder / name) for name in names if (folder / name).is_file()}


def open_entry(folder: Path) -> dict[str, Any]:
    """The meta of a finished entry folder once every file it lists passes its check; ``DamagedEntry`` otherwise."""
    meta = read_meta(folder)
    for name, expected in _listed_files(folder, meta).items():
        verify_file(folder / name, expected)
    return meta


def discard(path: Path, error: DamagedEntry) -> None:
    """Warn which file failed and why, then remove the entry (a file, or a folder renamed away first so no
    reader sees it half-deleted); the caller rebuilds it."""
    log.warning("damaged cache entry %s; discarded, rebuilding it", error)
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    trash = path.with_name(f".{path.name}.tmp-discard{secrets.token_hex(3)}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:  # another process discarded or replaced it first
        return
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- volumes

class VolumeCache:
    """Preprocessed volumes of one manifest under one InputSpec, one checked ``.npz`` per image file.

    Images are stored as float16 (values are in a small range after the intensity
    mapping) and always returned as stored, so every consumer sees the same tensor
    whether the file was just written or written by an earlier run.
    """

    def __init__(self, manifest: Manifest, spec: InputSpec, root: Path | None = None):
        from .transforms import build_preprocessing

        self.manifest, self.spec = manifest, spec
        self.key = content_hash({"kind": VOLUMES, "format": FORMAT_VERSION, "manifest_sha256": manifest.sha256,
                                 "input": spec.model_dump(mode="json")})
        self.folder = (root or cache_root()) / VOLUMES / self.key
        self.transform = build_preprocessing(spec)

    def path(self, image: str) -> Path:
        """Named by the image file's identity: a replaced, touched or truncated file is preprocessed again."""
        return self.folder / f"{content_hash(file_identity(self.manifest, image))[:32]}.npz"

    def get(self, image: str) -> np.ndarray:
        """The preprocessed array [C, *tensor_size] of ``image`` (a path relative to the dataset)."""
        path = self.path(image)
        if path.is_file():
            try:
                return read_arrays(path, ["image"])["image"].astype(np.float32)
            except DamagedEntry as error:
                discard(path, error)
        return self._build(image, path)

    def _build(self, image: str, path: Path) -> np.ndarray:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "meta.json").exists():
            write_meta(self.folder, {"kind": VOLUMES, "dataset": self.manifest.dataset,
                                     "table": self.manifest.table_name, "manifest_sha256": self.manifest.sha256,
                                     "input": self.spec.model_dump(mode="json")})
        source = self.manifest.folder / image
        try:
            tensor = self.transform({"image": str(source)})["image"]
        except Exception as err:  # a corrupt or unreadable file: name it, keep the cause
            raise VolumeError(f"{source}: cannot be read and preprocessed ({read_error(err)})") from err
        array = np.asarray(tensor, dtype=np.float32)
        if not np.isfinite(array).all():
            raise VolumeError(f"{source}: preprocessing produced non-finite values")
        stored = array.astype(np.float16)  # what every later read returns, so the first one returns it too
        write_arrays(path, {"image": stored}, "preprocessed volume")
        return stored.astype(np.float32)


class VolumeError(RuntimeError):
    """A volume that cannot be read or preprocessed; fails only the jobs that need it."""


# --------------------------------------------------------------------------- features

TOKENS_FULL = "full"  # keep every patch token, unpooled


def feature_key(encoder_fingerprint: str, spec: InputSpec, manifest: Manifest,
                tokens: tuple[int, int, int] | str | None = None) -> str:
    """``tokens``: also store patch tokens, pooled to this grid (or ``TOKENS_FULL``); None: global only.

    The key holds the identity of every image the entry reads (a stat each), so a changed file is read again.
    """
    what = {"kind": FEATURES, "format": FORMAT_VERSION, "encoder": encoder_fingerprint,
            "input": spec.model_dump(mode="json"), "manifest_sha256": manifest.sha256,
            "files": files_identity(manifest, unique_images(manifest))}
    if tokens is not None:
        what["tokens"] = tokens if isinstance(tokens, str) else [int(g) for g in tokens]
    return content_hash(what)


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int, int], target: tuple[int, int, int] | str) -> torch.Tensor:
    """Patch tokens [B, N, D] on ``grid`` -> [B, T, D], adaptive-average-pooled to ``target``.

    Each axis is pooled to at most its own length, so a small encoder grid (a demo
    ViT's 4x4x4) is kept as it is rather than upsampled.
    """
    import torch.nn.functional as F

    if target == TOKENS_FULL:
        return tokens
    out = tuple(min(int(t), int(g)) for t, g in zip(target, grid))
    if out == tuple(grid):
        return tokens
    b, n, d = tokens.shape
    volume = tokens.transpose(1, 2).reshape(b, d, *grid)
    return F.adaptive_avg_pool3d(volume, out).flatten(2).transpose(1, 2)


@dataclass
class FeatureSet:
    """Frozen features of one manifest, memory-mapped, looked up by case id: the global
    embedding always, patch tokens [T, D] when the entry was extracted with them."""

    folder: Path
    images: list[str]
    rows: dict[str, int]  # image -> row
    case_image: dict[str, str]  # case id -> image
    array: np.ndarray  # memmap [n_images, D]
    meta: dict[str, Any]
    token_array: np.ndarray | None = None  # memmap [n_images, T, D_tok], float16

    @classmethod
    def open(cls, folder: Path, manifest: Manifest) -> "FeatureSet":
        """The entry at ``folder`` once each of its files passes its check; ``DamagedEntry`` names one that fails."""
        meta = open_entry(folder)
        if "global.npy" not in meta["files"] or "index.json" not in meta["files"]:
            raise DamagedEntry(folder / "meta.json", "lists no global.npy and index.json")
        try:
            images = json.loads((folder / "index.json").read_text())["images"]
        except (ValueError, KeyError, TypeError) as err:
            raise DamagedEntry(folder / "index.json", f"not an index of images ({err})") from None
        array = np.load(folder / "global.npy", mmap_mode="r")
        tokens = np.load(folder / "tokens.npy", mmap_mode="r") if "tokens.npy" in meta["files"] else None
        for name, held in (("global.npy", array), ("tokens.npy", tokens)):
            if held is not None and held.shape[0] != len(images):
                raise DamagedEntry(folder / name, f"holds {held.shape[0]} rows, its index {len(images)} images")
        rows = {im: i for i, im in enumerate(images)}
        missing = [im for im in unique_images(manifest) if im not in rows]
        if missing:
            raise DamagedEntry(folder / "index.json",
                               f"lacks {len(missing)} image(s) of {manifest.path}, e.g. {missing[0]}")
        case_image = dict(zip(manifest.frame["case_id"], manifest.frame["image"]))
        return cls(folder, images, rows, case_image, array, meta, tokens)

    @property
    def key(self) -> str:
        return self.folder.name

    def global_features(self, case_ids: list[str]) -> np.ndarray:
        rows = [self.rows[self.case_image[c]] for c in case_ids]
        return np.asarray(self.array[rows], dtype=np.float32)

    def tokens(self, case_ids: list[str]) -> np.ndarray:
        if self.token_array is None:
            raise LookupError(f"feature entry {self.folder} holds no patch tokens (extracted for global features only)")
        rows = [self.rows[self.case_image[c]] for c in case_ids]
        return np.asarray(self.token_array[rows], dtype=np.float32)


def open_features(folder: Path, manifest: Manifest) -> FeatureSet | None:
    """The finished entry at ``folder``, or None when there is none; a damaged one is named, discarded, and None."""
    if not folder.exists():
        return None
    try:
        return FeatureSet.open(folder, manifest)
    except DamagedEntry as error:
        discard(folder, error)
        return None


def unique_images(manifest: Manifest) -> list[str]:
    """Each image file once, in manifest order (several rows may share a volume, e.g. VQA)."""
    return list(dict.fromkeys(manifest.frame["image"].tolist()))


def blocks(n: int, size: int) -> list[range]:
    """Fixed batches of row indices; every launcher uses the same ones, so results do not depend on it."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def remove_abandoned(folder: Path) -> None:
    """Delete temp folders of ``folder``'s entry left by killed processes (their pid is gone)."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's process
            pass


def create_feature_file(tmp: Path, n: int, dim: int, tokens: tuple[int, int] | None = None) -> None:
    """The empty memory-mapped arrays every extracting process writes its rows into:
    ``global.npy`` [n, dim] float32 and, with ``tokens`` = (T, D), ``tokens.npy`` [n, T, D] float16.

    Their blocks are allocated now: a full disk is an error here, for this entry, rather than
    a SIGBUS in whichever process first writes a row past the end of the free space.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    arrays = [("global.npy", np.float32, (n, dim))] + ([("tokens.npy", np.float16, (n, *tokens))] if tokens else [])
    for name, dtype, shape in arrays:
        path = tmp / name
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        try:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            del array
            _preallocate(path)
        except OSError as err:
            raise write_error(path, err, nbytes, "features") from err


def _preallocate(path: Path) -> None:
    """Reserve every block of ``path`` (where the platform can: not on macOS)."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        allocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot preallocate
            raise
    finally:
        os.close(fd)


def extract_into(tmp: Path, manifest: Manifest, encode: Callable[[np.ndarray], np.ndarray | dict[str, np.ndarray]], volumes: VolumeCache,
                 batch_size: int, my_blocks: Iterable[int] | None = None,
                 progress: Callable[[int], None] | None = None) -> int:
    """Encode this process's batches into the entry's arrays; returns the number of forward passes.

    ``encode`` returns the global features, or a dict of arrays by file stem
    (``{"global": ..., "tokens": ...}``). ``my_blocks`` restricts the process to
    some batches (data-parallel extraction); batches are fixed, so the rows do not
    depend on how many processes share the work.
    """
    images = unique_images(manifest)
    arrays: dict[str, np.ndarray] = {}
    forwards = 0
    todo = blocks(len(images), batch_size)
    for b in (range(len(todo)) if my_blocks is None else my_blocks):
        rows = todo[b]
        batch = np.stack([volumes.get(images[i]) for i in rows])
        out = encode(batch)
        for name, values in (out if isinstance(out, dict) else {"global": out}).items():
            if name not in arrays:
                arrays[name] = np.load(tmp / f"{name}.npy", mmap_mode="r+")
            arrays[name][rows.start:rows.stop] = values
        forwards += len(rows)
        if progress is not None:
            progress(len(rows))
    for array in arrays.values():
        array.flush()
    arrays.clear()
    return forwards


def finish_features(folder: Path, tmp: Path, images: list[str], meta: dict[str, Any]) -> None:
    """Write the index and meta with every file's check, then rename the entry into place
    (a finished entry is never replaced)."""
    index = json.dumps({"images": images}).encode()
    write_atomic(tmp / "index.json", lambda out: out.write(index), "the feature index", len(index))
    write_meta(tmp, {"kind": FEATURES, **meta, "files": seal(tmp, ["global.npy", "tokens.npy", "index.json"])})
    try:
        os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- listing

def entries(root: Path | None = None) -> list[dict[str, Any]]:
    """Every cache entry of every kind with its meta, size on disk and state: ``ok``, or ``damaged: why``
    for a torn one (meta.json missing, empty or garbage; a file it lists missing or of another size)."""
    root = root or cache_root()
    found = []
    for kind in KINDS:
        folder = root / kind
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if not entry.name.startswith(".") and entry.is_dir():
                found.append(_describe(kind, entry))
    return found


def _describe(kind: str, folder: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    try:
        meta = read_meta(folder)
        if "files" in meta:
            for name, expected in _listed_files(folder, meta).items():
                size = (folder / name).stat().st_size if (folder / name).is_file() else None
                if size != expected.get("bytes"):
                    raise DamagedEntry(folder / name, "missing" if size is None else
                                       f"{size} bytes where the entry recorded {expected.get('bytes')}")
        state = "ok"
    except DamagedEntry as error:
        state = f"damaged: {error.path.name} {error.reason}"
    return {**meta, "kind": kind, "key": folder.name, "path": folder, "bytes": _size(folder), "state": state}


def _size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:  # removed meanwhile
            pass
    return total


def clear(root: Path | None = None, kind: str | None = None) -> int:
    """Remove cache entries (all, or one of ``KINDS``), damaged ones included; returns how many."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; expected one of {', '.join(KINDS)}")
    root = root or cache_root()
    removed = 0
    for entry in entries(root):
        if kind in (None, entry["kind"]):
            shutil.rmtree(entry["path"], ignore_errors=True)
            removed += 1
    for kind_dir in KINDS:  # leftovers of killed runs
        for tmp in (root / kind_dir).glob(".*.tmp-*") if (root / kind_dir).is_dir() else []:
            if kind in (None, kind_dir):
                shutil.rmtree(tmp, ignore_errors=True)
    return removed
