"""Encoder cards (baselines/<name>.yaml): what an encoder is, what it eats, where its weights are.

A card declares one published encoder: its architecture family and size, the
input it was trained on (its native InputSpec), how the ASAP paper fed it, the
checkpoint (source, container key, key renaming), what it outputs, whether a
UNETR segmentation applies, and how faithfully the harness rebuilds it. Details
nobody could check against the official code are listed in ``notes`` as
``"unverified: ..."`` lines.

Conventions
-----------
- ``input.spacing`` and ``input.size`` are given along the array axes x, y, z of
  the volume as loaded by nibabel / MONAI (in RAS after ``Orientationd``), the same
  order as a protocol's ``preprocessing``.
- ``input.axis_order`` is a permutation of ``HWD`` naming how the encoder's tensor
  lays those axes out after the channel axis, with H = x, W = y, D = z. MONAI's own
  layout is ``HWD``; a SimpleITK array (z, y, x) is ``DWH``; CT-CLIP's (z, x, y) is
  ``DHW``.
- ``architecture`` holds size parameters. ``img_size`` and ``patch_size`` are in
  ``input.axis_order``, so ``img_size`` is ``input.size`` permuted (checked).
  ``sizes.<variant>`` overrides architecture keys (``demo`` is required: the same
  family, small enough for CPU tests). Variant names ending in ``-fit`` are the
  harness's own: the architecture an input was fitted to (``encoders.fit``).
- ``paper_input.fit`` says how a protocol's ``paper`` input is made to fit this
  encoder when it does not divide into its patches: ``none`` (it must fit as it is),
  ``pad`` / ``crop`` (each axis centred-padded up, or cropped down, to a multiple of
  the patch), or ``rebuild_patch_embed`` (the architecture is rebuilt with
  ``paper_input.rebuild``, e.g. another ``patch_size``, and the checkpoint's patch and
  position embeddings are not loaded).
- Checkpoint keys are rewritten in this order: keys under ``container_key`` are
  taken (a raw state dict when null); a key starting with one of
  ``ignore_prefixes`` (matched against the published key) is expected and unused;
  each of ``strip_prefixes`` is removed, in order, where present; then every
  ``key_map`` rule ``[regex, replacement]`` is applied with ``re.sub``, in order.
  The result must be a key of the harness module of the card's family
  (``FAMILY_KEYS``); anything else is reported, never silently dropped.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from math import prod
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..resources import resource_dir
from ..schema import SchemaError, StrictModel, load_model

Group = Literal["random", "ssl", "vlp", "other"]

# How the paper groups table rows (Tables II-VI).
GROUP_TITLES: dict[str, str] = {
    "random": "Random init",
    "ssl": "3D Med-SSL",
    "vlp": "3D Med-VLP",
    "other": "Other",
}

# The key layout of the harness module each family is rebuilt as; key_map targets these.
FAMILY_KEYS: dict[str, str] = {
    "vit3d": "timm-style 3D ViT as in the ASAP/SimCroP code: cls_token, pos_embed, patch_embed.proj.*, "
    "blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*, norm.*",
    "monai_vit": "monai.networks.nets.ViT: cls_token, patch_embedding.position_embeddings, "
    "patch_embedding.patch_embeddings.*, blocks.N.{norm1,attn.qkv,attn.out_proj,norm2,mlp.linear1,mlp.linear2}.*, norm.*",
    "hlip_vit": "timm VisionTransformer with HLIP slice/scan attention: cls_token, spatial_posemb, "
    "patch_embed.proj.*, blocks.N.*, norm.*",
    "ctvit": "CT-CLIP's CTViT (transformer_maskgit.CTViT) key names, unprefixed",
    "i3d_resnet": "Merlin's I3ResNet (inflated torchvision ResNet) key names: conv1, bn1, layer1..layer4",
    "resnet3d": "MedicalNet 3D ResNet key names: conv1, bn1, layer1..layer4 (shortcut A: no downsample keys)",
    "unet3d_encoder": "PCRLv2 3D U-Net encoder key names: down_tr64, down_tr128, down_tr256, down_tr512",
}

AXIS_ORDERS = ("HWD", "HDW", "WHD", "WDH", "DHW", "DWH")
DEMO_MAX_VOXELS = 64 * 64 * 64
_NAME = r"^[a-z0-9][a-z0-9-]*$"
FIT_SUFFIX = "-fit"  # the size variant an input was fitted to: '<variant>-fit'


def fitted_variant(variant: str) -> str:
    return f"{variant}{FIT_SUFFIX}"


def base_variant(variant: str) -> str:
    """The published size variant a fitted one was made from (the variant itself otherwise)."""
    return variant.removesuffix(FIT_SUFFIX)


def _positive_leaves(value: Any, where: str, problems: list[str], allow_zero: bool = False) -> None:
    """Collect numeric leaves that are not positive (non-negative for ``*_indexes``)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if value < 0 or (value == 0 and not allow_zero):
            problems.append(f"{where} must be {'non-negative' if allow_zero else 'positive'}, got {value}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _positive_leaves(item, f"{where}[{i}]", problems, allow_zero)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _positive_leaves(item, f"{where}.{key}", problems, allow_zero or str(key).endswith("_indexes"))


def _positive_problems(arch: dict[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    for key, value in arch.items():
        _positive_leaves(value, f"{where}.{key}", problems, allow_zero=key.endswith("_indexes"))
    return problems


def _check_sizes(arch: dict[str, Any], where: str) -> list[str]:
    problems = _positive_problems(arch, where)
    img, patch = arch.get("img_size"), arch.get("patch_size")
    if isinstance(img, list) and isinstance(patch, list) and not problems:
        if len(img) != len(patch):
            problems.append(f"{where}: img_size {img} and patch_size {patch} differ in length")
        elif any(i % p for i, p in zip(img, patch)):
            problems.append(f"{where}: img_size {img} is not divisible by patch_size {patch}")
    return problems


class InputSpec(StrictModel):
    """The input an encoder expects: resampling, intensity mapping, size and tensor layout."""

    spacing: tuple[float, float, float] | None  # mm along x, y, z; null = not resampled
    orientation: str | None = Field(default="RAS", pattern=r"^[LRAPSI]{3}$")  # null = as stored
    intensity: Literal["hu_window", "minmax", "zscore", "percentile"]
    hu_window: tuple[float, float] | None = None  # HU clipped to [low, high] before scaling
    value_range: tuple[float, float] | None = None  # output range of the intensity mapping
    size: tuple[int, int, int]  # along x, y, z (H, W, D)
    resize: Literal["resize", "crop_or_pad"] = "resize"
    pad_mode: Literal["constant", "reflect", "edge"] = "constant"
    pad_value: float | None = None  # in output units (after intensity scaling); null = value_range low
    channels: int = Field(default=1, ge=1)
    axis_order: str = "HWD"  # tensor layout after the channel axis, H = x, W = y, D = z
    mean: float | None = None  # Normalize(mean, std) applied after the intensity mapping
    std: float | None = Field(default=None, gt=0)
    # along x, y, z: after the size step, centred pad (pad_mode, pad_value) or crop to this size so the
    # encoder's patches tile the volume; null = size. The tensor the encoder takes has this size.
    fit_size: tuple[int, int, int] | None = None

    @field_validator("axis_order")
    @classmethod
    def _axis_order(cls, value: str) -> str:
        if value not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be a permutation of 'HWD' ({', '.join(AXIS_ORDERS)}), got {value!r}")
        return value

    @field_validator("hu_window")
    @classmethod
    def _hu_window(cls, value: tuple[float, float] | None, info: ValidationInfo) -> tuple[float, float] | None:
        if value is None and info.data.get("intensity") == "hu_window":
            raise ValueError("intensity 'hu_window' needs hu_window [low, high]")
        if value is not None and value[0] >= value[1]:
            raise ValueError(f"hu_window must be [low, high] with low < high, got {list(value)}")
        return value

    @field_validator("value_range")
    @classmethod
    def _value_range(cls, value: tuple[float, float] | None, info: ValidationInfo) -> tuple[float, float] | None:
        intensity = info.data.get("intensity")
        if value is None and intensity in ("hu_window", "minmax"):
            raise ValueError(f"intensity {intensity!r} needs value_range [low, high]")
        if value is not None and value[0] >= value[1]:
            raise ValueError(f"value_range must be [low, high] with low < high, got {list(value)}")
        return value

    @field_validator("spacing", "size", "fit_size")
    @classmethod
    def _positive(cls, value: tuple[float, ...] | None, info: ValidationInfo) -> tuple[float, ...] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"{info.field_name} must be positive, got {list(value)}")
        return value

    @field_validator("std")
    @classmethod
    def _mean_std(cls, value: float | None, info: ValidationInfo) -> float | None:
        if "mean" in info.data and (info.data["mean"] is None) != (value is None):
            raise ValueError("give mean and std together, or neither")
        return value

    def tensor_size(self) -> tuple[int, int, int]:
        """``fit_size`` (else ``size``) permuted into ``axis_order``: the spatial shape of the encoder's tensor."""
        by_axis = dict(zip("HWD", self.fit_size or self.size))
        return tuple(by_axis[a] for a in self.axis_order)  # type: ignore[return-value]


Fit = Literal["none", "pad", "crop", "rebuild_patch_embed"]


class PaperInput(StrictModel):
    """How the ASAP paper ran this encoder (Section 4.1, Tables II-VII), and how its input is fitted to it."""

    uses_asap_input: bool | None  # 1.5x1.5x3 mm, +-1000 HU -> [-1, 1], 224x224x112; null = not stated
    weights: Literal["published", "retrained_asap_vitb", "random", "unknown"]
    fit: Fit = "none"  # how a protocol's paper input is made to tile into this encoder's patches
    rebuild: dict[str, Any] = Field(default_factory=dict)  # rebuild_patch_embed: architecture overrides
    note: str = ""

    @model_validator(mode="after")
    def _rebuild(self) -> "PaperInput":
        if (self.fit == "rebuild_patch_embed") != bool(self.rebuild):
            raise ValueError("paper_input.rebuild (architecture overrides, with patch_size) goes with "
                             "fit 'rebuild_patch_embed', and only with it")
        if self.rebuild and "patch_size" not in self.rebuild:
            raise ValueError("paper_input.rebuild must give the rebuilt patch_size (in input.axis_order)")
        return self


class TextTower(StrictModel):
    """The published text model paired with the encoder (for the vision-language tasks)."""

    model_id: str = Field(min_length=1)  # hub id of the text model
    key_prefix: str | None = None  # where its weights sit in the checkpoint, if they do
    ignore_prefixes: list[str] = Field(default_factory=list)  # under key_prefix, saved but not the encoder (MLM head)
    note: str = ""


class Checkpoint(StrictModel):
    availability: Literal["public", "gated", "on_request", "unreleased", "unknown", "none"]
    source: list[str] = Field(default_factory=list)  # local path hint, URL, or hf://owner/repo/file
    format: Literal["pth", "safetensors", "bin"] | None = None  # pth/bin: torch.save files, any extension
    container_key: str | None = None  # e.g. "model", "state_dict"; null = the file is the state dict
    strip_prefixes: list[str] = Field(default_factory=list)
    key_map: list[tuple[str, str]] = Field(default_factory=list)  # [regex, replacement], applied in order
    ignore_prefixes: list[str] = Field(default_factory=list)  # expected and unused (published key)
    text_tower: TextTower | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("container_key")
    @classmethod
    def _container(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("container_key is a non-empty string, or null for a raw state dict")
        return value

    @field_validator("strip_prefixes", "ignore_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        if any(not p for p in value):
            raise ValueError("prefixes must be non-empty strings")
        return value

    @field_validator("key_map")
    @classmethod
    def _key_map(cls, rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for i, (pattern, replacement) in enumerate(rules):
            try:
                compiled = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"rule {i}: regex {pattern!r} does not compile: {err}") from None
            for ref in re.findall(r"\\(\d+)|\\g<(\w+)>", replacement):
                number, named = ref
                group = named or number
                if group.isdigit():
                    if int(group) > compiled.groups:
                        raise ValueError(f"rule {i}: replacement {replacement!r} refers to group {group}, "
                                         f"but {pattern!r} has {compiled.groups}")
                elif group not in compiled.groupindex:
                    raise ValueError(f"rule {i}: replacement {replacement!r} refers to unknown group {group!r}")
        return rules

    @model_validator(mode="after")
    def _availability(self) -> "Checkpoint":
        if self.availability == "none" and (self.source or self.format or self.container_key):
            raise ValueError("availability 'none' (random init) takes no source, format or container_key")
        if self.availability in ("public", "gated") and not self.source:
            raise ValueError(f"a {self.availability} checkpoint names at least one source")
        return self

    def map_key(self, key: str) -> str | None:
        """Rewrite one published key into the harness module's key; None when it is expected and unused."""
        if any(key.startswith(p) for p in self.ignore_prefixes):
            return None
        for prefix in self.strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        for pattern, replacement in self.key_map:
            key = re.sub(pattern, replacement, key)
        return key


class Segmentation(StrictModel):
    mode: Literal["unetr", "not_applicable"]
    reason: str = Field(min_length=1)


class Status(StrictModel):
    level: Literal["faithful", "approximate", "not_rebuilt"]
    why: str = Field(min_length=1)


class EncoderCard(StrictModel):
    name: str = Field(pattern=_NAME)
    title: str = Field(min_length=1)
    table_label: str = Field(min_length=1)  # the row label the paper's tables use
    order: int = Field(ge=0)  # row order within the paper's tables
    family: str = Field(pattern=r"^[a-z][a-z0-9_]*$")  # an architecture in the registry (or a plug-in's)
    group: Group
    description: str = ""
    architecture: dict[str, Any] = Field(min_length=1)
    sizes: dict[str, dict[str, Any]]
    input: InputSpec
    paper_input: PaperInput
    checkpoint: Checkpoint
    embed_dim: int = Field(gt=0)  # size of the global feature
    global_pool: Literal["cls", "mean", "avgpool", "flatten"]
    outputs: list[Literal["global", "patch_tokens", "hidden_states"]] = Field(min_length=1)
    segmentation: Segmentation
    status: Status
    citation: str = Field(min_length=1)
    code: str | None = None  # repository URL
    license: str = Field(min_length=1)
    notes: list[str] = Field(default_factory=list)

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = _check_sizes(value, "architecture")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
        if "demo" not in sizes:
            raise ValueError("sizes needs a 'demo' variant (same family, small enough for CPU tests)")
        arch = info.data.get("architecture")
        for variant, overrides in sizes.items():
            if not re.match(_NAME, variant) or variant == "native" or variant.endswith(FIT_SUFFIX):
                raise ValueError(f"variant name {variant!r} must match {_NAME}, not be 'native' and not end "
                                 f"in {FIT_SUFFIX!r} (the harness's fitted variants)")
            if arch is None:
                continue
            unknown = sorted(set(overrides) - set(arch))
            if unknown:
                raise ValueError(f"sizes.{variant} overrides keys the architecture does not have: {unknown}")
            problems = _check_sizes({**arch, **overrides}, f"sizes.{variant}")
            if problems:
                raise ValueError("; ".join(problems))
        if arch is not None:
            demo_img = {**arch, **sizes["demo"]}.get("img_size")
            if isinstance(demo_img, list) and prod(demo_img) > DEMO_MAX_VOXELS:
                raise ValueError(f"sizes.demo img_size {demo_img} is larger than {DEMO_MAX_VOXELS} voxels")
        return sizes

    @field_validator("input")
    @classmethod
    def _input_matches_architecture(cls, spec: InputSpec, info: ValidationInfo) -> InputSpec:
        img = (info.data.get("architecture") or {}).get("img_size")
        if isinstance(img, list) and len(img) == 3 and tuple(img) != spec.tensor_size():
            raise ValueError(f"size {list(spec.size)} in axis_order {spec.axis_order} is "
                             f"{list(spec.tensor_size())}, but architecture.img_size is {img}")
        return spec

    @field_validator("paper_input")
    @classmethod
    def _rebuild_keys(cls, paper: PaperInput, info: ValidationInfo) -> PaperInput:
        arch = info.data.get("architecture")
        if arch is not None and paper.rebuild:
            unknown = sorted(set(paper.rebuild) - set(arch))
            if unknown:
                raise ValueError(f"paper_input.rebuild overrides keys the architecture does not have: {unknown}")
            problems = _positive_problems(paper.rebuild, "paper_input.rebuild")
            if problems:
                raise ValueError("; ".join(problems))
        return paper

    @field_validator("checkpoint")
    @classmethod
    def _random_has_no_checkpoint(cls, ckpt: Checkpoint, info: ValidationInfo) -> Checkpoint:
        group = info.data.get("group")
        if group is not None and (group == "random") != (ckpt.availability == "none"):
            raise ValueError("group 'random' goes with availability 'none', and only with it")
        return ckpt

    @field_validator("embed_dim")
    @classmethod
    def _embed_dim(cls, value: int, info: ValidationInfo) -> int:
        arch = info.data.get("architecture") or {}
        if "embed_dim" in arch and arch["embed_dim"] != value:
            raise ValueError(f"embed_dim {value} differs from architecture.embed_dim {arch['embed_dim']}")
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: list[str]) -> list[str]:
        if "global" not in value:
            raise ValueError("every encoder outputs a 'global' feature")
        if len(set(value)) != len(value):
            raise ValueError("outputs are listed once each")
        return value

    @field_validator("segmentation")
    @classmethod
    def _segmentation(cls, seg: Segmentation, info: ValidationInfo) -> Segmentation:
        if seg.mode == "unetr" and "hidden_states" not in (info.data.get("outputs") or ["hidden_states"]):
            raise ValueError("a UNETR segmentation needs 'hidden_states' in outputs")
        return seg

    def architecture_for(self, variant: str = "native") -> dict[str, Any]:
        """The architecture with a size variant's overrides applied ('native' = as published)."""
        if variant == "native":
            return dict(self.architecture)
        if variant not in self.sizes:
            raise KeyError(f"encoder {self.name!r} has no size variant {variant!r}; it has "
                           f"{['native', *sorted(self.sizes)]}")
        return {**self.architecture, **self.sizes[variant]}

    @property
    def group_title(self) -> str:
        return GROUP_TITLES[self.group]

    def unverified(self) -> list[str]:
        """The notes that record a detail not checked against the official code."""
        return [n for n in self.notes if n.lower().startswith("unverified:")]


def card_path(name: str) -> Path:
    return resource_dir("baselines") / f"{name}.yaml"


def encoder_names() -> list[str]:
    return sorted(p.stem for p in resource_dir("baselines").glob("*.yaml"))


def load_card_file(path: Path | str) -> EncoderCard:
    """Load and validate one card file; its ``name`` must equal the file stem."""
    path = Path(path)
    card = load_model(EncoderCard, path)
    if card.name != path.stem:
        raise SchemaError(path, [("name", f"must equal the file name {path.stem!r}, got {card.name!r}")])
    return card


@lru_cache(maxsize=None)
def load_encoder_card(name: str) -> EncoderCard:
    """The shipped card ``baselines/<name>.yaml``; an unknown name gets close matches."""
    names = encoder_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise KeyError(f"unknown encoder {name!r}; {hint}known encoders: {', '.join(names)}")
    return load_card_file(card_path(name))
