"""Exit policies (docs/design.md, "Policies") as pure functions over one layer's exit logits for a whole batch.

A policy never keeps hidden state: everything it remembers between layers lives in a `PolicyState`, a tuple of
per-row tensors that the runner compacts together with the hidden states. The same `policy_step` therefore serves
the live runner (rows leave the batch as they exit) and offline replay over cached logits (calibration).

Every policy is one small rule function plus one entry in `POLICIES`: its parameters, which exits it reads,
whether it can be served, its calibration grid, whether a certified calibration tries it by default, whether it
needs the learned gate, and its plot style. The runner, the serving configuration, calibration's search and plot,
and the tests iterate the registry, so adding a policy touches this file only (plus its row in the table of
docs/design.md, "Policies"). The signals a rule reads live in `signals.py`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, NamedTuple

import torch

from .signals import (
    SIMILARITIES,
    confidence,
    count_run,
    divergence,
    gate_features,
    layer_probs,
    normalised_entropy,
    predictions,
    stable_count,
)

ENSEMBLES = ("last", "window_mean")
MAX_INTEGER_PARAM = 10_000  # layers and patience: far above any model's depth


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
        name = "an integer" if self.kind is int else "a finite number"
        if self.kind is int and self.high is None:
            return f"{name} in [{self.low}, {MAX_INTEGER_PARAM}]"
        if self.low is not None and self.high is not None:
            left = "[" if self.low_inclusive else "("
            return f"{name} in {left}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{name} {'>=' if self.low_inclusive else '>'} {self.low}"
        return name


_MIN_LAYER = ParamSpec(int, 1, low=1)
_TAU = ParamSpec(float, 0.2, low=0.0, high=1.0, low_inclusive=False)
_PATIENCE = ParamSpec(int, 2, low=1)


def _coerce(policy: str, key: str, spec: ParamSpec, value: Any) -> Any:
    """Check a YAML or request value (or parse a `--set` string) against the parameter's exact type and range.

    An integer parameter takes integers only (no 2.0, no 1e308) up to `MAX_INTEGER_PARAM`; a number must be finite.
    """
    problem = f"policy '{policy}': '{key}' must be {spec.describe()}, got {value!r}"
    if spec.kind is str:
        if not isinstance(value, str) or value not in spec.choices:
            raise PolicyError(problem)
        return value
    if isinstance(value, bool):
        raise PolicyError(problem)
    if isinstance(value, str):
        try:
            value = int(value.strip()) if spec.kind is int else float(value.strip())
        except ValueError:
            raise PolicyError(problem) from None
    if spec.kind is int:
        if not isinstance(value, int):
            raise PolicyError(problem)
    elif not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PolicyError(problem)
    else:
        value = float(value)
    high = spec.high if spec.high is not None or spec.kind is not int else MAX_INTEGER_PARAM
    if spec.low is not None and (value < spec.low or (value == spec.low and not spec.low_inclusive)):
        raise PolicyError(problem)
    if high is not None and value > high:
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
    if name not in POLICIES:
        raise PolicyError(f"unknown policy '{name}': expected one of {', '.join(POLICY_NAMES)}")
    specs = {"min_layer": _MIN_LAYER, **POLICIES[name].params}
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
    length: torch.Tensor  # [B] float: the row's length in tokens (the learned gate reads it)

    def select(self, rows: torch.Tensor) -> PolicyState:
        return PolicyState(*(t.index_select(0, rows) for t in self))


def init_state(
    batch_size: int,
    num_outputs: int,
    device: torch.device | str = "cpu",
    lengths: torch.Tensor | None = None,
) -> PolicyState:
    """The state before layer 1; `lengths` [B]: each row's real tokens (the padding mask's row sums)."""
    zeros = torch.zeros(batch_size, num_outputs, device=device)
    length = torch.zeros(batch_size, device=device) if lengths is None else lengths.to(device).float()
    return PolicyState(torch.zeros(batch_size, dtype=torch.long, device=device), zeros, zeros.clone(), length)


class StepOutput(NamedTuple):
    exit_mask: torch.Tensor  # [B] bool: rows that leave at this layer
    state: PolicyState
    probs: torch.Tensor  # [B, C]: the distribution a row returns if it exits here
    entropy: torch.Tensor  # [B]: normalised entropy H_i of this layer


class Signals(NamedTuple):
    """What a rule sees at one layer for the rows still running."""

    probs: torch.Tensor  # [B, C] this layer's probabilities
    entropy: torch.Tensor  # [B] normalised entropy
    state: PolicyState
    layer: int  # 1-based
    multi_label: bool
    labels: torch.Tensor | None  # gold labels, `oracle` only
    num_layers: int = 0
    gate: Any = None  # the model's learned exit gate (`engine/gate.py`), `gate` only


class Decision(NamedTuple):
    """A rule's answer: which rows fire, its new state, and the distribution a row returns if it exits here."""

    fire: torch.Tensor  # [B] bool
    state: PolicyState
    output: torch.Tensor  # [B, C]


