"""The model directory's `epee.yaml`: task, labels, backbone and head shape (docs/design.md, "Model directory").

Every error a user can hit names the file and the key, and says what was expected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("text-classification", "multi-label", "relation-extraction", "image-classification")


TEXT_TASKS = TASKS[:3]


FORMAT_VERSION = 1

RUNTIMES = ("torch", "onnxruntime")  # where float32 layers run (engine/onnx_layers.py)


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the source and key."""


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in data:
        raise ConfigError(f"{source}: missing key '{key}'")
    return check_type(data[key], key, kind, source)


def check_type(value: Any, key: str, kind: type | tuple[type, ...], source: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    bad_bool = isinstance(value, bool) and bool not in kinds
    if bad_bool or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{source}: '{key}' must be {names}, got {value!r}")
    return value


def hash_files(paths: list[Path], root: Path) -> str:
    """sha256 over the files' paths (relative to `root`) and contents: a fingerprint of what they hold."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """YAML text that must hold a mapping; a syntax error names `source` and the line, e.g.
    `model.yaml, line 3, column 1: not valid YAML: expected ',' or ']' (while parsing a flow sequence)`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{source}{_yaml_place(error, text)}: not valid YAML: {_yaml_problem(error)}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    return data


def _yaml_place(error: yaml.YAMLError, text: str) -> str:
    """`, line L, column C` of a YAML error (1-based), when PyYAML knows it."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f", line {mark.line + 1}, column {mark.column + 1}"
    position = getattr(error, "position", None)  # a reader error (a forbidden character) counts characters
    if position is None:
        return ""
    line, line_start = text.count("\n", 0, position) + 1, text.rfind("\n", 0, position) + 1
    return f", line {line}, column {position - line_start + 1}"


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML found wrong, without its `in "<unicode string>"` locations."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return f"{problem} ({context})" if context else problem


@dataclass
class ModelSpec:
    """What `epee.yaml` in a model directory says about the model: task, labels, backbone and head shape."""

    task: str
    labels: list[str]
    backbone: str
    pooling: str
    num_layers: int
    hidden_size: int
    head_dropout: float = 0.1
    max_length: int = 128
    entity_markers: list[str] = field(default_factory=list)
    negative_label: str | None = None
    image_size: int | None = None  # image-classification: square input side the backbone takes
    num_channels: int | None = None  # image-classification: 3 (grey images are repeated) or 1
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "epee.yaml") -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise ConfigError(f"{source}: unknown key '{key}' (expected: {', '.join(sorted(known))})")
        task = _require(data, "task", str, source)
        if task not in TASKS:
            raise ConfigError(f"{source}: 'task' must be one of {', '.join(TASKS)}, got {task!r}")
        labels = _require(data, "labels", list, source)
        if (
            len(labels) < 1
            or not all(isinstance(label, str) for label in labels)
            or len(set(labels)) != len(labels)
        ):
            raise ConfigError(f"{source}: 'labels' must be a non-empty list of distinct strings")
        if task != "multi-label" and len(labels) < 2:
            raise ConfigError(f"{source}: 'labels' needs at least 2 classes for task {task}")
        spec = cls(
            task=task,
            labels=labels,
            backbone=_require(data, "backbone", str, source),
            pooling=_require(data, "pooling", str, source),
            num_layers=_require(data, "num_layers", int, source),
            hidden_size=_require(data, "hidden_size", int, source),
            head_dropout=float(
                check_type(data.get("head_dropout", 0.1), "head_dropout", (int, float), source)
            ),
            max_length=check_type(data.get("max_length", 128), "max_length", int, source),
            entity_markers=check_type(data.get("entity_markers", []), "entity_markers", list, source),
            negative_label=check_type(
                data.get("negative_label"), "negative_label", (str, type(None)), source
            ),
            image_size=check_type(data.get("image_size"), "image_size", (int, type(None)), source),
            num_channels=check_type(data.get("num_channels"), "num_channels", (int, type(None)), source),
            training=check_type(data.get("training", {}), "training", dict, source),
            format_version=check_type(
                data.get("format_version", FORMAT_VERSION), "format_version", int, source
            ),
        )
        if spec.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"{source}: format_version {spec.format_version} is newer than this epee ({FORMAT_VERSION})"
            )
        if spec.num_layers < 1 or spec.hidden_size < 1 or spec.max_length < 1:
            raise ConfigError(f"{source}: 'num_layers', 'hidden_size' and 'max_length' must be positive")
        if task == "image-classification":
            if spec.image_size is None or spec.image_size < 1:
                raise ConfigError(f"{source}: 'image_size' must be a positive integer for task {task}")
            if spec.num_channels not in (1, 3):
                raise ConfigError(f"{source}: 'num_channels' must be 1 or 3 for task {task}")
        elif spec.image_size is not None or spec.num_channels is not None:
            raise ConfigError(f"{source}: 'image_size' and 'num_channels' are only for image-classification")
        if spec.negative_label is not None and spec.negative_label not in spec.labels:
            raise ConfigError(f"{source}: 'negative_label' {spec.negative_label!r} is not one of 'labels'")
        return spec

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        return cls.from_dict(read_yaml(path), source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            yaml.safe_dump(asdict(self), sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
