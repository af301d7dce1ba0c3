"""Fitting an input to an encoder: the effective input of an (encoder, protocol, variant), valid by construction.

A protocol's ``paper`` input (224x224x112) does not tile into every encoder's
patches. Each card says in ``paper_input.fit`` what is done about it: ``none``
(it must tile as it is), ``pad`` / ``crop`` (each axis centred-padded up, or
cropped down, to a multiple of the patch, by the preprocessing, image and mask
alike) or ``rebuild_patch_embed`` (the architecture is rebuilt with
``paper_input.rebuild`` and the checkpoint's patch and position embeddings are
not loaded). ``fit_input`` turns that into the spec the preprocessing follows,
the architecture the module is built with (a ``<variant>-fit`` size variant of
the card, so the published sizes stay intact for the checkpoint), a
one-line description for provenance, and the problems that stop the pair from
running, each one line naming the encoder, protocol, size and patch.

Position tables: a learned table whose grid differs from the effective grid
needs ``--interpolate-pos`` when a checkpoint is loaded (the source grid comes
from the checkpoint tensor); a fixed formula table is rebuilt for any grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .base import token_grid
from .card import EncoderCard, InputSpec, fitted_variant

_HWD = "HWD"


def _dims(values) -> str:
    return "x".join(str(int(v)) for v in values)


def _to_hwd(values, axis_order: str) -> tuple[int, int, int]:
    by_axis = dict(zip(axis_order, values))
    return tuple(int(by_axis[a]) for a in _HWD)  # type: ignore[return-value]


@dataclass(frozen=True)
class EffectiveInput:
    """What an encoder is fed under a protocol and the architecture that takes it."""

    card: EncoderCard  # the card, with the fitted size variant added when the architecture changes
    variant: str  # the size variant to build: the run's own, or '<variant>-fit'
    spec: InputSpec  # the preprocessing (fit_size set when the volume is padded or cropped to the patches)
    fit: str  # none | pad | crop | rebuild_patch_embed: what was applied
    description: str  # one line for provenance
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture keys changed from the run's variant
    position: str = "none"  # learned | fixed | none: the module's position table
    source_grid: tuple[int, ...] | None = None  # the grid a checkpoint of the run's variant has
    grid: tuple[int, ...] | None = None  # the effective token grid
    problems: tuple[str, ...] = ()  # why the pair cannot run, whatever the options

    def position_problem(self, loads_checkpoint: bool, interpolate_pos: bool) -> str | None:
        """Why a checkpoint's learned position table cannot fill this module, or None."""
        if not self._resamples(loads_checkpoint) or interpolate_pos:
            return None
        return (f"position table is learned on the {_dims(self.source_grid)} token grid and the effective grid is "
                f"{_dims(self.grid)} ({self.card.input.axis_order}); pass --interpolate-pos to resample it from "
                "the checkpoint, or declare paper_input.fit rebuild_patch_embed in the card")

    def _resamples(self, loads_checkpoint: bool) -> bool:
        return (loads_checkpoint and self.position == "learned" and self.grid is not None
                and self.source_grid is not None and self.grid != self.source_grid and "patch_size" not in self.overrides)

    def provenance(self, loads_checkpoint: bool) -> str:
        """The description, with how the position table is filled when its grid changed."""
        if self.grid is None or self.source_grid is None or self.grid == self.source_grid or self.position == "none":
            return self.description
        grids = f"{_dims(self.source_grid)} -> {_dims(self.grid)}"
        if "patch_size" in self.overrides:
            how = "rebuilt with the patch embedding"
        elif self.position == "fixed":
            how = "fixed table rebuilt for the grid"
        elif loads_checkpoint:
            how = "resampled from the checkpoint (--interpolate-pos)"
        else:
            how = "freshly initialised (no checkpoint)"
        return f"{self.description}; position table {grids}: {how}"


def fit_input(card: EncoderCard, variant: str, spec: InputSpec, paper: bool, where: str = "") -> EffectiveInput:
    """Fit ``spec`` (the protocol's input for this card and variant) to the encoder's patches.

    ``paper`` says the spec is a protocol's paper input, to which the card's
    ``paper_input.fit`` applies; an encoder's own input must fit as it is. ``where``
    names the pair in problem lines (e.g. ``"ct-clip cls/stoic"``).
    """
    from .registry import family_class

    where = where or card.name
    cls = family_class(card.family)
    base = card.architecture_for(variant)
    fit = card.paper_input.fit if paper else "none"
    arch = {**base, **(card.paper_input.rebuild if fit == "rebuild_patch_embed" else {})}
    order = spec.axis_order
    size = tuple(spec.tensor_size())
    multiple = cls.input_multiple(arch)
    problems: list[str] = []
    fitted = size
    if any(s % m for s, m in zip(size, multiple)):
        if fit in ("pad", "crop"):
            step = math.ceil if fit == "pad" else math.floor
            fitted = tuple(max(m, step(s / m) * m) for s, m in zip(size, multiple))
        else:
            hint = "declare paper_input.fit in the card" if paper else "the encoder's own input must fit its patches"
            problems.append(f"{where}: input {_dims(size)} ({order}) is not divisible by patch {_dims(multiple)}; {hint}")
    if fitted != size:
        spec = spec.model_copy(update={"fit_size": _to_hwd(fitted, order)})
    if "img_size" in arch:
        arch["img_size"] = list(fitted)
    overrides = {k: v for k, v in arch.items() if base.get(k) != v}
    applied = fit if (fitted != size or (fit == "rebuild_patch_embed" and overrides)) else "none"
    effective_card, effective_variant = card, variant
    if overrides and not problems:
        effective_variant = fitted_variant(variant)
        sizes = {**card.sizes, effective_variant: {**card.sizes.get(variant, {}), **overrides}}
        effective_card = card.model_copy(update={"sizes": sizes})
    return EffectiveInput(card=effective_card, variant=effective_variant, spec=spec, fit=applied,
                          description=_describe(applied, size, fitted, order, base, arch, multiple),
                          overrides=overrides, position=cls.position_table(arch), source_grid=token_grid(base),
                          grid=token_grid(arch), problems=tuple(problems))


def _describe(fit: str, size, fitted, order: str, base: dict, arch: dict, multiple) -> str:
    """One line: what was done to the input and the architecture, sizes in the encoder's axis order."""
    patch = f"patch {_dims(multiple)}" if arch.get("patch_size") else f"multiple {_dims(multiple)}"
    if fit in ("pad", "crop") and fitted != size:
        return f"{fit} {_dims(size)} -> {_dims(fitted)} ({order}) for {patch}"
    if fit == "rebuild_patch_embed":
        changed = ", ".join(f"{k} {_value(base.get(k))} -> {_value(arch[k])}" for k in arch
                            if k != "img_size" and base.get(k) != arch[k])
        line = f"rebuild_patch_embed: {changed} ({order}); the checkpoint's patch and position embeddings are not loaded"
        if fitted != size:
            line += f"; {_dims(size)} -> {_dims(fitted)}"
        return line
    if all(m == 1 for m in multiple):
        return f"none: {_dims(size)} ({order}), any size"
    return f"none: {_dims(size)} ({order}) tiles into {patch}"


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return _dims(value)
    return str(value).lower() if isinstance(value, bool) else str(value)