def _never(params: dict, s: Signals) -> Decision:
    """full: run every layer."""
    return Decision(
        torch.zeros_like(s.entropy, dtype=torch.bool), s.state._replace(prev_probs=s.probs), s.probs
    )


def _static(params: dict, s: Signals) -> Decision:
    """static: every row leaves at `layer`."""
    fire = torch.full_like(s.entropy, s.layer == params["layer"], dtype=torch.bool)
    return Decision(fire, s.state._replace(prev_probs=s.probs), s.probs)


def _max_prob(params: dict, s: Signals) -> Decision:
    """max_prob: the top probability reaches `threshold`; multi-label: every label's decision is that confident."""
    fire = confidence(s.probs, s.multi_label) >= params["threshold"]
    return Decision(fire, s.state._replace(prev_probs=s.probs), s.probs)


def _entropy(params: dict, s: Signals) -> Decision:
    """entropy (DeeBERT): normalised entropy below `entropy_threshold`."""
    return Decision(s.entropy < params["entropy_threshold"], s.state._replace(prev_probs=s.probs), s.probs)


def _patience(params: dict, s: Signals) -> Decision:
    """patience (PABEE): the prediction stayed the same for `patience` consecutive layers."""
    counter = stable_count(s.probs, s.state.prev_probs, s.state.counter, s.layer, s.multi_label)
    return Decision(
        counter >= params["patience"], s.state._replace(counter=counter, prev_probs=s.probs), s.probs
    )


def _epee(params: dict, s: Signals) -> Decision:
    """EPEE: `patience` consecutive confident layers (entropy < τ), or one very confident layer (< fast_ratio·τ);
    `window_mean` returns the mean distribution over the confident run."""
    tau, probs = params["entropy_threshold"], s.probs
    confident = s.entropy < tau
    counter = count_run(confident, s.state.counter)
    run_probs_sum = torch.where(
        confident.unsqueeze(-1), s.state.run_probs_sum + probs, torch.zeros_like(probs)
    )
    fire = (counter >= params["patience"]) | (s.entropy < params["fast_ratio"] * tau)
    output = probs
    if params["ensemble"] == "window_mean":
        run_length = counter.clamp_min(1).unsqueeze(-1).to(probs.dtype)
        output = torch.where(confident.unsqueeze(-1), run_probs_sum / run_length, probs)
    return Decision(
        fire, s.state._replace(counter=counter, prev_probs=probs, run_probs_sum=run_probs_sum), output
    )


def _fpabee(params: dict, s: Signals) -> Decision:
    """F-PABEE: consecutive layers' distributions stay within `similarity_threshold` for `patience` layers."""
    distance = divergence(s.state.prev_probs, s.probs, params["similarity"], s.multi_label)
    counter = count_run((distance < params["similarity_threshold"]) & (s.layer > 1), s.state.counter)
    return Decision(
        counter >= params["patience"], s.state._replace(counter=counter, prev_probs=s.probs), s.probs
    )


