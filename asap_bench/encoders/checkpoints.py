"""Loading published checkpoints safely, with every key accounted for.

Checkpoints are untrusted input: they are read with safetensors or
``torch.load(weights_only=True)``, so a pickled payload is refused before any
of its code can run. The one class beyond tensors and plain containers let
through is ``argparse.Namespace`` (the ``args`` that training scripts save next
to the weights): it only holds attributes, and the load report lists it. An
empty, truncated or otherwise damaged file fails with one line naming it.

Published keys are rewritten through the card's key map; missing, unexpected,
ignored and adapted keys are all reported, a shape mismatch fails naming the
keys, and so does a load that fills too little of the module (the silent
``strict=False`` failure this harness exists to stop).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.manifest import file_sha256
from .card import Checkpoint, EncoderCard

DEFAULT_MIN_FRACTION = 0.95
# classes a checkpoint may hold besides tensors and plain containers: attribute bags with no behaviour
INERT_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and keys."""


class UnreadableCheckpoint(CheckpointError):
    """The file itself cannot be read: missing, empty, truncated, damaged or refused; one line names it."""


@dataclass
class LoadReport:
    path: str
    sha256: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # module keys the checkpoint did not fill
    unexpected: list[str] = field(default_factory=list)  # mapped checkpoint keys the module lacks
    ignored: list[str] = field(default_factory=list)  # published keys the card declares unused
    adapted: list[str] = field(default_factory=list)  # "key: [shape] -> [shape]"
    rebuilt: list[str] = field(default_factory=list)  # module keys a fitted architecture builds afresh, not loaded
    fraction: float = 0.0  # share of the module's state (in elements) that was loaded
    allowed_globals: list[str] = field(default_factory=list)  # inert classes (INERT_GLOBALS) the file held

    def summary(self) -> str:
        lines = [f"{self.path} (sha256 {self.sha256[:12]}): loaded {len(self.loaded)} tensors, "
                 f"{self.fraction:.1%} of the module's state"]
        for name in ("missing", "unexpected", "ignored", "adapted", "rebuilt", "allowed_globals"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
                lines.append(f"  {name} ({len(keys)}): {shown}")
        return "\n".join(lines)


def read_state_dict(path: Path | str, container_key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unpickling nothing but tensors, plain containers and INERT_GLOBALS."""
    return read_checkpoint(path, container_key)[0]


def read_checkpoint(path: Path | str, container_key: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of a checkpoint file and the names of the inert classes (INERT_GLOBALS) it held."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableCheckpoint(f"{path}: checkpoint file does not exist")
    if path.stat().st_size == 0:
        raise UnreadableCheckpoint(f"{path}: the checkpoint file is empty (0 bytes)")
    payload = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    allowed = sorted(_inert_classes(payload))
    if container_key is not None:
        if not isinstance(payload, dict) or container_key not in payload:
            keys = sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{path}: expected the weights under key {container_key!r} "
                                  f"(the card's checkpoint.container_key); top-level keys are {keys}")
        payload = payload[container_key]
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors, got {type(payload).__name__}")
    bad = [k for k, v in payload.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:5]} are not tensors; expected a state dict "
                              "(is checkpoint.container_key right?)")
    return dict(payload), allowed


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise UnreadableCheckpoint(f"{path}: not a readable safetensors file, truncated or damaged "
                              f"({_first_line(err)})") from None


def _read_torch(path: Path) -> object:
    """``torch.load(weights_only=True)``, with INERT_GLOBALS allowed for this one load only (torch >= 2.5)."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    try:
        with scoped(list(INERT_GLOBALS)) if scoped else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        damage = _damage(path)
        if damage is not None:
            raise UnreadableCheckpoint(f"{path}: not a readable torch checkpoint, {damage}") from None
        raise UnreadableCheckpoint(
            f"{path}: refused: the file holds pickled objects other than tensors, and unpickling them "
            f"could run arbitrary code ({_culprit(err)}). Re-save the weights alone (torch.save(state_dict) "
            "or safetensors) from a trusted environment") from None
    except (RuntimeError, EOFError, OSError, struct.error, IndexError, ValueError) as err:
        damage = _damage(path) or f"truncated or damaged ({_first_line(err)})"
        raise UnreadableCheckpoint(f"{path}: not a readable torch checkpoint, {damage}") from None


def _first_line(err: BaseException) -> str:
    """The first sentence of a library's error, which is often several lines long."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return text.split(". ")[0].rstrip(".")


def _culprit(err: pickle.UnpicklingError) -> str:
    """The refused global or opcode from torch's weights-only message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = next((line for line in lines if "GLOBAL" in line or "operand" in line), lines[-1] if lines else "")
    return found.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")


def _damage(path: Path) -> str | None:
    """Why ``path`` is not whole torch.save output, or None if what torch read of it is complete.

    A zip archive must open and pass its CRC checks. A legacy (non-zip) file is a
    run of pickles: the first must be complete, and if it is torch's magic number
    so must the four after it. Read statically (``pickletools``), nothing is run.
    """
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            return f"truncated or damaged: the zip archive does not open ({err})"
        return None if broken is None else f"damaged: zip member {broken!r} fails its CRC check"
    if head[:1] != b"\x80":
        return "not torch.save output (neither a zip archive nor a pickle)"
    with open(path, "rb") as handle:
        for index in range(5):  # magic number, protocol version, system info, the object, its storage keys
            try:
                args = [arg for _op, arg, _pos in pickletools.genops(handle)]
            except (ValueError, EOFError, struct.error, IndexError) as err:
                return f"truncated or damaged: pickle {index + 1} ends early ({_first_line(err)})"
            if index == 0 and torch.serialization.MAGIC_NUMBER not in args:
                return None  # one plain pickle, not torch.save's layout: complete, so a refusal is real
    return None


def _inert_classes(payload: object) -> set[str]:
    """Names of the INERT_GLOBALS instances anywhere in ``payload``."""
    found: set[str] = set()
    stack, seen = [payload], set()
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, torch.Tensor):
            continue
        seen.add(id(item))
        if isinstance(item, INERT_GLOBALS):
            found.add(f"{type(item).__module__}.{type(item).__qualname__}")
            stack.extend(vars(item).values())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return found


def map_keys(state: dict[str, torch.Tensor], spec: Checkpoint) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename published keys to module keys; return the mapped dict and the ignored keys."""
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    origin: dict[str, str] = {}
    for key, tensor in state.items():
        target = spec.map_key(key)
        if target is None:
            ignored.append(key)
            continue
        if target in mapped:
            raise CheckpointError(f"checkpoint keys {origin[target]!r} and {key!r} both map to {target!r}; "
                                  "the card's key_map is ambiguous")
        mapped[target], origin[target] = tensor, key
    return mapped, sorted(ignored)


def load_weights(encoder: torch.nn.Module, path: Path | str, *, min_fraction: float = DEFAULT_MIN_FRACTION,
                 adapt: bool = False, sha256: str | None = None) -> LoadReport:
    """Load ``path`` into ``encoder`` through its card; fail loudly on anything that does not fit."""
    card: EncoderCard = encoder.card
    spec = card.checkpoint
    path = Path(path)
    report = LoadReport(str(path), sha256 or file_sha256(path))
    if spec.sha256 and report.sha256 != spec.sha256:
        raise CheckpointError(f"{path}: sha256 {report.sha256} differs from the card's {spec.sha256}; "
                              "this is not the published file")
    state, report.allowed_globals = read_checkpoint(path, spec.container_key)
    mapped, report.ignored = map_keys(state, spec)
    adapter = encoder.adapt_tensor if adapt else None
    rebuilt = set(encoder.rebuilt_keys()) if hasattr(encoder, "rebuilt_keys") else set()
    return apply_state(encoder, mapped, report, card.name, min_fraction, adapter, rebuilt)


def apply_state(module: torch.nn.Module, mapped: dict[str, torch.Tensor], report: LoadReport, what: str,
                min_fraction: float, adapter=None, rebuilt: set[str] = frozenset()) -> LoadReport:
    """Load already-renamed tensors into ``module``, filling ``report``; the checks every load shares.

    ``rebuilt`` keys are left as the module built them, listed in the report and out of the fraction.
    """
    own = module.state_dict()
    mismatched: list[str] = []
    usable: dict[str, torch.Tensor] = {}
    for key, tensor in mapped.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if key in rebuilt:
            report.rebuilt.append(f"{key}: checkpoint {list(tensor.shape)} not loaded, module {list(own[key].shape)}")
            continue
        if tensor.shape != own[key].shape:
            changed = adapter(key, tensor, own[key].shape) if adapter is not None else None
            if changed is None:
                mismatched.append(f"{key}: checkpoint {list(tensor.shape)} vs module {list(own[key].shape)}")
                continue
            report.adapted.append(f"{key}: {list(tensor.shape)} -> {list(changed.shape)}")
            tensor = changed
        usable[key] = tensor.to(own[key].dtype)
    if mismatched:
        hint = "" if adapter is not None else " (position embeddings can be interpolated on request: --interpolate-pos)"
        raise CheckpointError(f"{report.path}: shape mismatch for {len(mismatched)} key(s){hint}:\n  "
                              + "\n  ".join(mismatched[:20]))
    module.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in own if k not in usable and k not in rebuilt)
    report.unexpected.sort()
    report.rebuilt.sort()
    total = sum(t.numel() for k, t in own.items() if k not in rebuilt)
    report.fraction = sum(own[k].numel() for k in usable) / max(total, 1)
    if report.fraction < min_fraction:
        raise CheckpointError(
            f"{report.path}: only {report.fraction:.1%} of {what}'s weights were loaded (threshold {min_fraction:.0%}); "
            f"missing module keys: {report.missing[:12]}; unexpected checkpoint keys: {report.unexpected[:12]}. "
            "Fix the card's key_map / strip_prefixes, or lower the threshold knowingly")
    return report


def checkpoint_dirs() -> list[Path]:
    """Where named checkpoints are looked for: $ASAP_BENCH_CHECKPOINTS, then ./checkpoints."""
    dirs = [Path(p) for p in os.environ.get("ASAP_BENCH_CHECKPOINTS", "").split(os.pathsep) if p]
    return dirs + [Path("checkpoints")]


def resolve_checkpoint(card: EncoderCard, explicit: Path | str | None = None) -> Path:
    """The local file holding ``card``'s weights; offline, a remote source fails with what to do."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CheckpointError(f"--checkpoint {path}: file does not exist")
        return path
    spec = card.checkpoint
    if spec.availability == "none":
        raise CheckpointError(f"encoder {card.name!r} has no checkpoint (random initialisation)")
    tried: list[str] = []
    for source in spec.source:
        if source.startswith("hf://"):
            found = _hub_cached(source)
            if found is not None:
                return found
            tried.append(f"{source} (not in the local hub cache; download it with "
                         f"`huggingface-cli download {source[5:].split('/', 2)[0]}/{source[5:].split('/', 2)[1]}` "
                         "on a machine with network access)")
        elif "://" in source:
            tried.append(f"{source} (remote; download it and pass --checkpoint PATH)")
        else:
            for base in [Path(), *checkpoint_dirs()]:
                candidate = (base / source).expanduser()
                if candidate.is_file():
                    return candidate
            tried.append(f"{source} (not found under ., {', '.join(map(str, checkpoint_dirs()))})")
    listed = "\n  ".join(tried) or "(the card names no source)"
    raise CheckpointError(f"no local checkpoint for encoder {card.name!r}; tried:\n  {listed}\n"
                          "Place the file there or pass --checkpoint PATH")


def _hub_cached(source: str) -> Path | None:
    """hf://owner/repo/path/in/repo -> the file in the local hub cache, without any network call."""
    parts = source[5:].split("/", 2)
    if len(parts) < 3:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(f"{parts[0]}/{parts[1]}", parts[2])
    return Path(found) if isinstance(found, str) else None
