"""The task-family interface: the only thing the runner knows about a task.

A family gets one job's inputs (protocol, manifest, split, regime, seed, and
what it asked for through ``needs``: frozen global features, frozen patch
tokens, or the encoder itself to fine-tune) and returns metrics, the
hyper-parameters it chose on validation, and per-unit outputs for paired tests.
It fits on the regime subset of train, selects on val, and scores test once.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ..data.manifest import Manifest
from ..encoders.base import Encoder
from ..encoders.card import EncoderCard, InputSpec
from ..protocol import Protocol
from ..splits import Split


class FeatureLookup(ABC):
    """Frozen features by case id (rows of a memory-mapped array)."""

    @abstractmethod
    def global_features(self, case_ids: list[str]) -> np.ndarray:  # [n, D] float32
        ...

    def tokens(self, case_ids: list[str]) -> np.ndarray:  # [n, T, D] float32
        """Frozen last-block patch tokens, pooled to the family's ``token_grid``."""
        raise LookupError(f"{type(self).__name__} holds no patch tokens")


@dataclass
class EncoderHandle:
    """What a fine-tuning family gets instead of frozen features: the card (sized for the
    run's variant) and ``build()``, a fresh module with the checkpoint's weights, in train mode."""

    card: EncoderCard
    build: Callable[[], Encoder]


@dataclass(frozen=True)
class CheckpointRef:
    """The encoder's card and weights file (None for random init), for a family that reads more of the
    checkpoint than its vision weights (an encoder's own text tower)."""

    card: EncoderCard
    path: Path | None
    sha256: str | None


@dataclass
class TaskInputs:
    protocol: Protocol
    manifest: Manifest
    split: Split
    ratio: float
    seed: int
    features: FeatureLookup | None = None
    target: Manifest | None = None  # external validation: the target data
    target_features: FeatureLookup | None = None
    device: str = "cpu"
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("asap_bench.task"))
    cache_dir: Path | None = None  # content-keyed cache root, for the family's own entries (e.g. text embeddings)
    checkpoint: CheckpointRef | None = None
    # fine-tuning families (needs == "volumes")
    encoder: EncoderHandle | None = None
    spec: InputSpec | None = None  # what the encoder is fed under this protocol
    work_dir: Path | None = None  # per-job folder (keyed by the job key) for resumable training state
    shared_fit: Path | None = None  # where the fitted model is kept for another job of the run with the same fit

    @property
    def train(self) -> list[str]:
        """The regime subset of train: the cases a family may fit on."""
        return self.split.regime(self.ratio)


@dataclass
class TaskResult:
    metrics: dict[str, float | None]  # None where a metric cannot be computed; say why in notes
    notes: dict[str, str] = field(default_factory=dict)
    selected: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    # per-unit outputs for paired tests and recomputation: "ids", "task" (which rule rescores them,
    # see stats.set_metric) and e.g. "per_case" {metric: [value per id]}, labels and scores
    units: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # extra Provenance fields, e.g. text_model


class TaskFamily(ABC):
    """A family of tasks. ``needs`` says what the runner must provide: frozen global features
    ("global"), those and frozen patch tokens ("tokens"), or the encoder to fine-tune ("volumes").
    Under torchrun every rank runs each "volumes" job together (data-parallel) and rank 0 records it;
    other jobs are dealt to ranks whole."""

    name: ClassVar[str]
    needs: ClassVar[str] = "global"  # "global" | "tokens" | "volumes"

    def token_grid(self, protocol: Protocol) -> tuple[int, int, int] | None:
        """For ``needs == "tokens"``: the grid patch tokens are pooled to; None keeps them all."""
        return None

    @abstractmethod
    def run(self, inputs: TaskInputs) -> TaskResult:
        ...


def head_params(protocol: Protocol, synthetic: bool, known: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The head parameters a job uses: on the demo cohort every ``demo_X`` replaces ``X``.

    Returns the parameters (without ``demo_*`` keys) and the names replaced. Unknown keys
    fail naming the protocol, so a typo never silently falls back to a default.
    """
    raw = dict(protocol.head.params)
    unknown = sorted(k for k in raw if k.removeprefix("demo_") not in known)
    if unknown:
        raise ValueError(f"{protocol.id}: unknown head param(s) {unknown}; this family reads {sorted(known)} "
                         "(each may also be given as demo_<name> for the demo cohort)")
    params = {k: v for k, v in raw.items() if not k.startswith("demo_")}
    replaced = []
    if synthetic:
        for key, value in raw.items():
            if key.startswith("demo_"):
                params[key.removeprefix("demo_")] = value
                replaced.append(key.removeprefix("demo_"))
    return params, sorted(replaced)


def demo_note(replaced: list[str]) -> str:
    """What a record's notes say when demo settings replaced the protocol's."""
    return ("demo cohort: the protocol's demo_* settings replace " + ", ".join(replaced) +
            "; the numbers exercise the code path and are not comparable with the paper") if replaced else ""


# family -> implementation; a protocol whose family is missing here is reported as skipped
FAMILIES: dict[str, str] = {
    "cls": "asap_bench.tasks.linear_probe:LinearProbe",
    "prog": "asap_bench.tasks.prognosis:Prognosis",
    "seg": "asap_bench.tasks.segmentation:Segmentation",
    "voc": "asap_bench.tasks.contrastive:VocabularyClassification",
    "ret": "asap_bench.tasks.contrastive:Retrieval",
    "rg": "asap_bench.tasks.report_generation:ReportGeneration",
    "vqa": "asap_bench.tasks.vqa:VisualQuestionAnswering",
}


class FamilyNotBuilt(LookupError):
    """The protocol's family has no implementation yet; its jobs are skipped, with this reason."""


def get_family(protocol: Protocol, available: dict[str, str] | None = None) -> TaskFamily:
    """The family that runs ``protocol`` (ext runs its source protocol's family)."""
    available = FAMILIES if available is None else available
    family = protocol.family
    if protocol.transfer is not None:
        family = protocol.transfer.source.split("/")[0]
    if family not in available:
        raise FamilyNotBuilt(f"task family '{family}' is not implemented yet")
    module, _, attr = available[family].partition(":")
    return getattr(importlib.import_module(module), attr)()