def _oracle(params: dict, s: Signals) -> Decision:
    """oracle: the first exit whose prediction is correct (an evaluation-only upper bound: needs gold labels)."""
    if s.labels is None:
        raise PolicyError("policy 'oracle' needs gold labels: it is an evaluation-only upper bound")
    correct = predictions(s.probs, s.multi_label) == (s.labels.bool() if s.multi_label else s.labels)
    fire = correct.all(-1) if s.multi_label else correct
    return Decision(fire, s.state._replace(prev_probs=s.probs), s.probs)


def require_gate(policy: Policy, gate: Any) -> None:
    """A policy that reads the model's learned gate (`needs_gate`) needs one: name the missing file otherwise."""
    if POLICIES[policy.name].needs_gate and gate is None:
        raise PolicyError(
            f"policy '{policy.name}' needs a learned exit gate, and the model directory has no gate.safetensors "
            "(train one with `epee train-gate`)"
        )


def _gate(params: dict, s: Signals) -> Decision:
    """gate: the learned gate's probability that this layer's prediction is full depth's reaches
    `gate_threshold`."""
    state = s.state
    stable = stable_count(s.probs, state.prev_probs, state.counter, s.layer, s.multi_label)
    features = gate_features(
        s.probs, state.prev_probs, stable, s.layer, s.num_layers, state.length, s.multi_label
    )
    fire = s.gate(features) >= params["gate_threshold"]
    return Decision(fire, state._replace(counter=stable, prev_probs=s.probs), s.probs)


class PlotStyle(NamedTuple):
    """How calibration's Pareto plot draws a policy's settings: plain data, so the engine needs no matplotlib."""

    colour: str
    marker: str = "o"


def below_depth(num_layers: int) -> range:
    """1 … L − 1, a grid axis for layers and patiences: the values that can still save a layer."""
    return range(1, num_layers)


@dataclass(frozen=True)
class PolicyRule:
    """Everything about one policy: its rule, its parameters, which exits it reads, and how calibration searches
    and draws it.

    `reads` says from which layer on the runner must compute exits for it: `last` (only the final exit), `layer`
    (only the `layer` parameter's exit), `own` (each layer's exit on its own, from `min_layer` on: no state
    across layers) or `every` (counters that start at layer 1 whatever `min_layer` is).

    `grid` is the calibration sweep's search space: each parameter's values (a tuple, or `below_depth`), crossed
    in the order given, the last varying fastest; no grid, no search. `certify_by_default`: a certified
    calibration (`--guarantee`) searches it unless `--policies` says otherwise. `needs_gate`: it reads the
    model's learned exit gate (`gate.safetensors`).
    """

    rule: Callable[[dict, Signals], Decision]
    params: dict[str, ParamSpec] = field(default_factory=dict)
    _: KW_ONLY
    style: PlotStyle
    reads: str = "every"
    servable: bool = True
    grid: dict[str, tuple | Callable[[int], Iterable]] = field(default_factory=dict)
    certify_by_default: bool = False
    needs_gate: bool = False

    def grid_settings(self, num_layers: int) -> list[dict[str, Any]]:
        """The grid's parameter sets for a model of `num_layers` layers, in a fixed order (earlier wins ties)."""
        if not self.grid:
            return []
        axes = [values(num_layers) if callable(values) else values for values in self.grid.values()]
        return [dict(zip(self.grid, values)) for values in itertools.product(*axes)]


