"""Name -> encoder: the shipped cards, plus encoders other packages add through entry points.

Architectures (card ``family``) map to ``Encoder`` classes, imported lazily so
that listing encoders never builds a model. A separate package adds an encoder
without editing this one by declaring an entry point in the group
``asap_bench.encoders``; the entry point's name is the encoder's name and its
object is a callable returning ``(card, EncoderClass)`` where ``card`` is an
``EncoderCard`` or the path of a card YAML. The class is registered under the
card's family.
"""

from __future__ import annotations

import difflib
import importlib
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path

from .base import Encoder
from .card import EncoderCard, encoder_names, load_card_file, load_encoder_card
from .checkpoints import DEFAULT_MIN_FRACTION, LoadReport, load_weights, resolve_checkpoint

ENTRY_POINT_GROUP = "asap_bench.encoders"

BUILTIN_FAMILIES: dict[str, str] = {
    "vit3d": "asap_bench.encoders.vit3d:ViT3D",
    "hlip_vit": "asap_bench.encoders.hlip:HLIPViT",
    "monai_vit": "asap_bench.encoders.monai_vit:MonaiViT",
    "ctvit": "asap_bench.encoders.ctvit:CTViT",
    "resnet3d": "asap_bench.encoders.resnet3d:ResNet3D",
    "i3d_resnet": "asap_bench.encoders.i3d_resnet:I3DResNet",
    "unet3d_encoder": "asap_bench.encoders.unet3d:UNet3DEncoder",
}


class PluginError(RuntimeError):
    """An installed plug-in that does not provide a valid (card, Encoder class)."""


@lru_cache(maxsize=1)
def plugins() -> dict[str, tuple[EncoderCard, type[Encoder]]]:
    """Encoders added by installed packages, loaded once per process."""
    found: dict[str, tuple[EncoderCard, type[Encoder]]] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {point.name!r} = {point.value!r} (group {ENTRY_POINT_GROUP})"
        try:
            card, cls = point.load()()
        except Exception as err:  # a broken plug-in must name itself, not crash the listing silently
            raise PluginError(f"{where} failed to load: {err}") from err
        if not isinstance(card, EncoderCard):
            card = load_card_file(Path(card))
        if not (isinstance(cls, type) and issubclass(cls, Encoder)):
            raise PluginError(f"{where} must return (card, an asap_bench Encoder subclass), got {cls!r}")
        if card.name != point.name:
            raise PluginError(f"{where}: its card is named {card.name!r}; the entry point name must match")
        if point.name in encoder_names():
            raise PluginError(f"{where}: name {point.name!r} is already a built-in encoder")
        found[point.name] = (card, cls)
    return found


# Cards made known to this process by name (a submission's card file), with an optional Encoder class.
_REGISTERED: dict[str, EncoderCard] = {}
_REGISTERED_CLASSES: dict[str, type[Encoder]] = {}


def register_card(card: EncoderCard | str | Path, cls: type[Encoder] | None = None) -> EncoderCard:
    """Make a card that is not shipped known to this process by its name, so the runner can take the name.

    ``card`` is an EncoderCard or a card YAML path. Its family must be a built-in one,
    an installed plug-in's, or ``cls``'s. A built-in encoder's name is refused unless the
    card is that encoder's own; a registered card takes the place of a plug-in's card of
    the same name in this process.
    """
    if not isinstance(card, EncoderCard):
        card = load_card_file(Path(card))
    if card.name in encoder_names() and card != load_encoder_card(card.name):
        raise KeyError(f"card {card.name!r}: the name is a built-in encoder's and the card differs from "
                       f"baselines/{card.name}.yaml; give the encoder its own name")
    if cls is not None:
        if not (isinstance(cls, type) and issubclass(cls, Encoder)) or getattr(cls, "family", None) != card.family:
            raise PluginError(f"card {card.name!r}: {cls!r} is not an Encoder subclass of family {card.family!r}")
        _REGISTERED_CLASSES[card.family] = cls
    family_class(card.family)  # an unknown architecture fails here, naming the known ones
    _REGISTERED[card.name] = card
    return card


def forget_card(name: str) -> None:
    """Undo ``register_card`` for ``name`` (its class stays until the process ends)."""
    _REGISTERED.pop(name, None)


def all_encoder_names() -> list[str]:
    return sorted({*encoder_names(), *plugins(), *_REGISTERED})


def get_card(name: str | Path) -> EncoderCard:
    """A card by encoder name (registered, built-in or plug-in) or by the path of a card YAML."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return load_card_file(path)
    if name in _REGISTERED:
        return _REGISTERED[str(name)]
    if name in plugins():
        return plugins()[name][0]
    names = all_encoder_names()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise KeyError(f"unknown encoder {name!r}; {hint}known encoders: {', '.join(names)}")
    return load_encoder_card(str(name))


def family_class(family: str) -> type[Encoder]:
    if family in _REGISTERED_CLASSES:
        return _REGISTERED_CLASSES[family]
    for card, cls in plugins().values():
        if card.family == family:
            return cls
    if family not in BUILTIN_FAMILIES:
        known = sorted({*BUILTIN_FAMILIES, *(c.family for c, _ in plugins().values())})
        close = difflib.get_close_matches(family, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise KeyError(f"unknown architecture family {family!r}; {hint}known: {', '.join(known)}")
    module, _, attr = BUILTIN_FAMILIES[family].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_encoder(name: str | Path | EncoderCard, variant: str = "native") -> Encoder:
    """The encoder module with its own initialisation (no checkpoint)."""
    card = name if isinstance(name, EncoderCard) else get_card(name)
    return family_class(card.family)(card, variant)


def load_encoder(name: str | Path | EncoderCard, variant: str = "native", checkpoint: str | Path | None = None,
                 *, min_fraction: float = DEFAULT_MIN_FRACTION, adapt: bool = False) -> tuple[Encoder, LoadReport | None]:
    """Build an encoder and load its weights; random-init encoders load nothing."""
    encoder = build_encoder(name, variant)
    if encoder.card.checkpoint.availability == "none" and checkpoint is None:
        return encoder, None
    path = resolve_checkpoint(encoder.card, checkpoint)
    return encoder, load_weights(encoder, path, min_fraction=min_fraction, adapt=adapt)


def load_text_tower(name: str | Path | EncoderCard, checkpoint: str | Path | None = None,
                    text_model: str | Path | None = None, *, min_fraction: float = DEFAULT_MIN_FRACTION):
    """The encoder's paired text tower (its published text model, or ``text_model`` instead).

    When the card says the checkpoint carries the tower's weights (``key_prefix``),
    they are loaded from it; otherwise the text model's own weights are used.
    Returns ``(tower, report or None)``.
    """
    from .text import TextTower, load_text_weights

    card = name if isinstance(name, EncoderCard) else get_card(name)
    spec = card.checkpoint.text_tower
    if spec is None and text_model is None:
        raise KeyError(f"encoder {card.name!r} has no text tower; name a text model to pair it with")
    tower = TextTower(text_model or spec.model_id)
    if spec is None or spec.key_prefix is None or card.checkpoint.availability == "none":
        return tower, None
    return tower, load_text_weights(tower, card, resolve_checkpoint(card, checkpoint), min_fraction)
