"""Evaluating policies on labelled data: task metrics, average exit layer and measured throughput (DESIGN §7)."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .data import Example, label_tensor
from .metrics import task_metrics
from .model import EarlyExitModel
from .policies import Policy
from .runner import run_early_exit
from .training import encode_examples


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


def evaluate_policy(model: EarlyExitModel, batches: list[tuple[dict, torch.Tensor]], policy: Policy) -> dict:
    """Run one policy over prepared batches; `wall_seconds` is engine time (tokenization excluded), after one
    untimed warm-up batch."""
    model.eval()
    run_early_exit(model, batches[0][0], policy, batches[0][1])  # warm-up
    gold, predicted, exit_layers = [], [], []
    started = time.perf_counter()
    for inputs, labels in tqdm(batches, desc=policy.name, unit="batch", leave=False):
        result = run_early_exit(model, inputs, policy, labels)
        gold.append(labels)
        predicted.append(result.predictions(model.multi_label))
        exit_layers.append(result.exit_layer)
    wall = time.perf_counter() - started
    gold_all, predicted_all, exits = torch.cat(gold), torch.cat(predicted), torch.cat(exit_layers).float()
    spec = model.spec
    metrics = task_metrics(
        spec.task, gold_all.numpy(), predicted_all.numpy(), spec.labels, spec.negative_label
    )
    num_samples = int(exits.numel())
    avg_exit = float(exits.mean())
    histogram = torch.bincount(exits.long(), minlength=spec.num_layers + 1)[1:].tolist()
    return {
        "policy": policy.name,
        "params": policy.params,
        **metrics,
        "avg_exit_layer": round(avg_exit, 4),
        "num_layers": spec.num_layers,
        "layer_speedup": round(spec.num_layers / avg_exit, 4),
        "exit_layer_counts": histogram,
        "num_samples": num_samples,
        "batch_size": int(batches[0][1].shape[0]),
        "wall_seconds": round(wall, 4),
        "samples_per_second": round(num_samples / wall, 2),
    }


def evaluate_policies(
    model: EarlyExitModel, examples: list[Example], policies: list[Policy], batch_size: int = 8
) -> list[dict]:
    """Every policy on the same inputs in one run, so their speeds compare side by side."""
    batches = prepare_batches(model, examples, batch_size)
    results = [evaluate_policy(model, batches, policy) for policy in policies]
    full = next((r for r in results if r["policy"] == "full"), None)
    if full is not None:
        for result in results:
            result["speedup_vs_full"] = round(result["samples_per_second"] / full["samples_per_second"], 3)
    return results
