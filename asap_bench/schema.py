"""Shared pieces of every YAML-backed schema: strict models, loading, errors, hashing.

Protocols, dataset cards and encoder cards all come from YAML written by
people. They share one loader so a mistake is reported the same way
everywhere: the file, the field, and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """A model that refuses unknown fields, so a typo is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SchemaError(ValueError):
    """A YAML file that does not match its schema; ``problems`` lists (field, message)."""

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]):
        self.path = str(path)
        self.problems = problems
        lines = [f"{self.path}: {len(problems)} problem(s)"]
        lines += [f"  field '{field}': {message}" for field, message in problems]
        super().__init__("\n".join(lines))


def read_yaml(path: Path | str) -> dict[str, Any]:
    """Parse a YAML mapping, naming the file (and line) on a syntax error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(path, [("<file>", "file does not exist")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SchemaError(path, [("<yaml>", f"not valid YAML at {where}: {getattr(err, 'problem', err)}")]) from None
    if not isinstance(data, dict):
        raise SchemaError(path, [("<root>", f"expected a mapping of fields, got {type(data).__name__}")])
    return data


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    field = ".".join(str(part) for part in error["loc"]) or "<root>"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field (not part of the schema; check its spelling)"
    elif error["type"] != "missing" and "input" in error:
        shown = repr(error["input"])
        message = f"{message} (got {shown[:80]})"
    return field, message


def parse_model(model: type[M], data: dict[str, Any], path: Path | str) -> M:
    """Validate ``data`` against ``model``; raise SchemaError naming file and fields."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SchemaError(path, [_describe(e) for e in err.errors()]) from None


def load_model(model: type[M], path: Path | str) -> M:
    return parse_model(model, read_yaml(path), path)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte form every hash is taken over."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
