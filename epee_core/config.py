"""Validated configuration: the model directory's `epee.yaml` and the `epee:` section of a TorchServe model YAML.

Every error a user can hit names the file and the key, and says what was expected (DESIGN §5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .policies import ALL_PARAM_KEYS, Policy, PolicyError, make_policy

TASKS = ("text-classification", "multi-label", "relation-extraction", "image-classification")
TEXT_TASKS = TASKS[:3]
FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the source and key."""


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in data:
        raise ConfigError(f"{source}: missing key '{key}'")
    return _check_type(data[key], key, kind, source)


def _check_type(value: Any, key: str, kind: type | tuple[type, ...], source: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    bad_bool = isinstance(value, bool) and bool not in kinds
    if bad_bool or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{source}: '{key}' must be {names}, got {value!r}")
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


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
                _check_type(data.get("head_dropout", 0.1), "head_dropout", (int, float), source)
            ),
            max_length=_check_type(data.get("max_length", 128), "max_length", int, source),
            entity_markers=_check_type(data.get("entity_markers", []), "entity_markers", list, source),
            negative_label=_check_type(
                data.get("negative_label"), "negative_label", (str, type(None)), source
            ),
            image_size=_check_type(data.get("image_size"), "image_size", (int, type(None)), source),
            num_channels=_check_type(data.get("num_channels"), "num_channels", (int, type(None)), source),
            training=_check_type(data.get("training", {}), "training", dict, source),
            format_version=_check_type(
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


SERVE_KEYS = {
    "task": str,
    "policy": str,
    "max_length": int,
    "allow_request_override": bool,
    "max_body_bytes": int,
    "max_text_chars": int,
    "max_image_pixels": int,
    "num_threads": int,
    "log_inputs": bool,
}


@dataclass
class ServeConfig:
    """The `epee:` section of a model YAML: which policy to run and the limits of the serving handler.

    Parameters of several policies may sit side by side (so a request may switch policy); the default policy
    takes the ones it uses.
    """

    task: str | None = None
    policy: Policy = field(default_factory=lambda: make_policy("epee"))
    policy_params: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None
    allow_request_override: bool = True
    max_body_bytes: int = 1_000_000
    max_text_chars: int = 20_000
    max_image_pixels: int = 4096 * 4096  # image-classification: width × height, checked before decoding
    num_threads: int | None = None
    log_inputs: bool = False  # debugging on synthetic data only: writes request bodies to the logs (PHI!)

    @classmethod
    def from_section(
        cls, section: Mapping[str, Any] | None, source: str = "model YAML 'epee:'"
    ) -> ServeConfig:
        section = dict(section or {})
        settings: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for key, value in section.items():
            if key in SERVE_KEYS:
                settings[key] = _check_type(value, key, SERVE_KEYS[key], source)
            elif key in ALL_PARAM_KEYS:
                params[key] = value
            else:
                allowed = ", ".join(sorted(set(SERVE_KEYS) | ALL_PARAM_KEYS))
                raise ConfigError(f"{source}: unknown key '{key}' (expected one of: {allowed})")
        task = settings.get("task")
        if task is not None and task not in TASKS:
            raise ConfigError(f"{source}: 'task' must be one of {', '.join(TASKS)}, got {task!r}")
        for key in ("max_length", "max_body_bytes", "max_text_chars", "max_image_pixels", "num_threads"):
            if key in settings and settings[key] < 1:
                raise ConfigError(f"{source}: '{key}' must be a positive integer, got {settings[key]!r}")
        try:
            policy = make_policy(settings.pop("policy", "epee"), params, strict=False)
            for name in ("epee", "patience", "entropy", "fpabee", "max_prob"):
                make_policy(
                    name, params, strict=False
                )  # an override may pick any policy: check all values now
        except PolicyError as error:
            raise ConfigError(f"{source}: {error}") from None
        return cls(policy=policy, policy_params=params, **settings)

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        """Read the `epee:` section of a model YAML file."""
        data = read_yaml(path)
        if "epee" not in data:
            raise ConfigError(f"{path}: no 'epee:' section")
        return cls.from_section(data["epee"], source=f"{path} 'epee:'")

    def check_model(self, spec: ModelSpec, source: str, model: str = "the model") -> None:
        """ConfigError unless this section can serve `spec`: the same task, a policy within its layers."""
        if self.task is not None and self.task != spec.task:
            raise ConfigError(
                f"{source}: 'task' is {self.task} but {model} is a {spec.task} model "
                f"(a YAML for task '{self.task}' cannot serve it)"
            )
        try:
            self.policy.check_layers(spec.num_layers)
        except PolicyError as error:
            raise ConfigError(f"{source}: {error}") from None

    def policy_for(self, override: Mapping[str, Any] | None) -> Policy:
        """The policy a request asks for (`{"policy": name, ...params}`), else the configured one."""
        if not override:
            return self.policy
        override = dict(override)
        name = override.pop("policy", self.policy.name)
        if not isinstance(name, str):
            raise PolicyError(f"'policy' must be a string, got {name!r}")
        if name == "oracle":
            raise PolicyError("policy 'oracle' needs gold labels and cannot be served")
        base = make_policy(name, self.policy_params, strict=False).params
        return make_policy(name, {**base, **override}, strict=True) if override else make_policy(name, base)
