"""Calibration on a logit cache: split the dev rows, sweep the search space, choose, check on held-back rows.

With a guarantee (`accuracy` or `consistency`) the choice is certified instead (certify.py): the calibration
slice orders the candidates, the held-back slice tests them, and the test is the certificate.
"""

from __future__ import annotations

import math
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
from .certify import GAMMA, selection_from_cache
from .replay import replay_policy
from .search import (
    CERTIFIED_POLICIES,
    SEARCHABLE_POLICIES,
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
    task_f1_warnings,
)
from .timing import LayerTimes

METRICS = ("accuracy", "macro_f1", "micro_f1", "example_f1")
GUARANTEES = ("accuracy", "consistency", "none")
# What each guarantee bounds, for messages, the model YAML header and the human output.
RISKS = {"accuracy": "accuracy drop vs full depth", "consistency": "disagreement with full depth"}


@dataclass
class CalibrationOptions:
    """What to optimise and under which constraint (`target_speedup`, when set, replaces the accuracy budget).

    `guarantee` other than "none" certifies the budget: with probability at least 1 − `risk` over the draw of
    the dev rows, the chosen setting's accuracy drop (`accuracy`) or disagreement with full depth
    (`consistency`) on new data from the same distribution is at most `max_accuracy_drop`."""

    metric: str = "accuracy"
    max_accuracy_drop: float = 0.01
    target_speedup: float | None = None
    held_back_fraction: float = 0.3
    seed: int = 0
    guarantee: str = "none"
    risk: float = 0.1
    policies: tuple[str, ...] | None = None  # families to search (default: CERTIFIED_POLICIES or all of them)

    @property
    def certifying(self) -> bool:
        return self.guarantee != "none"

    def check(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise ConfigError(f"--max-accuracy-drop must be in [0, 1), got {self.max_accuracy_drop}")
        if self.target_speedup is not None and self.target_speedup <= 1.0:
            raise ConfigError(f"--target-speedup must be greater than 1, got {self.target_speedup}")
        if not 0.0 <= self.held_back_fraction <= 0.9:
            raise ConfigError(f"--held-back-fraction must be in [0, 0.9], got {self.held_back_fraction}")
        unknown = [name for name in self.policies or () if name not in SEARCHABLE_POLICIES]
        if unknown or self.policies == ():
            raise ConfigError(
                f"--policies must name one or more of {', '.join(SEARCHABLE_POLICIES)}, got "
                f"{', '.join(self.policies or ()) or 'none'}"
            )
        if self.guarantee not in GUARANTEES:
            raise ConfigError(f"--guarantee must be one of {', '.join(GUARANTEES)}, got {self.guarantee!r}")
        if not 0.0 < self.risk < 1.0:
            raise ConfigError(f"--risk must be in (0, 1), got {self.risk}")
        if not self.certifying:
            return
        flag = f"--guarantee {self.guarantee}"
        if self.target_speedup is not None:
            raise ConfigError(
                f"{flag} certifies the --max-accuracy-drop budget and cannot be combined with "
                f"--target-speedup: use --guarantee none with --target-speedup"
            )
        if self.held_back_fraction == 0:
            raise ConfigError(
                f"{flag} tests the candidates on the held-back rows: --held-back-fraction must be above 0 "
                f"(0.6 when certifying by default), or use --guarantee none"
            )
        if self.guarantee == "accuracy" and self.metric != "accuracy":
            raise ConfigError(
                f"{flag} bounds the drop of accuracy, a mean over rows, and {self.metric} is not one: use "
                f"--guarantee consistency (disagreement with full depth, whatever the metric) or --guarantee none"
            )
        if self.guarantee == "accuracy" and self.risk <= GAMMA:
            raise ConfigError(
                f"--risk must exceed {GAMMA} with {flag} (its test spends {GAMMA} on a nuisance rate)"
            )


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
    guarantee: dict[str, Any] | None = None  # kind, epsilon, delta, bound, n, method (certifying only)
    certificate: dict[str, Any] | None = None  # how it was obtained: certified?, the tested path, p-values
    labelled: bool = True  # False: no gold labels, every metric is agreement with full depth

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
            "labels": "gold" if self.labelled else "none: every metric is agreement with full depth",
            "guarantee": self.guarantee,
        }
        if self.certificate is not None:
            report["certificate"] = self.certificate
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
    gate: Any = None,
) -> CalibrationResult:
    """Sweep `policies` (default: `search_space`) on the calibration slice and choose under the constraint;
    `gate` is the model's learned exit gate (`ExitGate`), which adds the `gate` policy's settings."""
    options.check()
    if gate is None and "gate" in (options.policies or ()):
        raise ConfigError(
            "--policies gate needs a learned exit gate: the model directory has no gate.safetensors "
            "(train one with `epee train-gate`)"
        )
    if cache.logits.shape[0] != spec.num_layers or cache.logits.shape[2] != len(spec.labels):
        raise ConfigError(
            f"cache holds {cache.num_layers} layers × {cache.logits.shape[2]} outputs, the model has "
            f"{spec.num_layers} × {len(spec.labels)}"
        )
    if not cache.labelled and options.guarantee != "consistency":
        raise ConfigError(
            "the calibration data has no labels: only --guarantee consistency (disagreement with full depth) "
            "can calibrate without them"
        )
    started = time.perf_counter()
    split = DevSplit.seeded(cache.num_samples, options.held_back_fraction, options.seed)
    scorer = Scorer(spec, cache.labels, options.metric, timing)
    check_metric(spec, options.metric)
    keep = options.certifying
    (full,) = evaluate_settings([make_policy("full")], cache.full_depth_logits, scorer, split, keep)
    (oracle,) = evaluate_settings([make_policy("oracle")], cache.logits, scorer, split, keep)
    if policies is None:
        families = options.policies or (CERTIFIED_POLICIES if options.certifying else SEARCHABLE_POLICIES)
        space = search_space(spec.num_layers, gate is not None)
        policies = [policy for policy in space if policy.name in families]
    progress = tqdm(policies, desc="replaying settings", unit="setting")
    settings = evaluate_settings(progress, cache.logits, scorer, split, keep, gate, cache.lengths)

    guarantee = certificate = None
    if options.target_speedup is not None:
        choice = choose_for_speedup(settings, full, options.target_speedup, options.metric)
    elif options.certifying:
        choice, guarantee, certificate = choose_certified(settings, full, cache, spec, split, options)
    else:
        choice = choose_within_budget(settings, full, options.max_accuracy_drop, options.metric)
    all_rows = torch.arange(cache.num_samples)
    dev = {
        name: scorer.score(
            replay_policy(s.policy, logits, spec.multi_label, cache.labels, gate, cache.lengths), all_rows
        )
        for name, s, logits in (
            ("full", full, cache.full_depth_logits),
            ("oracle", oracle, cache.logits),
            ("chosen", choice.setting, cache.logits),
        )
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
        warnings=calibration_warnings(choice.setting, full, dev, spec, options),
        search_seconds=time.perf_counter() - started,
        guarantee=guarantee,
        certificate=certificate,
        labelled=cache.labelled,
    )


