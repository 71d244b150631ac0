"""Exit policies (DESIGN §3) as pure functions over one layer's exit logits for a whole batch.

A policy never keeps hidden state: everything it remembers between layers lives in a `PolicyState`, a tuple of
per-row tensors that the runner compacts together with the hidden states. The same `policy_step` therefore serves
the live runner (rows leave the batch as they exit) and offline replay over cached logits (calibration).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

POLICY_NAMES = ("full", "static", "max_prob", "entropy", "patience", "epee", "fpabee", "oracle")
SIMILARITIES = ("kl", "reverse_kl", "jsd")
ENSEMBLES = ("last", "window_mean")
_EPS = 1e-12


class PolicyError(ValueError):
    """A policy name or parameter that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ParamSpec:
    """One policy parameter: its type, default and allowed range (or choices)."""

    kind: type
    default: Any
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        name = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            left = "[" if self.low_inclusive else "("
            return f"{name} in {left}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{name} {'>=' if self.low_inclusive else '>'} {self.low}"
        return name


_MIN_LAYER = ParamSpec(int, 1, low=1)
_TAU = ParamSpec(float, 0.2, low=0.0, high=1.0, low_inclusive=False)
_PATIENCE = ParamSpec(int, 2, low=1)

POLICY_PARAMS: dict[str, dict[str, ParamSpec]] = {
    "full": {},
    "static": {"layer": ParamSpec(int, 1, low=1)},
    "max_prob": {"threshold": ParamSpec(float, 0.9, low=0.0, high=1.0, low_inclusive=False)},
    "entropy": {"entropy_threshold": _TAU},
    "patience": {"patience": _PATIENCE},
    "epee": {
        "entropy_threshold": _TAU,
        "patience": _PATIENCE,
        "fast_ratio": ParamSpec(float, 0.25, low=0.0, high=1.0),
        "ensemble": ParamSpec(str, "last", choices=ENSEMBLES),
    },
    "fpabee": {
        "similarity": ParamSpec(str, "jsd", choices=SIMILARITIES),
        "similarity_threshold": ParamSpec(float, 0.01, low=0.0, low_inclusive=False),
        "patience": _PATIENCE,
    },
    "oracle": {},
}
ALL_PARAM_KEYS = frozenset({"min_layer"} | {key for spec in POLICY_PARAMS.values() for key in spec})


def _coerce(policy: str, key: str, spec: ParamSpec, value: Any) -> Any:
    """Turn a YAML value or a `--set` string into the parameter's type, checking its range."""
    problem = f"policy '{policy}': '{key}' must be {spec.describe()}, got {value!r}"
    if spec.kind is str:
        if not isinstance(value, str) or value not in spec.choices:
            raise PolicyError(problem)
        return value
    if isinstance(value, bool):
        raise PolicyError(problem)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise PolicyError(problem) from None
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise PolicyError(problem)
    if spec.kind is int:
        if float(value) != int(value):
            raise PolicyError(problem)
        value = int(value)
    else:
        value = float(value)
    if spec.low is not None and (value < spec.low or (value == spec.low and not spec.low_inclusive)):
        raise PolicyError(problem)
    if spec.high is not None and value > spec.high:
        raise PolicyError(problem)
    return value


@dataclass(frozen=True)
class Policy:
    """A validated policy: its name and every parameter it uses (defaults filled in)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def min_layer(self) -> int:
        return self.params.get("min_layer", 1)

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()) if k != "min_layer" or v != 1)
        return f"{self.name}({inner})" if inner else self.name

    def check_layers(self, num_layers: int) -> None:
        """Fail early when a layer-valued parameter does not fit a model of `num_layers` layers."""
        for key in ("layer", "min_layer"):
            if self.params.get(key, 1) > num_layers:
                raise PolicyError(
                    f"policy '{self.name}': '{key}' is {self.params[key]} but the model has {num_layers} layers"
                )


def make_policy(name: str, params: Mapping[str, Any] | None = None, strict: bool = True) -> Policy:
    """Validate a policy name and its parameters.

    strict=True (CLI `--set`, request overrides) rejects keys the policy does not use; strict=False (a model YAML,
    which holds parameters for several policies so requests may switch) ignores keys of other policies. Keys that
    no policy knows are always rejected.
    """
    if name not in POLICY_PARAMS:
        raise PolicyError(f"unknown policy '{name}': expected one of {', '.join(POLICY_NAMES)}")
    specs = {"min_layer": _MIN_LAYER, **POLICY_PARAMS[name]}
    params = dict(params or {})
    for key in params:
        if key not in ALL_PARAM_KEYS:
            raise PolicyError(
                f"unknown policy parameter '{key}': expected one of {', '.join(sorted(ALL_PARAM_KEYS))}"
            )
        if strict and key not in specs:
            raise PolicyError(f"policy '{name}' takes no parameter '{key}' (it takes: {', '.join(specs)})")
    resolved = {}
    for key, spec in specs.items():
        resolved[key] = _coerce(name, key, spec, params[key]) if key in params else spec.default
    return Policy(name, resolved)


class PolicyState(NamedTuple):
    """What a policy remembers per row between layers. Rows are compacted with `select`."""

    counter: torch.Tensor  # [B] long: patience / confident-run counter
    prev_probs: torch.Tensor  # [B, C]: the previous layer's probabilities
    run_probs_sum: (
        torch.Tensor
    )  # [B, C]: sum of probabilities over the current confident run (EPEE window_mean)

    def select(self, rows: torch.Tensor) -> PolicyState:
        return PolicyState(*(t.index_select(0, rows) for t in self))


def init_state(batch_size: int, num_outputs: int, device: torch.device | str = "cpu") -> PolicyState:
    """The state before layer 1."""
    zeros = torch.zeros(batch_size, num_outputs, device=device)
    return PolicyState(torch.zeros(batch_size, dtype=torch.long, device=device), zeros, zeros.clone())


class StepOutput(NamedTuple):
    exit_mask: torch.Tensor  # [B] bool: rows that leave at this layer
    state: PolicyState
    probs: torch.Tensor  # [B, C]: the distribution a row returns if it exits here
    entropy: torch.Tensor  # [B]: normalised entropy H_i of this layer


def layer_probs(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """p_i: softmax over classes, or an independent sigmoid per label."""
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def _as_distributions(probs: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """View probabilities as categorical distributions over the last dim: multi-label → [B, C, 2] Bernoullis."""
    return torch.stack((probs, 1.0 - probs), dim=-1) if multi_label else probs


def normalised_entropy(probs: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """H_i in [0, 1]: entropy / log C (single-label) or mean binary entropy / log 2 (multi-label)."""
    dist = _as_distributions(probs, multi_label)
    entropy = -(dist * torch.log(dist.clamp_min(_EPS))).sum(-1)
    if multi_label:
        return entropy.mean(-1) / math.log(2.0)
    return entropy / math.log(probs.shape[-1]) if probs.shape[-1] > 1 else torch.zeros_like(entropy)


def divergence(p: torch.Tensor, q: torch.Tensor, similarity: str, multi_label: bool) -> torch.Tensor:
    """D(p, q) per row: KL(p‖q), KL(q‖p) or Jensen–Shannon (natural log); multi-label: mean over labels."""
    p, q = _as_distributions(p, multi_label), _as_distributions(q, multi_label)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (torch.log(a.clamp_min(_EPS)) - torch.log(b.clamp_min(_EPS)))).sum(-1)

    if similarity == "kl":
        value = kl(p, q)
    elif similarity == "reverse_kl":
        value = kl(q, p)
    elif similarity == "jsd":
        mid = 0.5 * (p + q)
        value = 0.5 * kl(p, mid) + 0.5 * kl(q, mid)
    else:
        raise PolicyError(f"unknown similarity '{similarity}': expected one of {', '.join(SIMILARITIES)}")
    return value.mean(-1) if multi_label else value


def predictions(probs: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Class index per row, or the label set {p >= 0.5} as a bool [B, C] mask."""
    return probs >= 0.5 if multi_label else probs.argmax(-1)


