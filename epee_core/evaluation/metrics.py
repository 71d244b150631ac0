"""Task metrics for evaluation and calibration (docs/design.md, "Commands")."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

# The F1 each task is reported by: micro-F1 without the negative class for relation extraction, example-F1 for
# multi-label, macro-F1 otherwise. An accuracy budget or certificate does not bound it.
TASK_F1 = {"relation-extraction": "micro_f1", "multi-label": "example_f1"}


def task_f1(task: str) -> str:
    """The key of the task's F1 in `task_metrics`."""
    return TASK_F1.get(task, "macro_f1")


def example_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Mean over examples of 2|P∩G| / (|P| + |G|); an example with both sets empty scores 1."""
    overlap = (gold & pred).sum(1)
    sizes = gold.sum(1) + pred.sum(1)
    scores = np.where(sizes == 0, 1.0, 2.0 * overlap / np.maximum(sizes, 1))
    return float(scores.mean())


def task_metrics(
    task: str, gold, pred, labels: list[str], negative_label: str | None = None
) -> dict[str, float]:
    """accuracy and macro-F1; relation extraction adds micro-F1 without the negative class; multi-label adds
    example-F1 and micro-F1 (accuracy is then exact set match)."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    if task == "multi-label":
        gold, pred = gold.astype(bool), pred.astype(bool)
        return {
            "accuracy": float((gold == pred).all(1).mean()),
            "example_f1": example_f1(gold, pred),
            "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        }
    all_classes = list(range(len(labels)))
    result = {
        "accuracy": float((gold == pred).mean()),
        "macro_f1": float(f1_score(gold, pred, labels=all_classes, average="macro", zero_division=0)),
    }
    if task == "relation-extraction":
        positive = [i for i, label in enumerate(labels) if label != negative_label]
        result["micro_f1"] = float(f1_score(gold, pred, labels=positive, average="micro", zero_division=0))
    return result


def bootstrap_intervals(
    task: str,
    gold,
    predicted: dict[str, np.ndarray],
    labels: list[str],
    negative_label: str | None = None,
    keys: tuple[str, ...] = ("accuracy",),
    reference: str | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Percentile bootstrap intervals of the task metrics `keys` for each contestant's predictions on the same
    rows; with `reference`, also of each contestant's difference to it (`delta_<key>`), resampling the rows
    jointly so the pairing is kept. Returns {name: {key: [low, high], "delta_<key>": [low, high]}}."""
    gold = np.asarray(gold)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(gold), size=(resamples, len(gold)))
    draws = {name: {key: np.empty(resamples) for key in keys} for name in predicted}
    for number, sample in enumerate(rows):
        for name, pred in predicted.items():
            scores = task_metrics(task, gold[sample], np.asarray(pred)[sample], labels, negative_label)
            for key in keys:
                draws[name][key][number] = scores[key]
    tail = (1.0 - level) / 2 * 100

    def interval(values: np.ndarray) -> list[float]:
        low, high = np.percentile(values, [tail, 100 - tail])
        return [round(float(low), 4), round(float(high), 4)]

    intervals = {
        name: {key: interval(values) for key, values in by_key.items()} for name, by_key in draws.items()
    }
    if reference is not None:
        for name in predicted:
            for key in keys:
                intervals[name][f"delta_{key}"] = interval(draws[name][key] - draws[reference][key])
    return intervals
