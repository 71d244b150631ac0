"""Evaluating policies on labelled data: task metrics, average exit layer and measured throughput
(docs/design.md, "Commands").

Besides the policies, a run may time the stock-handler baseline `hf`: the plain Hugging Face forward over the
padded batch with the last exit head (`EarlyExitModel.stock_logits`), what a stock TorchServe handler runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.text import label_tensor
from ..engine.inputs import Example
from ..engine.model import EarlyExitModel
from ..engine.policies import Policy
from ..engine.runner import run_bucketed
from ..engine.signals import predictions
from .metrics import task_metrics


def prepare_batches(
    model: EarlyExitModel, examples: list[Example], batch_size: int
) -> list[tuple[dict, torch.Tensor]]:
    """Tokenized batches with their gold labels, built once so every policy is timed on the same tensors; both on
    the model's device."""
    batches = []
    device = model.device
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = {name: tensor.to(device) for name, tensor in model.encode_examples(chunk).items()}
        batches.append((inputs, label_tensor(chunk, model.spec.labels, model.spec.task).to(device)))
    return batches


def _finish(device: torch.device) -> None:
    """Wait for the device's queued work, so a batch's time is its whole run (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WARMUP_BATCHES = 3


STOCK_BASELINE = "hf"


def summarise(
    model: EarlyExitModel,
    policy: Policy | str,
    gold: torch.Tensor,
    predicted: torch.Tensor,
    exit_layers: torch.Tensor,
    batch_seconds: list[float],
    batch_size: int,
) -> dict:
    """The evaluate JSON of one policy (docs/design.md, "Commands") from its per-sample outputs and per-batch engine times."""
    spec = model.spec
    metrics = task_metrics(spec.task, gold.numpy(), predicted.numpy(), spec.labels, spec.negative_label)
    num_samples = int(exit_layers.numel())
    avg_exit = float(exit_layers.float().mean())
    wall_seconds = sum(batch_seconds)
    batch_ms = np.asarray(batch_seconds) * 1000.0
    return {
        "policy": policy if isinstance(policy, str) else policy.name,
        "params": {} if isinstance(policy, str) else policy.params,
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


def evaluate_policies(
    model: EarlyExitModel,
    examples: list[Example],
    policies: list[Policy],
    batch_size: int = 8,
    stock_model: EarlyExitModel | None = None,
    keep_predictions: bool = False,
) -> list[dict]:
    """Every policy on the same inputs in one run, through the serving runner (`run_bucketed`), so their speeds
    compare side by side; one result per policy, plus an `hf` row timing `stock_model`'s plain forward when given
    (the model itself, or its fp32 original when `model` is quantized).

    Contestants take turns batch by batch (each timed on its own, the first turn rotating), so a noisy neighbour
    on the machine slows all of them alike; a few untimed warm-up batches per contestant come first.
    `wall_seconds` is engine time (tokenization is done once, before timing); `batch_ms_p50` / `batch_ms_p95`
    are per-batch latencies. `keep_predictions` adds each contestant's per-row predictions (`predicted`, a numpy
    array in input order) for paired statistics such as bootstrap intervals.
    """
    model.eval()
    device = model.device
    batches = prepare_batches(model, examples, batch_size)
    contestants: list[tuple[Policy | str, Callable]] = [
        (policy, lambda inputs, labels, policy=policy: _run_policy(model, inputs, policy, labels))
        for policy in policies
    ]
    if stock_model is not None:
        stock_model.eval()
        contestants.append((STOCK_BASELINE, lambda inputs, labels: _run_stock(stock_model, inputs)))
    for _, run in contestants:
        for inputs, labels in batches[:WARMUP_BATCHES]:
            run(inputs, labels)
    batch_seconds: list[list[float]] = [[] for _ in contestants]
    predicted: list[list[torch.Tensor]] = [[] for _ in contestants]
    exit_layers: list[list[torch.Tensor]] = [[] for _ in contestants]
    for number, (inputs, labels) in enumerate(tqdm(batches, desc="evaluate", unit="batch", leave=False)):
        for turn in range(len(contestants)):
            # Who goes first rotates, so no contestant always runs right after another on warm caches.
            index = (number + turn) % len(contestants)
            started = time.perf_counter()
            rows_predicted, rows_exit = contestants[index][1](inputs, labels)
            _finish(device)
            batch_seconds[index].append(time.perf_counter() - started)
            predicted[index].append(rows_predicted.cpu())
            exit_layers[index].append(rows_exit.cpu())
    gold = torch.cat([labels.cpu() for _, labels in batches])
    results = [
        summarise(
            model,
            policy,
            gold,
            torch.cat(predicted[i]),
            torch.cat(exit_layers[i]),
            batch_seconds[i],
            batch_size,
        )
        for i, (policy, _) in enumerate(contestants)
    ]
    if keep_predictions:
        for result, rows_predicted in zip(results, predicted):
            result["predicted"] = torch.cat(rows_predicted).numpy()
    for baseline in ("full", STOCK_BASELINE):
        reference = next((result for result in results if result["policy"] == baseline), None)
        if reference is not None:
            for result in results:
                speedup = result["samples_per_second"] / reference["samples_per_second"]
                result[f"speedup_vs_{baseline}"] = round(speedup, 3)
    return results


def _run_policy(model: EarlyExitModel, inputs: dict, policy: Policy, labels: torch.Tensor):
    result = run_bucketed(model, inputs, policy, labels)
    return result.predictions(model.multi_label), result.exit_layer


def _run_stock(model: EarlyExitModel, inputs: dict):
    logits = model.stock_logits(inputs)
    probs = torch.sigmoid(logits) if model.multi_label else logits
    exit_layer = torch.full((logits.shape[0],), model.num_layers, dtype=torch.long)
    return predictions(probs, model.multi_label), exit_layer
