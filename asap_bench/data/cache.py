"""Content-keyed caches: preprocessed volumes and frozen features.

A cache entry's key is the hash of everything its content depends on, never
a name: volumes are keyed by (manifest hash, InputSpec), features by (encoder
fingerprint with its checkpoint sha256, InputSpec, manifest hash). Change any
part and the key changes, so a stale entry can never be read. Entries are
built in a temporary folder and renamed into place, so a killed run leaves no
half-written entry; features are stored as memory-mapped ``.npy`` arrays, so
reading them does not load the whole dataset into memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from ..encoders.card import InputSpec
from ..schema import content_hash
from .manifest import Manifest

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
KINDS = ("volumes", "features", "text")  # top-level folders of the cache root; families add entries under them


def cache_root() -> Path:
    """``$ASAP_BENCH_CACHE``, else ``$XDG_CACHE_HOME`` (or ~/.cache) ``/asap-bench``."""
    cache = os.environ.get("ASAP_BENCH_CACHE")
    if cache:
        return Path(cache).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "asap-bench"


def _write_npy_atomic(path: Path, array: np.ndarray) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.save(out, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- volumes

class VolumeCache:
    """Preprocessed volumes of one manifest under one InputSpec, one ``.npy`` per image file.

    Images are stored as float16 (values are in a small range after the intensity
    mapping) and always read back through the cache, so every consumer sees the
    same tensor whether the entry was just written or written by an earlier run.
    """

    def __init__(self, manifest: Manifest, spec: InputSpec, root: Path | None = None):
        from .transforms import build_preprocessing

        self.manifest, self.spec = manifest, spec
        self.key = content_hash({"kind": "volumes", "format": FORMAT_VERSION, "manifest_sha256": manifest.sha256,
                                 "input": spec.model_dump(mode="json")})
        self.folder = (root or cache_root()) / "volumes" / self.key
        self.transform = build_preprocessing(spec)

    def path(self, image: str) -> Path:
        return self.folder / f"{content_hash(image)[:32]}.npy"

    def get(self, image: str) -> np.ndarray:
        """The preprocessed array [C, *tensor_size] of ``image`` (a path relative to the dataset)."""
        path = self.path(image)
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "meta.json").exists():
                _meta(self.folder, {"kind": "volumes", "dataset": self.manifest.dataset, "table": self.manifest.table_name,
                                    "manifest_sha256": self.manifest.sha256, "input": self.spec.model_dump(mode="json")})
            source = self.manifest.folder / image
            try:
                tensor = self.transform({"image": str(source)})["image"]
            except Exception as err:  # a corrupt or unreadable file: name it, keep the cause
                raise VolumeError(f"{source}: cannot be read and preprocessed ({type(err).__name__}: "
                                  f"{str(err).splitlines()[-1] if str(err) else ''})") from err
            array = np.asarray(tensor, dtype=np.float32)
            if not np.isfinite(array).all():
                raise VolumeError(f"{source}: preprocessing produced non-finite values")
            _write_npy_atomic(path, array.astype(np.float16))
        return np.load(path).astype(np.float32)


class VolumeError(RuntimeError):
    """A volume that cannot be read or preprocessed; fails only the jobs that need it."""


# --------------------------------------------------------------------------- features

TOKENS_FULL = "full"  # keep every patch token, unpooled


def feature_key(encoder_fingerprint: str, spec: InputSpec, manifest: Manifest,
                tokens: tuple[int, int, int] | str | None = None) -> str:
    """``tokens``: also store patch tokens, pooled to this grid (or ``TOKENS_FULL``); None: global only."""
    what = {"kind": "features", "format": FORMAT_VERSION, "encoder": encoder_fingerprint,
            "input": spec.model_dump(mode="json"), "manifest_sha256": manifest.sha256}
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
        index = json.loads((folder / "index.json").read_text())
        images = index["images"]
        array = np.load(folder / "global.npy", mmap_mode="r")
        meta = json.loads((folder / "meta.json").read_text())
        case_image = dict(zip(manifest.frame["case_id"], manifest.frame["image"]))
        tokens = np.load(folder / "tokens.npy", mmap_mode="r") if (folder / "tokens.npy").is_file() else None
        return cls(folder, images, {im: i for i, im in enumerate(images)}, case_image, array, meta, tokens)

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
    ``global.npy`` [n, dim] float32 and, with ``tokens`` = (T, D), ``tokens.npy`` [n, T, D] float16."""
    tmp.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(tmp / "global.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    del array
    if tokens is not None:
        array = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.float16, shape=(n, *tokens))
        del array


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
    """Write the index and meta, then rename the entry into place (a finished entry is never replaced)."""
    (tmp / "index.json").write_text(json.dumps({"images": images}))
    _meta(tmp, {"kind": "features", **meta})
    try:
        os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)


def _meta(folder: Path, meta: dict[str, Any]) -> None:
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "format": FORMAT_VERSION, **meta}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


# --------------------------------------------------------------------------- listing

def entries(root: Path | None = None) -> list[dict[str, Any]]:
    """Every finished cache entry with its meta and size on disk."""
    root = root or cache_root()
    found = []
    for kind in KINDS:
        for folder in sorted((root / kind).glob("*")) if (root / kind).is_dir() else []:
            if folder.name.startswith(".") or not (folder / "meta.json").is_file():
                continue
            meta = json.loads((folder / "meta.json").read_text())
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            found.append({"kind": kind, "key": folder.name, "path": folder, "bytes": size, **meta})
    return found


def clear(root: Path | None = None, kind: str | None = None) -> int:
    """Remove cache entries (all, or one kind, 'volumes' or 'features'); returns how many."""
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
