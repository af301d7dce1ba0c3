"""Dataset cards (datasets/<name>.yaml): what a prepared dataset holds and where it came from.

A card declares the dataset's *tables*. A table is one CSV under the prepared
dataset folder (``<root>/<name>/<table>.csv``), one row per unit (a volume, a
candidate patch, an MRI frame, a question). Every table has the columns
``case_id`` (unique), ``patient_id`` (the grouping unit of every split) and
``image`` (a path relative to the dataset folder), plus what the card declares:
label sets, a segmentation mask, report text, survival times, VQA pairs, and an
official ``split`` column. Demo and real data are written in this one format.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..resources import resource_dir
from ..schema import SchemaError, StrictModel, load_model

REQUIRED_COLUMNS = ("case_id", "patient_id", "image")
SPLIT_VALUES = ("train", "val", "test")


class LabelSet(StrictModel):
    """Labels for one prediction target, stored in ``columns`` of the table."""

    kind: Literal["binary", "multiclass", "multilabel"]
    columns: list[str] = Field(min_length=1)
    classes: list[str] | None = None  # multiclass: class names, index = stored integer
    description: str = ""

    @model_validator(mode="after")
    def _shape(self) -> "LabelSet":
        if self.kind in ("binary", "multiclass") and len(self.columns) != 1:
            raise ValueError(f"a {self.kind} label set has exactly one column, got {len(self.columns)}")
        if self.kind == "multiclass" and not (self.classes and len(self.classes) >= 2):
            raise ValueError("a multiclass label set lists at least two class names in 'classes'")
        if self.kind != "multiclass" and self.classes is not None:
            raise ValueError("'classes' is only for multiclass label sets")
        return self

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.kind == "multiclass" else len(self.columns)


class Survival(StrictModel):
    """Time-to-event columns; horizon labels are 1/0, empty when censored before the horizon."""

    time: str = "time"
    event: str = "event"
    unit: Literal["days"] = "days"
    horizons: dict[str, float] = Field(default_factory=dict)  # column -> horizon in days


class Table(StrictModel):
    description: str
    unit: Literal["volume", "patch", "frame", "question"] = "volume"
    labels: dict[str, LabelSet] = Field(default_factory=dict)
    mask: dict[int, str] | None = None  # mask value -> structure name; 0 is background
    text: list[str] = Field(default_factory=list)  # report-text columns
    survival: Survival | None = None
    qa: bool = False  # has qa_type, question, answer columns
    official_split: bool = False  # has a 'split' column with train/val/test

    @field_validator("mask")
    @classmethod
    def _mask(cls, value: dict[int, str] | None) -> dict[int, str] | None:
        if value is not None and (0 in value or any(k < 0 for k in value)):
            raise ValueError("mask maps positive integer values to structure names; 0 is background")
        return value

    def columns(self) -> list[str]:
        cols = list(REQUIRED_COLUMNS)
        if self.official_split:
            cols.append("split")
        for labels in self.labels.values():
            cols += [c for c in labels.columns if c not in cols]
        if self.mask is not None:
            cols.append("mask")
        cols += self.text
        if self.survival is not None:
            cols += [self.survival.time, self.survival.event, *self.survival.horizons]
        if self.qa:
            cols += ["qa_type", "question", "answer"]
        return cols


class DatasetCard(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    title: str
    modality: Literal["CT", "MRI"]
    access: Literal["public", "credentialed", "private"]
    license: str
    source: list[str] = Field(min_length=1)  # pages, hub ids (hf://...), DOIs
    citation: str
    description: str
    layout: str  # the official on-disk layout the prepare step reads
    intensity: Literal["HU", "arbitrary"] = "HU"
    tables: dict[str, Table] = Field(min_length=1)

    def table(self, name: str) -> Table:
        if name not in self.tables:
            raise KeyError(f"dataset {self.name!r} has no table {name!r}; it has {sorted(self.tables)}")
        return self.tables[name]


def card_path(name: str) -> Path:
    return resource_dir("datasets") / f"{name}.yaml"


@lru_cache(maxsize=None)
def load_card(name: str) -> DatasetCard:
    path = card_path(name)
    if not path.is_file():
        known = ", ".join(dataset_names())
        raise KeyError(f"unknown dataset {name!r}: no card {path}; known datasets: {known}")
    card = load_model(DatasetCard, path)
    if card.name != path.stem:
        raise SchemaError(path, [("name", f"must equal the file name {path.stem!r}, got {card.name!r}")])
    return card


def dataset_names() -> list[str]:
    return sorted(p.stem for p in resource_dir("datasets").glob("*.yaml"))
