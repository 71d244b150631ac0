"""The sweep: every policy setting replayed on the cache, scored on the calibration and held-back slices; the
Pareto frontier (metric vs average exit layer) and the choice under an accuracy budget or a speed-up target."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..engine.policies import POLICIES, Policy, make_policy
from ..engine.spec import ModelSpec
from ..evaluation.metrics import task_f1, task_metrics
from .replay import ReplayResult, replay_policy
from .timing import LayerTimes

# A tie within this tolerance counts as meeting the budget (metrics are ratios of small integers).
_TOLERANCE = 1e-9

# The families with a calibration grid, and those a certified search tries unless `--policies` says otherwise.
SEARCHABLE_POLICIES = tuple(name for name, rule in POLICIES.items() if rule.grid)
CERTIFIED_POLICIES = tuple(name for name in SEARCHABLE_POLICIES if POLICIES[name].certify_by_default)


def search_space(num_layers: int, gate: bool = False) -> list[Policy]:
    """Every setting the sweep tries: each registry policy's grid, in registry order (earlier wins exact ties);
    the policies that read a learned exit gate only with `gate` (the model has one)."""
    return [
        make_policy(name, params)
        for name, rule in POLICIES.items()
        if gate or not rule.needs_gate
        for params in rule.grid_settings(num_layers)
    ]


@dataclass
class SliceScore:
    """One setting on one slice of the dev data."""

    metric: float  # the metric calibration optimises
    metrics: dict[str, float]  # every task metric
    avg_exit_layer: float
    layer_speedup: float  # num_layers / avg_exit_layer
    est_batch_ms: float | None  # cost-model latency of one batch (None without timing)
    est_speedup: float | None  # full's estimated latency / this one's

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if value is not None}


class RowOutputs(NamedTuple):
    """What a setting answers on every dev row: predictions ([N] class indices or [N, C] bool) and 1-based exit
    layers [N]."""

    predictions: np.ndarray
    exit_layer: np.ndarray


@dataclass
class Setting:
    """A policy setting and its scores on the calibration slice and the held-back slice (and, when kept, its
    per-row outputs, which certification tests)."""

    policy: Policy
    calibration: SliceScore
    held_back: SliceScore | None
    rows: RowOutputs | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.name,
            "params": self.policy.params,
            "setting": self.policy.describe(),
            "calibration": self.calibration.as_dict(),
            "held_back": self.held_back.as_dict() if self.held_back else None,
        }


@dataclass
class DevSplit:
    """Row indices of the calibration slice (the choice is made here) and the held-back slice (checked only)."""

    calibration: torch.Tensor
    held_back: torch.Tensor | None

    @classmethod
    def seeded(cls, num_samples: int, held_back_fraction: float, seed: int) -> DevSplit:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
        held = round(num_samples * held_back_fraction)
        if held_back_fraction > 0:
            held = min(max(held, 1), num_samples - 1)
        if held <= 0:
            return cls(order.sort().values, None)
        return cls(order[held:].sort().values, order[:held].sort().values)


class Scorer:
    """Scores replayed settings with the task metric and the cost model."""

    def __init__(self, spec: ModelSpec, labels: torch.Tensor, metric: str, timing: LayerTimes | None):
        self.spec, self.labels, self.metric, self.timing = spec, labels, metric, timing

    def metrics(self, result: ReplayResult, rows: torch.Tensor) -> dict[str, float]:
        spec = self.spec
        predicted = result.predictions(spec.multi_label)[rows]
        return task_metrics(
            spec.task, self.labels[rows].numpy(), predicted.numpy(), spec.labels, spec.negative_label
        )

    def score(self, result: ReplayResult, rows: torch.Tensor) -> SliceScore:
        metrics = self.metrics(result, rows)
        exit_layer = result.exit_layer[rows]
        avg_exit = float(exit_layer.float().mean())
        est_ms = est_speedup = None
        if self.timing is not None:
            est_ms = round(self.timing.batch_ms(exit_layer), 4)
            est_speedup = round(self.timing.full_ms / est_ms, 4)
        return SliceScore(
            metric=metrics[self.metric],
            metrics=metrics,
            avg_exit_layer=round(avg_exit, 4),
            layer_speedup=round(self.spec.num_layers / avg_exit, 4),
            est_batch_ms=est_ms,
            est_speedup=est_speedup,
        )


def evaluate_settings(
    policies: Iterable[Policy],
    logits: torch.Tensor,
    scorer: Scorer,
    split: DevSplit,
    keep_rows: bool = False,
    gate: Any = None,
    lengths: torch.Tensor | None = None,
) -> list[Setting]:
    """Replay each policy on the whole cache once, then score both slices (`keep_rows`: keep every row's
    prediction and exit layer too; `gate` and the rows' `lengths`: for the `gate` policy)."""
    settings = []
    for policy in policies:
        result = replay_policy(policy, logits, scorer.spec.multi_label, scorer.labels, gate, lengths)
        held = scorer.score(result, split.held_back) if split.held_back is not None else None
        rows = None
        if keep_rows:
            predicted = result.predictions(scorer.spec.multi_label).numpy()
            rows = RowOutputs(predicted, result.exit_layer.numpy().astype(np.int16))
        settings.append(Setting(policy, scorer.score(result, split.calibration), held, rows))
    return settings


def pareto_frontier(settings: list[Setting]) -> list[Setting]:
    """Settings no other beats on both axes (lower average exit layer, higher metric), fastest first."""
    ranked = sorted(settings, key=lambda s: (s.calibration.avg_exit_layer, -s.calibration.metric))
    frontier: list[Setting] = []
    for setting in ranked:
        if not frontier or setting.calibration.metric > frontier[-1].calibration.metric + _TOLERANCE:
            frontier.append(setting)
    return frontier


@dataclass
class Choice:
    setting: Setting
    reason: str
    feasible: int  # settings that met the constraint (0 when falling back to `full`)


def _best(settings: list[Setting]) -> str:
    if not settings:
        return "no early-exit setting saves a layer"
    best = max(settings, key=lambda s: (s.calibration.metric, -s.calibration.avg_exit_layer))
    return f"the best early-exit setting, {best.policy.describe()}, scores {best.calibration.metric:.4f}"


def choose_within_budget(settings: list[Setting], full: Setting, max_drop: float, metric: str) -> Choice:
    """The setting with the lowest average exit layer whose calibration metric is within `max_drop` of full's."""
    floor = full.calibration.metric - max_drop
    faster = [s for s in settings if s.calibration.avg_exit_layer < full.calibration.avg_exit_layer]
    feasible = [s for s in faster if s.calibration.metric >= floor - _TOLERANCE]
    if not feasible:
        return Choice(
            full,
            f"no early-exit setting keeps {metric} within {max_drop} of full "
            f"({full.calibration.metric:.4f}, so at least {floor:.4f}) on the calibration slice: "
            f"{_best(faster)}; serving full depth",
            0,
        )
    chosen = min(feasible, key=lambda s: (s.calibration.avg_exit_layer, -s.calibration.metric))
    return Choice(
        chosen,
        f"fastest of {len(feasible)} settings whose calibration {metric} is within {max_drop} of full's "
        f"{full.calibration.metric:.4f}",
        len(feasible),
    )


def choose_for_speedup(settings: list[Setting], full: Setting, target_speedup: float, metric: str) -> Choice:
    """The most accurate setting using at least `target_speedup`× fewer layers than full."""
    feasible = [s for s in settings if s.calibration.layer_speedup >= target_speedup - _TOLERANCE]
    if not feasible:
        fastest = max((s.calibration.layer_speedup for s in settings), default=1.0)
        return Choice(
            full,
            f"no setting reaches {target_speedup}x fewer layers on the calibration slice "
            f"(the fastest reaches {fastest:.2f}x); serving full depth",
            0,
        )
    chosen = max(feasible, key=lambda s: (s.calibration.metric, -s.calibration.avg_exit_layer))
    return Choice(
        chosen,
        f"highest calibration {metric} of {len(feasible)} settings with at least {target_speedup}x fewer layers",
        len(feasible),
    )


def held_back_warnings(
    choice: Setting, full: Setting, tolerance: float, metric: str, budget_mode: bool = True
) -> list[str]:
    """Over-fitting checks on the held-back slice, which the choice never saw: does the choice lose more against
    `full` there than on the calibration slice (by more than `tolerance`), and does it still meet the budget?
    Both compare with `full` on the same slice, so a slice that is merely easier or harder is no alarm, and
    doing better on unseen data is none either."""
    if choice.held_back is None or full.held_back is None or choice.policy.name == "full":
        return []
    name = choice.policy.describe()
    calibration_drop = full.calibration.metric - choice.calibration.metric
    held_drop = full.held_back.metric - choice.held_back.metric
    warnings = []
    if held_drop - calibration_drop > tolerance + _TOLERANCE:
        warnings.append(
            f"{name}: {metric} below full is {held_drop:.4f} on the held-back slice but {calibration_drop:.4f} on "
            f"the calibration slice (worse by more than {tolerance}): the choice may fit the calibration slice "
            f"only"
        )
    if budget_mode and held_drop > tolerance + _TOLERANCE:
        warnings.append(
            f"{name}: {held_drop:.4f} below full on the held-back slice, more than the budget {tolerance}: the "
            f"budget may not hold on new data (use more dev data or a smaller budget)"
        )
    return warnings


def task_f1_warnings(
    chosen: SliceScore, full: SliceScore, task: str, metric: str, budget: float
) -> list[str]:
    """When the budget is on accuracy: does the chosen setting's task F1 (on all dev rows) fall by more than it?
    On skewed label sets the rows an early exit changes can be the ones F1 counts."""
    key = task_f1(task)
    if metric != "accuracy" or key not in full.metrics:
        return []
    drop = full.metrics[key] - chosen.metrics[key]
    if drop <= budget + _TOLERANCE:
        return []
    return [
        f"{key} of the chosen setting is {drop:.4f} below full on the dev rows, more than the budget {budget} "
        f"set on accuracy: only accuracy is budgeted (and certified), not {key}; on a skewed label set use a "
        "smaller --max-accuracy-drop or --guarantee consistency"
    ]
