"""Training exit heads (and the backbone) with the PABEE-style joint loss: Σ_i i·loss_i / Σ_i i."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .backbones import build_backbone
from .config import ConfigError, ModelSpec
from .data import (
    ENTITY_MARKERS,
    Example,
    InputError,
    add_entity_markers,
    encode_texts,
    label_tensor,
    label_vocabulary,
    model_text,
    read_task_examples,
)
from .images import ImageExample, encode_images, image_transform
from .metrics import task_metrics
from .model import EarlyExitModel
from .policies import predictions

NEGATIVE_LABELS = ("None", "none", "false", "no_relation", "NA", "Other")


@dataclass
class TrainConfig:
    task: str
    backbone: str
    train_path: str
    dev_path: str
    output: str
    epochs: int = 1
    max_samples: int | None = None
    freeze_backbone: bool = False
    seed: int = 0
    batch_size: int = 16
    learning_rate: float = 5e-5
    head_learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    max_length: int = 128
    pooling: str | None = None
    max_dev_samples: int | None = None


def layer_weights(num_layers: int) -> torch.Tensor:
    """PABEE's weights: exit i counts i times, normalised to sum to 1."""
    weights = torch.arange(1, num_layers + 1, dtype=torch.float)
    return weights / weights.sum()


def joint_loss(all_logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Weighted sum over exits of cross-entropy (or BCE for multi-label); `all_logits` is [L, B, C]."""
    num_layers = all_logits.shape[0]
    if multi_label:
        per_layer = [nn.functional.binary_cross_entropy_with_logits(logits, targets) for logits in all_logits]
    else:
        per_layer = [nn.functional.cross_entropy(logits, targets) for logits in all_logits]
    return (torch.stack(per_layer) * layer_weights(num_layers).to(all_logits.device)).sum()


def _batches(items: list, batch_size: int) -> list[list]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def build_model(config: TrainConfig, labels: list[str]) -> EarlyExitModel:
    """A fresh early-exit model on the named backbone, heads randomly initialised."""
    backbone, preprocessor = build_backbone(config.backbone)
    wants = "image" if config.task == "image-classification" else "text"
    if backbone.modality != wants:
        hint = " (vit-small or a ViT checkpoint directory)" if wants == "image" else ""
        raise ConfigError(
            f"--backbone {config.backbone}: task {config.task} needs a backbone for {wants}{hint}, "
            f"'{backbone.kind}' takes {backbone.modality}"
        )
    spec = ModelSpec(
        task=config.task,
        labels=labels,
        backbone=backbone.kind,
        pooling=config.pooling or backbone.default_pooling,
        num_layers=backbone.num_layers,
        hidden_size=backbone.hidden_size,
    )
    if wants == "image":
        spec.image_size, spec.num_channels = backbone.image_size, backbone.num_channels
        return EarlyExitModel(spec, backbone, image_processor=preprocessor)
    spec.max_length = config.max_length
    if config.task == "relation-extraction":
        add_entity_markers(preprocessor)
        backbone.resize_token_embeddings(len(preprocessor))
        spec.entity_markers = list(ENTITY_MARKERS)
        spec.negative_label = next((label for label in NEGATIVE_LABELS if label in labels), None)
    return EarlyExitModel(spec, backbone, tokenizer=preprocessor)


def encode_examples(
    model: EarlyExitModel, examples: list[Example] | list[ImageExample]
) -> dict[str, torch.Tensor]:
    """Model inputs for a batch: right-padded tokens for text tasks, `pixel_values` for images."""
    if model.spec.task == "image-classification":
        transform = image_transform(model.image_processor, model.spec.num_channels)
        return encode_images(transform, [example.image for example in examples])
    texts = [model_text(example, model.spec.task) for example in examples]
    return encode_texts(model.tokenizer, texts, model.spec.max_length)


@torch.inference_mode()
def per_layer_metrics(
    model: EarlyExitModel, examples: list[Example], batch_size: int = 64
) -> list[dict[str, float]]:
    """The metrics of every exit on its own (no early exit), for the training report."""
    model.eval()
    targets = label_tensor(examples, model.spec.labels, model.spec.task)
    layer_logits = torch.cat(
        [model.forward_all_exits(encode_examples(model, chunk)) for chunk in _batches(examples, batch_size)],
        dim=1,
    )
    results = []
    for logits in layer_logits:
        predicted = predictions(torch.sigmoid(logits) if model.multi_label else logits, model.multi_label)
        results.append(
            task_metrics(
                model.spec.task,
                targets.numpy(),
                predicted.numpy(),
                model.spec.labels,
                model.spec.negative_label,
            )
        )
    return results


def _markable(examples: list[Example], task: str, path: str) -> tuple[list[Example], int]:
    """Relation-extraction rows whose entities can be marked, checked before training starts; the others (an
    entity nested in the other's only occurrence, e.g. 'mpa' in 'mpa treatment') are skipped with a warning."""
    if task != "relation-extraction":
        return examples, 0
    kept, problems = [], []
    for example in examples:
        try:
            model_text(example, task)
            kept.append(example)
        except InputError as error:
            problems.append(str(error))
    if problems:
        message = f"{path}: skipped {len(problems)} rows whose entities cannot be marked, e.g. {problems[0]}"
        print(f"warning: {message}", file=sys.stderr)
    if not kept:
        raise ConfigError(f"{path}: no row has entities that can be marked ({problems[0]})")
    return kept, len(problems)


def train(config: TrainConfig) -> dict:
    """Train, evaluate each exit on the dev set after every epoch, save the model directory; return a summary."""
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    train_examples = read_task_examples(config.train_path, config.task, "train", config.max_samples)
    dev_examples = read_task_examples(config.dev_path, config.task, "dev", config.max_dev_samples)
    train_examples, skipped_train = _markable(train_examples, config.task, config.train_path)
    dev_examples, skipped_dev = _markable(dev_examples, config.task, config.dev_path)
    labels = label_vocabulary(train_examples, config.task)
    model = build_model(config, labels)

    if config.freeze_backbone:
        model.backbone.requires_grad_(False)
    groups = [{"params": model.exits.parameters(), "lr": config.head_learning_rate}]
    if not config.freeze_backbone:
        groups.append({"params": model.backbone.parameters(), "lr": config.learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    steps_per_epoch = -(-len(train_examples) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )

    history = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        if config.freeze_backbone:
            model.backbone.eval()  # no dropout in a frozen backbone
        order = list(train_examples)
        random.shuffle(order)
        progress = tqdm(
            _batches(order, config.batch_size), desc=f"epoch {epoch}/{config.epochs}", unit="batch"
        )
        running = None
        for chunk in progress:
            inputs = encode_examples(model, chunk)
            targets = label_tensor(chunk, labels, config.task)
            loss = joint_loss(model.forward_all_exits(inputs), targets, model.multi_label)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            progress.set_postfix(loss=f"{running:.4f}")
        dev = per_layer_metrics(model, dev_examples)
        history.append(
            {"epoch": epoch, "loss": running, "dev_accuracy_per_exit": [round(m["accuracy"], 4) for m in dev]}
        )
        tqdm.write(  # stderr, like the progress bar: `--json` keeps stdout to one JSON object
            f"epoch {epoch}: dev accuracy per exit " + " ".join(f"{m['accuracy']:.3f}" for m in dev),
            file=sys.stderr,
        )

    model.eval()
    model.spec.training = {
        "backbone": config.backbone,
        "train": str(config.train_path),
        "dev": str(config.dev_path),
        "train_samples": len(train_examples),
        "skipped_rows": {"train": skipped_train, "dev": skipped_dev},
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "head_learning_rate": config.head_learning_rate,
        "freeze_backbone": config.freeze_backbone,
        "seed": config.seed,
        "train_seconds": round(time.perf_counter() - started, 1),
        "history": history,
    }
    Path(config.output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(config.output)
    return {
        "output": str(config.output),
        "labels": labels,
        "num_layers": model.num_layers,
        **model.spec.training,
    }
