"""`epee train-gate`: fit the learned exit gate (engine/gate.py) on a model's training data.

Every exit's logits are computed on the training rows (never the calibration rows: the gate's threshold is
certified on those later, so they must stay unseen). Each (row, layer < L) pair is one example: the features at
that layer, and whether that layer's prediction equals the last layer's. A held-out part of the training rows
(split by row, not by layer) scores the fitted gate; the gate itself is fitted on the rest.

The model's exits have been trained on these rows, so they are more often right and sooner than on new data:
the gate learns from somewhat over-confident exits, and the certified calibration of `gate_threshold` on dev data
is what keeps the accuracy budget honest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.text import read_task_examples
from ..engine.gate import GATE_FEATURES, GATE_FILE, ExitGate, all_layer_features
from ..engine.model import SPEC_FILE, EarlyExitModel
from ..engine.spec import ConfigError
from ..evaluation.evaluate import prepare_batches

CLASS_WEIGHTS = ("none", "balanced")


@torch.inference_mode()
def exit_logits_and_lengths(model: EarlyExitModel, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's logits [L, N, C] and each row's real tokens [N] (the runner's padding mask)."""
    logits, lengths = [], []
    for inputs, _ in tqdm(batches, desc="exit logits", unit="batch"):
        logits.append(model.forward_all_exits(inputs).float().cpu())
        lengths.append(model.backbone.embed(inputs)[1].sum(1).float().cpu())
    return torch.cat(logits, dim=1), torch.cat(lengths)


def gate_examples(
    logits: torch.Tensor, lengths: torch.Tensor, multi_label: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Features [L−1, N, F] and targets [L−1, N] of layers 1..L−1 (the last layer always agrees with itself)."""
    features, targets = all_layer_features(logits, lengths, multi_label)
    return features[:-1].numpy(), targets[:-1].numpy()


def fit_gate(
    features: np.ndarray, targets: np.ndarray, class_weight: str = "none", seed: int = 0
) -> tuple[ExitGate, Any]:
    """Standardise and fit a logistic regression on flattened examples [n, F], [n]."""
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(0)
    std = features.std(0)
    std = np.where(std > 1e-6, std, 1.0)  # a constant feature (e.g. every row as long) carries no weight
    if targets.all() or not targets.any():
        raise ConfigError("every exit agrees (or none does) with full depth on these rows: nothing to learn")
    classifier = LogisticRegression(
        C=1.0, max_iter=2000, class_weight=None if class_weight == "none" else class_weight, random_state=seed
    )
    classifier.fit((features - mean) / std, targets)
    gate = ExitGate.from_params(mean, std, classifier.coef_[0], float(classifier.intercept_[0]))
    return gate, classifier


def score_gate(gate: ExitGate, features: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """AUC, accuracy at 0.5 and the base rate of the gate on flattened held-out examples."""
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        probability = gate(torch.from_numpy(features)).numpy()
    scores = {
        "examples": int(targets.size),
        "agree_rate": round(float(targets.mean()), 4),
        "accuracy": round(float(((probability >= 0.5) == targets).mean()), 4),
    }
    if 0 < targets.sum() < targets.size:
        scores["auc"] = round(float(roc_auc_score(targets, probability)), 4)
    return scores


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train_gate(
    model_dir: str | Path,
    data_path: str | Path,
    max_samples: int | None = None,
    batch_size: int = 32,
    held_out_fraction: float = 0.2,
    class_weight: str = "balanced",
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the gate on `data_path` (training rows), write gate.safetensors into the model directory and record
    what it was trained on under `training.gate` in epee.yaml; return that record."""
    if class_weight not in CLASS_WEIGHTS:
        raise ConfigError(f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}, got {class_weight!r}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ConfigError(f"--held-out-fraction must be in (0, 1), got {held_out_fraction}")
    model_dir, data_path = Path(model_dir), Path(data_path)
    model = EarlyExitModel.from_pretrained(model_dir)
    if model.num_layers < 2:
        raise ConfigError(f"{model_dir}: a gate needs at least 2 layers")
    examples = read_task_examples(
        data_path, model.spec.task, "train", max_samples, labels=model.spec.labels
    ).examples
    logits, lengths = exit_logits_and_lengths(model, prepare_batches(model, examples, batch_size))
    features, targets = gate_examples(logits, lengths, model.multi_label)  # [L−1, N, F], [L−1, N]
    num_rows = features.shape[1]
    order = np.random.default_rng(seed).permutation(num_rows)
    held = min(max(round(num_rows * held_out_fraction), 1), num_rows - 1) if num_rows > 1 else 0
    held_rows, fit_rows = order[:held], order[held:]

    def flat(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return features[:, rows].reshape(-1, features.shape[-1]), targets[:, rows].reshape(-1)

    gate, classifier = fit_gate(*flat(fit_rows), class_weight, seed)
    record = {
        "data": str(data_path),
        "data_sha256": _sha256(data_path) if data_path.is_file() else None,
        "max_samples": max_samples,
        "rows": int(num_rows),
        "fit_rows": int(fit_rows.size),
        "held_out_rows": int(held_rows.size),
        "class_weight": class_weight,
        "seed": seed,
        "features": list(GATE_FEATURES),
        "weights": {name: round(float(w), 4) for name, w in zip(GATE_FEATURES, gate.weight.tolist())},
        "fit": score_gate(gate, *flat(fit_rows)),
        "held_out": score_gate(gate, *flat(held_rows)) if held else None,
        "note": "fitted on training rows, whose exits are more confident than on new data",
    }
    gate.save(model_dir)
    spec = model.spec
    spec.training = {**spec.training, "gate": record}
    spec.save(model_dir / SPEC_FILE)
    return {"model": str(model_dir), "gate_file": str(model_dir / GATE_FILE), **record}
