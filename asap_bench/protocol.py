"""Protocols (protocols/<family>/<name>.yaml): everything needed to rerun one task exactly.

A protocol names its data (dataset, table, label set), how that data is split,
the label regimes, the default number of seeds, the preprocessing every encoder
is fed, the head or trainer with its hyper-parameters, and the metrics. Its
fingerprint, the hash of the resolved config, goes into every result; two
results are comparable only when their protocol fingerprints agree.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, field_validator, model_validator

from .resources import resource_dir
from .schema import SchemaError, StrictModel, content_hash, parse_model, read_yaml

FAMILIES = {
    "cls": "linear-probe classification on frozen global features",
    "seg": "UNETR fine-tuning for segmentation",
    "prog": "prognosis from frozen features (horizon AUC, C-index)",
    "rg": "report generation from frozen visual tokens",
    "voc": "vocabulary (zero-shot-style) classification through trained projections",
    "ret": "volume-report retrieval through trained projections",
    "vqa": "visual question answering through a Q-former bridge to a language model",
    "ext": "external validation: a source protocol's model applied unchanged to another dataset",
}
Family = Literal["cls", "seg", "prog", "rg", "voc", "ret", "vqa", "ext"]

# The metric vocabulary per family. A protocol may only name metrics listed here,
# so a typo ("dcie") fails validation instead of producing an empty column.
_RECALL = [f"recall@{k}_{d}" for k in (1, 5, 10, 50) for d in ("v2r", "r2v")]
_TEXT = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "bertscore_f1"]
METRICS: dict[str, set[str]] = {
    "cls": {"auc", "acc", "balanced_acc", "f1_macro"},
    "seg": {"dice", "hd95", "nsd"},
    "prog": {"auc", "auc_1m", "auc_6m", "auc_12m", "c_index"},
    "rg": set(_TEXT),
    "voc": {"auc", "balanced_acc"},
    "ret": set(_RECALL),
    "vqa": set(_TEXT) | {"accuracy"},
}
METRICS["ext"] = METRICS["cls"] | METRICS["seg"]


class DataRef(StrictModel):
    """One table of one dataset and, where the task predicts labels, which label set."""

    dataset: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    table: str = "volumes"
    target: str | None = None  # a label set of the table (see the dataset card)
    where: dict[str, int] | None = None  # keep only rows whose column equals the value


class SplitRule(StrictModel):
    """How train / val / test are formed; all three are patient-grouped.

    ``official`` reads the table's ``split`` column (val carved from train when the
    official list has none); ``random`` draws a patient-level test set of
    ``test_fraction`` with ``seed``; ``none`` makes every case a test case (targets
    of external validation). Validation is always carved from training, never from test.
    Test and validation are fixed for a protocol; run seeds vary only the regime subsets
    and training, so every seed and encoder is scored on the same cases.
    """

    source: Literal["official", "random", "none"]
    test_fraction: float | None = Field(default=None, gt=0, lt=1)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 0
    stratify: bool = True
    citation: str = ""  # where the split comes from (paper, repository list)

    @model_validator(mode="after")
    def _fraction(self) -> "SplitRule":
        if self.source == "random" and self.test_fraction is None:
            raise ValueError("a random split needs test_fraction in (0, 1)")
        if self.source != "random" and self.test_fraction is not None:
            raise ValueError(f"test_fraction only applies to random splits, not {self.source!r}")
        return self


class Preprocessing(StrictModel):
    """What every encoder is fed under this protocol (its ``paper`` input).

    ``input: native`` lets each encoder use its own published InputSpec instead;
    ``paper`` feeds all encoders the ASAP input, as the paper does. The defaults are
    the ASAP benchmark's test transform (``Benchmark/Classification/utils/data_utils.py``,
    ``transform_test``): RAS, 1.5 x 1.5 x 3 mm, -1000..1000 HU to [-1, 1], then a
    centre crop to 224 x 224 x 112 and reflect padding where the volume is smaller; no
    resampling to the size. ``resize: resize`` (scale the whole volume to ``size``) is
    kept as a named alternative.
    """

    input: Literal["paper", "native"] = "paper"
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)  # mm, (x, y, z) in RAS
    orientation: str = Field(default="RAS", pattern=r"^[LRAPSI]{3}$")
    intensity: Literal["hu_window", "zscore", "percentile"] = "hu_window"
    hu_window: tuple[float, float] | None = (-1000.0, 1000.0)
    value_range: tuple[float, float] = (-1.0, 1.0)
    size: tuple[int, int, int] = (224, 224, 112)  # H, W, D after resize / crop-or-pad
    resize: Literal["resize", "crop_or_pad"] = "crop_or_pad"  # crop_or_pad: centre crop, pad where smaller
    pad_mode: Literal["constant", "reflect", "edge"] = "reflect"  # constant pads with value_range's low end

    @model_validator(mode="after")
    def _intensity(self) -> "Preprocessing":
        if self.intensity == "hu_window":
            if self.hu_window is None or self.hu_window[0] >= self.hu_window[1]:
                raise ValueError("intensity 'hu_window' needs hu_window [low, high] with low < high")
        if self.value_range[0] >= self.value_range[1]:
            raise ValueError("value_range must be [low, high] with low < high")
        if any(s <= 0 for s in self.spacing) or any(s <= 0 for s in self.size):
            raise ValueError("spacing and size must be positive")
        return self


class Head(StrictModel):
    """The trainable part on top of the encoder and its hyper-parameters."""

    kind: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class Transfer(StrictModel):
    """External validation: apply the model of ``source`` (a protocol id) to ``target`` data."""

    source: str = Field(pattern=r"^[a-z]+/[a-z0-9-]+$")
    target: DataRef
    label_map: dict[int, int] | None = None  # segmentation: target mask value -> source mask value


class Reference(StrictModel):
    """Where the paper reports this task (numbers live in results/, marked as quoted)."""

    paper: str = "ASAP, arXiv:2606.00602"
    table: str | None = None
    figure: str | None = None


class Protocol(StrictModel):
    id: str = Field(pattern=r"^[a-z]+/[a-z0-9-]+$")
    family: Family
    version: int = Field(ge=1)
    title: str
    description: str = ""
    data: DataRef
    split: SplitRule
    regimes: list[float] = Field(min_length=1)
    seeds: int = Field(default=5, ge=1)
    preprocessing: Preprocessing = Preprocessing()
    head: Head
    metrics: list[str] = Field(min_length=1)
    primary_metric: str
    demo_primary_metric: str | None = None  # replaces primary_metric on the demo cohort, as demo_* head params do
    access: Literal["public", "credentialed", "private"]
    transfer: Transfer | None = None
    reference: Reference = Reference()

    @field_validator("regimes")
    @classmethod
    def _regimes(cls, value: list[float]) -> list[float]:
        for ratio in value:
            if not 0 < ratio <= 1:
                raise ValueError(f"every regime is a fraction of training data in (0, 1], got {ratio}")
        if len(set(value)) != len(value):
            raise ValueError("regimes must not repeat")
        return sorted(value)

    @model_validator(mode="after")
    def _consistent(self) -> "Protocol":
        prefix = self.id.split("/")[0]
        if prefix != self.family:
            raise ValueError(f"id {self.id!r} must start with its family '{self.family}/'")
        unknown = [m for m in self.metrics if m not in METRICS[self.family]]
        if unknown:
            raise ValueError(
                f"unknown metric(s) {unknown} for family {self.family!r}; known: {sorted(METRICS[self.family])}"
            )
        for name in ("primary_metric", "demo_primary_metric"):
            value = getattr(self, name)
            if value is not None and value not in self.metrics:
                raise ValueError(f"{name} {value!r} is not one of metrics {self.metrics}")
        if (self.family == "ext") != (self.transfer is not None):
            raise ValueError("'transfer' is required for family 'ext' and only allowed there")
        return self

    @property
    def fingerprint(self) -> str:
        """sha256 of the resolved config (defaults filled in), the identity of this protocol."""
        return content_hash(self)

    def primary(self, synthetic: bool | None) -> str:
        """The metric that ranks and summarises this protocol: on the demo cohort ``demo_primary_metric``
        where given (the paper's metric may be unable to move on a tiny pool), else ``primary_metric``."""
        return self.demo_primary_metric if synthetic and self.demo_primary_metric else self.primary_metric

    @property
    def slug(self) -> str:
        """The id as a file-system name: cls/ct-rate -> cls__ct-rate."""
        return self.id.replace("/", "__")

    @property
    def split_owner(self) -> str:
        """The protocol whose split this one uses: its own, or an ext protocol's source."""
        return self.transfer.source if self.transfer is not None else self.id


def protocol_files(root: Path | None = None) -> list[Path]:
    root = root or resource_dir("protocols")
    return sorted(root.rglob("*.yaml"))


# An external validation applies its source protocol's model unchanged, so it takes
# the source's data, split, regimes, seeds, preprocessing and head instead of restating them.
INHERITED = ("data", "split", "regimes", "seeds", "preprocessing", "head")
RawLookup = Callable[[str], "dict[str, Any] | None"]


def _inherit(raw: dict[str, Any], path: Path, lookup: RawLookup) -> dict[str, Any]:
    if raw.get("family") != "ext":
        return raw
    restated = [(f, "inherited from transfer.source; remove it from an ext protocol") for f in INHERITED if f in raw]
    if restated:
        raise SchemaError(path, restated)
    transfer = raw.get("transfer")
    source_id = transfer.get("source") if isinstance(transfer, dict) else None
    if source_id is None:
        return raw  # the schema reports the missing transfer block
    source = lookup(source_id)
    if source is None or source.get("family") == "ext":
        raise SchemaError(path, [("transfer.source", f"{source_id!r} is not a defined cls or seg protocol")])
    return {**raw, **{f: source[f] for f in INHERITED if f in source}}


def shipped_raw(protocol_id: str) -> dict[str, Any] | None:
    path = resource_dir("protocols") / f"{protocol_id}.yaml"
    return read_yaml(path) if path.is_file() else None


def load_protocol_file(path: Path | str, lookup: RawLookup | None = None) -> Protocol:
    """Load and validate one protocol file; the id must match its path family/name.yaml.

    ``lookup`` finds the raw YAML of an ext protocol's source (default: the shipped files).
    """
    path = Path(path)
    data = _inherit(read_yaml(path), path, lookup or shipped_raw)
    protocol = parse_model(Protocol, data, path)
    expected = f"{path.parent.name}/{path.stem}"
    if path.parent.name in FAMILIES and protocol.id != expected:
        raise SchemaError(path, [("id", f"must match the file location {expected!r}, got {protocol.id!r}")])
    return protocol


def check_references(protocols: dict[str, Protocol], path_of: dict[str, Path]) -> None:
    """Cross-file checks: datasets, tables and label sets exist; ext sources exist."""
    from .data.cards import load_card

    for pid, protocol in protocols.items():
        problems: list[tuple[str, str]] = []
        refs = [("data", protocol.data)]
        if protocol.transfer is not None:
            refs.append(("transfer.target", protocol.transfer.target))
        for field, ref in refs:
            try:
                table = load_card(ref.dataset).table(ref.table)
            except KeyError as err:
                problems.append((f"{field}.dataset", str(err).strip('"')))
                continue
            if ref.target is not None and ref.target not in table.labels:
                problems.append((f"{field}.target", f"table {ref.table!r} of {ref.dataset!r} has label sets "
                                                    f"{sorted(table.labels)}, not {ref.target!r}"))
            for column in ref.where or {}:
                if column not in table.columns():
                    problems.append((f"{field}.where", f"{column!r} is not a column of {ref.dataset}/{ref.table}"))
        if problems:
            raise SchemaError(path_of[pid], problems)


def load_protocols(root: Path | None = None) -> dict[str, Protocol]:
    """Load every protocol under ``root`` (default: the shipped ones), checked across files."""
    files = protocol_files(root)
    raw = {f"{p.parent.name}/{p.stem}": p for p in files}
    lookup = lambda pid: read_yaml(raw[pid]) if pid in raw else None  # noqa: E731
    protocols: dict[str, Protocol] = {}
    path_of: dict[str, Path] = {}
    for path in files:
        protocol = load_protocol_file(path, lookup)
        if protocol.id in protocols:
            raise SchemaError(path, [("id", f"duplicate id {protocol.id!r}, also in {path_of[protocol.id]}")])
        protocols[protocol.id] = protocol
        path_of[protocol.id] = path
    check_references(protocols, path_of)
    return protocols


@lru_cache(maxsize=1)
def shipped_protocols() -> dict[str, Protocol]:
    return load_protocols()


def get_protocol(protocol_id: str, protocols: dict[str, Protocol] | None = None) -> Protocol:
    protocols = protocols if protocols is not None else shipped_protocols()
    if protocol_id not in protocols:
        import difflib

        close = difflib.get_close_matches(protocol_id, protocols, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `asap-bench protocols list`"
        raise KeyError(f"unknown protocol {protocol_id!r}{hint}")
    return protocols[protocol_id]


def select_protocols(specs: tuple[str, ...] | list[str], protocols: dict[str, Protocol] | None = None) -> list[Protocol]:
    """Resolve task selectors: ``all``, a family (``cls``), a glob (``seg/*``) or ids."""
    import fnmatch

    protocols = protocols if protocols is not None else shipped_protocols()
    chosen: dict[str, Protocol] = {}
    for spec in specs or ("all",):
        for part in spec.split(","):
            part = part.strip()
            if part == "all":
                matches = list(protocols)
            elif part in FAMILIES:
                matches = [pid for pid, p in protocols.items() if p.family == part]
            elif any(ch in part for ch in "*?["):
                matches = fnmatch.filter(protocols, part)
            else:
                matches = [get_protocol(part, protocols).id]
            if not matches:
                raise KeyError(f"task selector {part!r} matches no protocol")
            chosen.update((pid, protocols[pid]) for pid in matches)
    return [chosen[pid] for pid in sorted(chosen)]
