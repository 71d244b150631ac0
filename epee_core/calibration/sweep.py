"""Calibration on a logit cache: split the dev rows, sweep the search space, choose, check on held-back rows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine.policies import Policy, make_policy
from ..engine.spec import ConfigError, ModelSpec
from ..evaluation.metrics import task_metrics
from .cache import LogitCache
from .replay import replay_policy
from .search import (
    Choice,
    DevSplit,
    Scorer,
    Setting,
    SliceScore,
    choose_for_speedup,
    choose_within_budget,
    evaluate_settings,
    held_back_warnings,
    pareto_frontier,
    search_space,
)
from .timing import LayerTimes

METRICS = ("accuracy", "macro_f1", "micro_f1", "example_f1")


@dataclass
class CalibrationOptions:
    """What to optimise and under which constraint (`target_speedup`, when set, replaces the accuracy budget)."""

    metric: str = "accuracy"
    max_accuracy_drop: float = 0.01
    target_speedup: float | None = None
    held_back_fraction: float = 0.3
    seed: int = 0

    def check(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise ConfigError(f"--max-accuracy-drop must be in [0, 1), got {self.max_accuracy_drop}")
        if self.target_speedup is not None and self.target_speedup <= 1.0:
            raise ConfigError(f"--target-speedup must be greater than 1, got {self.target_speedup}")
        if not 0.0 <= self.held_back_fraction <= 0.9:
            raise ConfigError(f"--held-back-fraction must be in [0, 0.9], got {self.held_back_fraction}")


@dataclass
class CalibrationResult:
    options: CalibrationOptions
    split: DevSplit
    settings: list[Setting]  # the search space, in sweep order
    full: Setting
    oracle: Setting
    frontier: list[Setting]  # over the search space and `full`, fastest first
    choice: Choice
    dev: dict[str, SliceScore]  # full, oracle and the choice on all dev rows
    warnings: list[str] = field(default_factory=list)
    search_seconds: float = 0.0

    @property
    def chosen(self) -> Setting:
        return self.choice.setting

    def report(self, include_settings: bool = True) -> dict[str, Any]:
        """The JSON report: constraint, split, references, choice and its checks, frontier (and every setting)."""
        options = self.options
        held = self.split.held_back
        report: dict[str, Any] = {
            "metric": options.metric,
            "constraint": (
                {"target_speedup": options.target_speedup}
                if options.target_speedup is not None
                else {"max_accuracy_drop": options.max_accuracy_drop}
            ),
            "split": {
                "seed": options.seed,
                "held_back_fraction": options.held_back_fraction,
                "calibration_samples": int(self.split.calibration.numel()),
                "held_back_samples": int(held.numel()) if held is not None else 0,
            },
            "num_settings": len(self.settings),
            "search_seconds": round(self.search_seconds, 3),
            "chosen": {**self.chosen.as_dict(), "dev": self.dev["chosen"].as_dict()},
            "reason": self.choice.reason,
            "warnings": self.warnings,
            "full": {**self.full.as_dict(), "dev": self.dev["full"].as_dict()},
            "oracle": {**self.oracle.as_dict(), "dev": self.dev["oracle"].as_dict()},
            "frontier": [setting.as_dict() for setting in self.frontier],
        }
        if include_settings:
            report["settings"] = [setting.as_dict() for setting in self.settings]
        return report


def check_metric(spec: ModelSpec, metric: str) -> None:
    """Fail unless `task_metrics` reports `metric` for the model's task (asked on one dummy row)."""
    width = len(spec.labels)
    gold = np.zeros((1, width), dtype=bool) if spec.multi_label else np.zeros(1, dtype=np.int64)
    available = task_metrics(spec.task, gold, gold, spec.labels, spec.negative_label)
    if metric not in available:
        raise ConfigError(f"--metric {metric}: task {spec.task} reports {', '.join(available)}")


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: replay works on tensors of a few thousand numbers, where intra-op threads cost
    more than they save (7x slower on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@single_thread()
def calibrate(
    cache: LogitCache,
    spec: ModelSpec,
    options: CalibrationOptions,
    timing: LayerTimes | None = None,
    policies: list[Policy] | None = None,
) -> CalibrationResult:
    """Sweep `policies` (default: `search_space`) on the calibration slice and choose under the constraint."""
    options.check()
    if cache.logits.shape[0] != spec.num_layers or cache.logits.shape[2] != len(spec.labels):
        raise ConfigError(
            f"cache holds {cache.num_layers} layers × {cache.logits.shape[2]} outputs, the model has "
            f"{spec.num_layers} × {len(spec.labels)}"
        )
    started = time.perf_counter()
    split = DevSplit.seeded(cache.num_samples, options.held_back_fraction, options.seed)
    scorer = Scorer(spec, cache.labels, options.metric, timing)
    check_metric(spec, options.metric)
    full, oracle = evaluate_settings(
        [make_policy("full"), make_policy("oracle")], cache.logits, scorer, split
    )
    policies = search_space(spec.num_layers) if policies is None else policies
    progress = tqdm(policies, desc="replaying settings", unit="setting")
    settings = evaluate_settings(progress, cache.logits, scorer, split)

    if options.target_speedup is not None:
        choice = choose_for_speedup(settings, full, options.target_speedup, options.metric)
    else:
        choice = choose_within_budget(settings, full, options.max_accuracy_drop, options.metric)
    all_rows = torch.arange(cache.num_samples)
    dev = {
        name: scorer.score(replay_policy(s.policy, cache.logits, spec.multi_label, cache.labels), all_rows)
        for name, s in (("full", full), ("oracle", oracle), ("chosen", choice.setting))
    }
    return CalibrationResult(
        options=options,
        split=split,
        settings=settings,
        full=full,
        oracle=oracle,
        frontier=pareto_frontier([full, *settings]),
        choice=choice,
        dev=dev,
        warnings=held_back_warnings(
            choice.setting, full, options.max_accuracy_drop, options.metric, options.target_speedup is None
        ),
        search_seconds=time.perf_counter() - started,
    )
