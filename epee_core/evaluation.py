"""Evaluating policies on labelled data: task metrics, average exit layer and measured throughput (DESIGN §7)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Example, label_tensor
from .metrics import task_metrics
from .model import EarlyExitModel
from .policies import Policy
from .runner import Runner, run_bucketed, run_early_exit
from .runner_before import run_early_exit_before
from .training import encode_examples

# The runners a benchmark can time side by side. `current` is what serving runs (lean loop + length bucketing);
# `unbucketed` the lean loop alone; `before` the runner as it was before issue 9.
RUNNERS: dict[str, Runner] = {
    "current": run_bucketed,
    "unbucketed": run_early_exit,
    "before": run_early_exit_before,
}
DEFAULT_RUNNER = "current"


def prepare_batches(
    model: EarlyExitModel, examples: list[Example], batch_size: int
) -> list[tuple[dict, torch.Tensor]]:
    """Tokenized batches with their gold labels, built once so every policy is timed on the same tensors."""
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batches.append(
            (encode_examples(model, chunk), label_tensor(chunk, model.spec.labels, model.spec.task))
        )
    return batches


WARMUP_BATCHES = 3


def summarise(
    model: EarlyExitModel,
    policy: Policy,
    gold: torch.Tensor,
    predicted: torch.Tensor,
    exit_layers: torch.Tensor,
    batch_seconds: list[float],
    batch_size: int,
) -> dict:
    """The evaluate JSON of one policy (DESIGN §7) from its per-sample outputs and per-batch engine times."""
    spec = model.spec
    metrics = task_metrics(spec.task, gold.numpy(), predicted.numpy(), spec.labels, spec.negative_label)
    num_samples = int(exit_layers.numel())
    avg_exit = float(exit_layers.float().mean())
    wall_seconds = sum(batch_seconds)
    batch_ms = np.asarray(batch_seconds) * 1000.0
    return {
        "policy": policy.name,
        "params": policy.params,
        **metrics,
        "avg_exit_layer": round(avg_exit, 4),
        "num_layers": spec.num_layers,
        "layer_speedup": round(spec.num_layers / avg_exit, 4),
        "exit_layer_counts": torch.bincount(exit_layers, minlength=spec.num_layers + 1)[1:].tolist(),
        "num_samples": num_samples,
        "batch_size": batch_size,
        "wall_seconds": round(wall_seconds, 4),
        "samples_per_second": round(num_samples / wall_seconds, 2),
        "batch_ms_p50": round(float(np.percentile(batch_ms, 50)), 3),
        "batch_ms_p95": round(float(np.percentile(batch_ms, 95)), 3),
    }


def check_runners(runners: Sequence[str]) -> None:
    unknown = [name for name in runners if name not in RUNNERS]
    if unknown or not runners or len(set(runners)) != len(runners):
        raise ValueError(
            f"runners must be distinct names from {', '.join(RUNNERS)}, got {', '.join(runners) or 'none'}"
        )


def evaluate_policies(
    model: EarlyExitModel,
    examples: list[Example],
    policies: list[Policy],
    batch_size: int = 8,
    runners: Sequence[str] = (DEFAULT_RUNNER,),
) -> list[dict]:
    """Every policy (under every runner of `RUNNERS` named) on the same inputs in one run, so their speeds
    compare side by side; one result per runner × policy, each naming its `runner`.

    Runner × policy pairs take turns batch by batch (each timed on its own, the first turn rotating), so a noisy
    neighbour on the machine slows all of them alike; a few untimed warm-up batches per pair come first.
    `wall_seconds` is engine time (tokenization is done once, before timing); `batch_ms_p50` / `batch_ms_p95`
    are per-batch latencies.
    """
    check_runners(runners)
    model.eval()
    batches = prepare_batches(model, examples, batch_size)
    contestants = [(runner, policy) for runner in runners for policy in policies]
    for runner, policy in contestants:
        for inputs, labels in batches[:WARMUP_BATCHES]:
            RUNNERS[runner](model, inputs, policy, labels)
    batch_seconds: list[list[float]] = [[] for _ in contestants]
    predicted: list[list[torch.Tensor]] = [[] for _ in contestants]
    exit_layers: list[list[torch.Tensor]] = [[] for _ in contestants]
    for number, (inputs, labels) in enumerate(tqdm(batches, desc="evaluate", unit="batch", leave=False)):
        for turn in range(len(contestants)):
            # Who goes first rotates, so no policy always runs right after another on warm caches.
            index = (number + turn) % len(contestants)
            runner, policy = contestants[index]
            run = RUNNERS[runner]
            started = time.perf_counter()
            result = run(model, inputs, policy, labels)
            batch_seconds[index].append(time.perf_counter() - started)
            predicted[index].append(result.predictions(model.multi_label))
            exit_layers[index].append(result.exit_layer)
    gold = torch.cat([labels for _, labels in batches])
    results = [
        {
            **summarise(
                model,
                policy,
                gold,
                torch.cat(predicted[i]),
                torch.cat(exit_layers[i]),
                batch_seconds[i],
                batch_size,
            ),
            "runner": runner,
        }
        for i, (runner, policy) in enumerate(contestants)
    ]
    for runner in runners:
        same_runner = [result for result in results if result["runner"] == runner]
        full = next((r for r in same_runner if r["policy"] == "full"), None)
        if full is not None:
            for result in same_runner:
                result["speedup_vs_full"] = round(
                    result["samples_per_second"] / full["samples_per_second"], 3
                )
    return results