def _same_prediction(a: torch.Tensor, b: torch.Tensor, multi_label: bool) -> torch.Tensor:
    equal = predictions(a, multi_label) == predictions(b, multi_label)
    return equal.all(-1) if multi_label else equal


def _count(condition: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """counter + 1 where the condition holds, else 0."""
    return torch.where(condition, counter + 1, torch.zeros_like(counter))


def policy_step(
    policy: Policy,
    logits: torch.Tensor,
    state: PolicyState,
    layer: int,
    num_layers: int,
    multi_label: bool = False,
    labels: torch.Tensor | None = None,
) -> StepOutput:
    """Apply one layer's exit logits [B, C] for the rows still running; `layer` counts from 1.

    `labels` (class index [B], or multi-hot [B, C] for multi-label) is needed by `oracle` only.
    """
    probs = layer_probs(logits, multi_label)
    entropy = normalised_entropy(probs, multi_label)
    counter, run_probs_sum = state.counter, state.run_probs_sum
    output = probs
    name, params = policy.name, policy.params

    if name == "full":
        fire = torch.zeros_like(entropy, dtype=torch.bool)
    elif name == "static":
        fire = torch.full_like(entropy, layer == params["layer"], dtype=torch.bool)
    elif name == "max_prob":
        # Multi-label: every label's decision must be confident, i.e. min over labels of max(p, 1 - p).
        confidence = torch.maximum(probs, 1 - probs).amin(-1) if multi_label else probs.amax(-1)
        fire = confidence >= params["threshold"]
    elif name == "entropy":
        fire = entropy < params["entropy_threshold"]
    elif name == "patience":
        unchanged = _same_prediction(probs, state.prev_probs, multi_label) & (layer > 1)
        counter = _count(unchanged, counter)
        fire = counter >= params["patience"]
    elif name == "epee":
        tau = params["entropy_threshold"]
        confident = entropy < tau
        counter = _count(confident, counter)
        run_probs_sum = torch.where(confident.unsqueeze(-1), run_probs_sum + probs, torch.zeros_like(probs))
        fire = (counter >= params["patience"]) | (entropy < params["fast_ratio"] * tau)
        if params["ensemble"] == "window_mean":
            run_length = counter.clamp_min(1).unsqueeze(-1).to(probs.dtype)
            output = torch.where(confident.unsqueeze(-1), run_probs_sum / run_length, probs)
    elif name == "fpabee":
        similar = (
            divergence(state.prev_probs, probs, params["similarity"], multi_label)
            < params["similarity_threshold"]
        )
        counter = _count(similar & (layer > 1), counter)
        fire = counter >= params["patience"]
    elif name == "oracle":
        if labels is None:
            raise PolicyError("policy 'oracle' needs gold labels: it is an evaluation-only upper bound")
        correct = predictions(probs, multi_label) == (labels.bool() if multi_label else labels)
        fire = correct.all(-1) if multi_label else correct
    else:  # make_policy already rejects unknown names
        raise PolicyError(f"unknown policy '{name}'")

    fire = fire & (layer >= policy.min_layer)
    exit_mask = fire | (layer >= num_layers)
    return StepOutput(exit_mask, PolicyState(counter, probs, run_probs_sum), output, entropy)