def calibration_warnings(
    chosen: Setting, full: Setting, dev: dict[str, SliceScore], spec: ModelSpec, options: CalibrationOptions
) -> list[str]:
    """The held-back over-fitting checks (not when certifying: the held-back test is the certificate, an
    empirical check on the same rows adds nothing), and whether an accuracy budget left the task F1 behind."""
    warnings = []
    if not options.certifying:
        budget_mode = options.target_speedup is None
        warnings += held_back_warnings(chosen, full, options.max_accuracy_drop, options.metric, budget_mode)
    if options.target_speedup is None:
        warnings += task_f1_warnings(
            dev["chosen"], dev["full"], spec.task, options.metric, options.max_accuracy_drop
        )
    return warnings


def choose_certified(
    settings: list[Setting],
    full: Setting,
    cache: LogitCache,
    spec: ModelSpec,
    split: DevSplit,
    options: CalibrationOptions,
) -> tuple[Choice, dict[str, Any], dict[str, Any]]:
    """Learn then Test over the sweep (`certify.selection_from_cache`): the calibration slice orders the
    candidates, the held-back slice tests them. Returns the choice (the fastest certified setting, else `full`),
    the guarantee (`bound` is 0 when `full` is served: its drop against itself is 0) and the certificate."""
    if full.rows is None or any(s.rows is None for s in settings) or split.held_back is None:
        raise ValueError("certification needs every setting's rows and a held-back slice")
    labels = cache.labels.numpy() if options.guarantee == "accuracy" else None
    if labels is not None and spec.multi_label:
        labels = labels.astype(bool)
    names = [setting.policy.describe() for setting in settings]
    selection = selection_from_cache(
        [setting.rows.predictions for setting in settings],
        [setting.rows.exit_layer for setting in settings],
        full.rows.predictions,
        labels,
        spec.num_layers,
        split.calibration.numpy(),
        split.held_back.numpy(),
        options.max_accuracy_drop,
        options.risk,
        options.guarantee,
        names=names,
    )
    passed = sum(1 for p in selection.pvalues if p <= options.risk)  # the sequence stops at its first failure
    guarantee = {"kind": options.guarantee, **selection.info}
    certified = selection.index is not None
    reason = selection.reason
    if certified:
        chosen = settings[selection.index]
        reason = reason.removeprefix(f"{names[selection.index]}: ")
        # rounded up to 6 decimals (float noise aside), so still a valid bound, and never above the budget
        rounded = math.ceil(round(guarantee["bound"] * 1e6, 6)) / 1e6
        guarantee["bound"] = min(rounded, options.max_accuracy_drop)
    else:
        chosen, guarantee["bound"] = full, 0.0
    # how the dev rows exited under the chosen setting: the drift detector's reference in the worker
    exits = np.asarray(chosen.rows.exit_layer, dtype=np.int64) - 1
    guarantee["exit_counts"] = np.bincount(exits, minlength=spec.num_layers).tolist()
    certificate = {
        "certified": certified,
        "reason": selection.reason,
        "ordering_rows": int(split.calibration.numel()),
        "test_rows": int(split.held_back.numel()),
        "certified_settings": passed,
        "path": [
            {
                "setting": names[index],
                "pvalue": selection.pvalues[step] if step < len(selection.pvalues) else None,
            }
            for step, index in enumerate(selection.path)
        ],
    }
    return Choice(chosen, reason, passed), guarantee, certificate


def describe_guarantee(guarantee: dict[str, Any], certified: bool = True) -> str:
    """The guarantee in one line (model YAML header, human output)."""
    risk = RISKS.get(guarantee.get("kind", "accuracy"), "risk")
    promise = (
        f"{risk} <= {guarantee['epsilon']:g} with probability >= {1 - guarantee['delta']:g} over the "
        f"calibration sample (n={guarantee['n']} test rows, {guarantee['method']})"
    )
    if not certified:
        return f"serving full depth, whose {risk} is 0: no early-exit setting was certified to have {promise}"
    return f"{promise}; upper bound {guarantee['bound']:.4g}"