# Certified calibration leaves out `static` and `fpabee` by default: a fixed-sequence test stops at its first
# failure, and their settings that lost nothing on the ordering rows tended to lead the sequence and fail on the
# test rows (docs/calibration.md).
POLICIES: dict[str, PolicyRule] = {
    "full": PolicyRule(_never, reads="last", style=PlotStyle("tab:red", "s")),
    "static": PolicyRule(
        _static,
        {"layer": ParamSpec(int, 1, low=1)},
        reads="layer",
        grid={"layer": below_depth},
        style=PlotStyle("tab:gray"),
    ),
    "max_prob": PolicyRule(
        _max_prob,
        {"threshold": ParamSpec(float, 0.9, low=0.0, high=1.0, low_inclusive=False)},
        reads="own",
        grid={"threshold": (0.55, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)},
        certify_by_default=True,
        style=PlotStyle("tab:pink"),
    ),
    "entropy": PolicyRule(
        _entropy,
        {"entropy_threshold": _TAU},
        reads="own",
        grid={
            "entropy_threshold": (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15)
            + (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
        },
        certify_by_default=True,
        style=PlotStyle("tab:blue"),
    ),
    "patience": PolicyRule(
        _patience,
        {"patience": _PATIENCE},
        grid={"patience": below_depth},
        certify_by_default=True,
        style=PlotStyle("tab:green"),
    ),
    "epee": PolicyRule(
        _epee,
        {
            "entropy_threshold": _TAU,
            "patience": _PATIENCE,
            "fast_ratio": ParamSpec(float, 0.25, low=0.0, high=1.0),
            "ensemble": ParamSpec(str, "last", choices=ENSEMBLES),
        },
        grid={
            "entropy_threshold": (0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
            "patience": below_depth,
            "fast_ratio": (0.0, 0.25, 0.5),
            "ensemble": ENSEMBLES,
        },
        certify_by_default=True,
        style=PlotStyle("tab:orange"),
    ),
    "fpabee": PolicyRule(
        _fpabee,
        {
            "similarity": ParamSpec(str, "jsd", choices=SIMILARITIES),
            "similarity_threshold": ParamSpec(float, 0.01, low=0.0, low_inclusive=False),
            "patience": _PATIENCE,
        },
        grid={
            "similarity": SIMILARITIES,
            "similarity_threshold": (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3),
            "patience": below_depth,
        },
        style=PlotStyle("tab:purple"),
    ),
    "gate": PolicyRule(
        _gate,
        {"gate_threshold": ParamSpec(float, 0.9, low=0.0, high=1.0, low_inclusive=False)},
        # A class-balanced gate (`epee train-gate`'s default) spreads its useful settings over 0.4-0.95 (ADE); an
        # unbalanced one crowds them into 0.95-0.995.
        grid={
            "gate_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
        },
        certify_by_default=True,
        needs_gate=True,
        style=PlotStyle("tab:olive"),
    ),
    "oracle": PolicyRule(_oracle, reads="own", servable=False, style=PlotStyle("tab:cyan", "D")),
}
POLICY_NAMES = tuple(POLICIES)
SERVABLE_POLICIES = tuple(name for name, rule in POLICIES.items() if rule.servable)
POLICY_PARAMS = {name: rule.params for name, rule in POLICIES.items()}
ALL_PARAM_KEYS = frozenset({"min_layer"} | {key for rule in POLICIES.values() for key in rule.params})


def first_exit_read(policy: Policy, num_layers: int) -> int:
    """The first layer (1-based) whose exit the policy needs; the runner skips exit heads and policy before it."""
    reads = POLICIES[policy.name].reads
    if reads == "last":
        return num_layers
    if reads == "layer":
        layer = policy.params["layer"]
        return layer if layer >= policy.min_layer else num_layers
    if reads == "own":
        return policy.min_layer
    return 1


def policy_step(
    policy: Policy,
    logits: torch.Tensor,
    state: PolicyState,
    layer: int,
    num_layers: int,
    multi_label: bool = False,
    labels: torch.Tensor | None = None,
    gate: Any = None,
) -> StepOutput:
    """Apply one layer's exit logits [B, C] for the rows still running; `layer` counts from 1.

    `labels` (class index [B], or multi-hot [B, C] for multi-label) is needed by `oracle` only, `gate` (the
    model's `ExitGate`) by `gate` only.
    """
    require_gate(policy, gate)
    probs = layer_probs(logits, multi_label)
    entropy = normalised_entropy(probs, multi_label)
    signals = Signals(probs, entropy, state, layer, multi_label, labels, num_layers, gate)
    decision = POLICIES[policy.name].rule(policy.params, signals)
    fire = decision.fire & (layer >= policy.min_layer)
    exit_mask = fire | (layer >= num_layers)
    return StepOutput(exit_mask, decision.state, decision.output, entropy)
