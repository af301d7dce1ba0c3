"""Checks a submission passes before any protocol runs: the card, the checkpoint's key coverage, a forward pass.

Each check fails with a message that names what to fix, so a group checking its
card learns in seconds what would otherwise fail every job of a long run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..encoders import registry
from ..encoders.base import Encoder, frozen_forward
from ..encoders.card import EncoderCard, encoder_names, load_card_file
from ..encoders.checkpoints import DEFAULT_MIN_FRACTION, LoadReport, load_weights, resolve_checkpoint

SMOKE_DATASET = ("stoic", "volumes")  # chest CTs of the demo cohort
SMOKE_IMAGES = 2


class SmokeError(ValueError):
    """The encoder does not give what its card promises on a real input."""


@dataclass
class CardSource:
    card: EncoderCard
    where: str  # "card file PATH", "built-in", or "plug-in DIST VERSION"
    plugin: dict[str, str] | None  # the distribution that provides the card's family, if a plug-in does
    text: str  # the card's YAML as submitted (the file's bytes for a card file)


def _plugin_of(family: str) -> dict[str, str] | None:
    """The installed distribution whose entry point provides ``family``, if any."""
    plugins = registry.plugins()
    for point in entry_points(group=registry.ENTRY_POINT_GROUP):
        if point.name in plugins and plugins[point.name][0].family == family:
            dist = getattr(point, "dist", None)
            return {"entry_point": f"{point.name} = {point.value}",
                    "distribution": dist.metadata["Name"] if dist else "unknown",
                    "version": dist.version if dist else "unknown"}
    return None


def resolve_card(spec: str | Path) -> CardSource:
    """A card from a YAML path (registered for this process) or an encoder name; its family must resolve."""
    import yaml

    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        card = registry.register_card(load_card_file(path))
        where, text = f"card file {path}", path.read_text(encoding="utf-8")
    else:
        card = registry.get_card(str(spec))
        registry.family_class(card.family)
        where = "built-in" if card.name in encoder_names() else "plug-in"
        text = yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    plugin = _plugin_of(card.family) if card.family not in registry.BUILTIN_FAMILIES else None
    if plugin:
        where += f", family {card.family!r} from {plugin['distribution']} {plugin['version']}"
    return CardSource(card, where, plugin, text)


def load_checked(card: EncoderCard, variant: str, checkpoint: str | Path | None, *,
                 min_fraction: float = DEFAULT_MIN_FRACTION,
                 adapt: bool = False) -> tuple[Encoder, LoadReport | None, Path | None]:
    """Build the encoder at ``variant`` and load its checkpoint safely; the report gives key coverage."""
    torch.manual_seed(0)
    encoder = registry.build_encoder(card, variant)
    if card.checkpoint.availability == "none" and checkpoint is None:
        return encoder.eval(), None, None
    path = resolve_checkpoint(card, checkpoint)
    report = load_weights(encoder, path, min_fraction=min_fraction, adapt=adapt)
    return encoder.eval(), report, path


def _volumes(encoder: Encoder, data_root: Path, n: int) -> tuple[torch.Tensor, list[str]]:
    from ..data.manifest import load_manifest
    from ..data.transforms import build_preprocessing

    manifest = load_manifest(data_root, *SMOKE_DATASET)
    transform = build_preprocessing(encoder.input_spec)
    images = list(dict.fromkeys(manifest.frame["image"]))[:n]
    arrays = [np.asarray(transform({"image": str(manifest.folder / image)})["image"], dtype=np.float32)
              for image in images]
    return torch.from_numpy(np.stack(arrays)), images


def smoke_forward(encoder: Encoder, data_root: Path, n: int = SMOKE_IMAGES) -> dict[str, Any]:
    """Forward ``n`` demo volumes and check every output the card declares; a summary of what was seen."""
    card = encoder.card
    x, images = _volumes(encoder, data_root, n)
    started = time.perf_counter()
    want_hidden = "hidden_states" in card.outputs
    out = frozen_forward(encoder, x, hidden_states=want_hidden)
    alone = frozen_forward(encoder, x[:1]).global_embedding
    seconds = time.perf_counter() - started
    problems = []
    g = out.global_embedding
    if tuple(g.shape) != (len(x), encoder.embed_dim):
        problems.append(f"global embedding has shape {list(g.shape)}, expected [{len(x)}, {encoder.embed_dim}] "
                        "(batch, the card's embed_dim)")
    elif not torch.isfinite(g).all():
        problems.append("global embedding has non-finite values")
    elif not torch.allclose(alone, g[:1], rtol=1e-3, atol=1e-4):
        problems.append("the first volume's global embedding changes when another volume shares its batch "
                        f"(max difference {float((alone - g[:1]).abs().max()):.3g}); is a BatchNorm or dropout "
                        "still in training mode?")
    if "patch_tokens" in card.outputs:
        if out.patch_tokens is None or out.grid is None:
            problems.append("the card lists 'patch_tokens' but the encoder returned none (or no grid)")
        elif out.patch_tokens.shape[1] != int(np.prod(out.grid)):
            problems.append(f"{out.patch_tokens.shape[1]} patch tokens do not fill the grid {list(out.grid)}")
        elif not torch.isfinite(out.patch_tokens).all():
            problems.append("patch tokens have non-finite values")
    if want_hidden and not out.hidden_states:
        problems.append("the card lists 'hidden_states' but the encoder returned none")
    if problems:
        raise SmokeError(f"smoke forward of {card.name!r} on {len(x)} demo volume(s) {list(x.shape)}: "
                         + "; ".join(problems))
    return {"dataset": "/".join(SMOKE_DATASET), "images": images, "input_shape": list(x.shape),
            "global_shape": list(g.shape), "grid": list(out.grid) if out.grid else None,
            "patch_tokens_shape": list(out.patch_tokens.shape) if out.patch_tokens is not None else None,
            "hidden_states": len(out.hidden_states) if out.hidden_states else 0, "seconds": round(seconds, 3)}
