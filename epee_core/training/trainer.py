"""Training exit heads (and the backbone) with the PABEE-style joint loss Σ_i w_i·loss_i, w_i = i / Σ_j j, and its
options: other layer weights, self-distillation from the final exit, early stopping on dev, and two-stage training
(backbone + final head first, then the other heads on the frozen backbone). See docs/training.md."""

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

from ..data.text import label_tensor, label_vocabulary, read_task_examples
from ..engine.backbones import build_backbone
from ..engine.inputs import (
    ENTITY_MARKERS,
    Example,
    InputError,
    add_entity_markers,
    model_text,
)
from ..engine.model import EarlyExitModel
from ..engine.policies import predictions
from ..engine.spec import ConfigError, ModelSpec
from ..evaluation.metrics import task_metrics

NEGATIVE_LABELS = ("None", "none", "false", "no_relation", "NA", "Other")
LAYER_WEIGHT_SCHEMES = ("pabee", "uniform")
# The dev metric early stopping watches (averaged over exits), per task: what the results report ranks by.
SELECTION_METRICS = {
    "text-classification": "accuracy",
    "image-classification": "accuracy",
    "relation-extraction": "micro_f1",
    "multi-label": "example_f1",
}


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
    learning_rate: float = 5e-5  # backbone
    head_learning_rate: float = 1e-3  # exit heads
    warmup_ratio: float = 0.1
    max_length: int = 128
    pooling: str | None = None
    max_dev_samples: int | None = None
    # Issue 9 options; the defaults are the original recipe (measured in docs/training.md).
    layer_weights: str = "pabee"  # pabee (i / Σi), uniform, or one comma-separated weight per layer
    distill_weight: float = 0.0  # α: early exits learn (1 − α)·task loss + α·T²·KL(final exit ‖ exit)
    distill_temperature: float = 2.0  # T
    early_stopping: int | None = None  # patience in epochs on the dev score; the best epoch's model is saved
    two_stage: bool = False  # stage 1: backbone + final head; stage 2: the other heads, backbone frozen
    stage2_epochs: int | None = None  # epochs of stage 2 (default: `epochs`)

    def validate(self) -> None:
        """Raise ConfigError naming the flag of the first out-of-range value (before any data is read)."""
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.learning_rate <= 0 or self.head_learning_rate <= 0:
            raise ConfigError(
                f"--lr and --head-lr must be > 0, got {self.learning_rate}, {self.head_learning_rate}"
            )
        parse_layer_weights(self.layer_weights)
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ConfigError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"--distill-temperature must be > 0, got {self.distill_temperature}")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise ConfigError(
                f"--early-stopping must be a patience of at least 1 epoch, got {self.early_stopping}"
            )
        if self.stage2_epochs is not None and not self.two_stage:
            raise ConfigError("--stage2-epochs needs --two-stage")
        if self.stage2_epochs is not None and self.stage2_epochs < 1:
            raise ConfigError(f"--stage2-epochs must be at least 1, got {self.stage2_epochs}")
        if self.two_stage and self.freeze_backbone:
            raise ConfigError(
                "--two-stage fine-tunes the backbone in stage 1; it cannot be combined with --freeze-backbone"
            )


# --- losses ----------------------------------------------------------------------------------------------------


def parse_layer_weights(scheme: str) -> str | list[float]:
    """`pabee`, `uniform`, or a list of non-negative weights from `"1,1,2"`; ConfigError otherwise."""
    if scheme in LAYER_WEIGHT_SCHEMES:
        return scheme
    try:
        values = [float(part) for part in scheme.split(",")]
    except ValueError:
        values = []
    if not values or any(value < 0 for value in values) or sum(values) <= 0:
        raise ConfigError(
            f"--layer-weights {scheme!r}: expected {', '.join(LAYER_WEIGHT_SCHEMES)} or one non-negative weight "
            "per layer, comma-separated (e.g. 1,1,1,1,1,2)"
        )
    return values


def layer_weights(num_layers: int, scheme: str = "pabee") -> torch.Tensor:
    """Per-exit loss weights, normalised to sum to 1. PABEE: exit i counts i times; uniform: all equal."""
    parsed = parse_layer_weights(scheme)
    if parsed == "pabee":
        weights = torch.arange(1, num_layers + 1, dtype=torch.float)
    elif parsed == "uniform":
        weights = torch.ones(num_layers)
    else:
        if len(parsed) != num_layers:
            raise ConfigError(
                f"--layer-weights {scheme!r}: {len(parsed)} weights for a {num_layers}-layer model"
            )
        weights = torch.tensor(parsed, dtype=torch.float)
    return weights / weights.sum()


def task_loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy against the labels (BCE per label for multi-label)."""
    if multi_label:
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)
    return nn.functional.cross_entropy(logits, targets)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, multi_label: bool
) -> torch.Tensor:
    """Soft-label loss of an early exit against the final exit, scaled by T² so its gradients keep their size
    as T changes (Hinton et al. 2015): KL(softmax(t/T) ‖ softmax(s/T)), or for multi-label the BCE of s/T
    against sigmoid(t/T). The teacher is detached: early exits learn from the final exit, never the reverse."""
    teacher_logits = teacher_logits.detach()
    if multi_label:
        soft_targets = torch.sigmoid(teacher_logits / temperature)
        loss = nn.functional.binary_cross_entropy_with_logits(student_logits / temperature, soft_targets)
    else:
        loss = nn.functional.kl_div(
            nn.functional.log_softmax(student_logits / temperature, dim=-1),
            nn.functional.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
    return loss * temperature**2


def joint_loss(
    all_logits: torch.Tensor,
    targets: torch.Tensor,
    multi_label: bool,
    weights: torch.Tensor | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 2.0,
) -> torch.Tensor:
    """Σ_i w_i·loss_i over the exits of `all_logits` [L, B, C] (w: PABEE's by default). With distillation every
    exit but the last learns (1 − α)·task loss + α·distillation loss; the final exit keeps the plain task loss."""
    num_layers = all_logits.shape[0]
    weights = layer_weights(num_layers) if weights is None else weights
    final_logits = all_logits[-1].detach()
    per_layer = []
    for index, logits in enumerate(all_logits):
        loss = task_loss(logits, targets, multi_label)
        if distill_weight > 0 and index < num_layers - 1:
            soft = distillation_loss(logits, final_logits, distill_temperature, multi_label)
            loss = (1 - distill_weight) * loss + distill_weight * soft
        per_layer.append(loss)
    return (torch.stack(per_layer) * weights.to(all_logits.device)).sum()


# --- data and model --------------------------------------------------------------------------------------------


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


@torch.inference_mode()
def per_layer_metrics(
    model: EarlyExitModel, examples: list[Example], batch_size: int = 64
) -> list[dict[str, float]]:
    """The metrics of every exit on its own (no early exit), for the training report."""
    model.eval()
    targets = label_tensor(examples, model.spec.labels, model.spec.task)
    layer_logits = torch.cat(
        [model.forward_all_exits(model.encode_examples(chunk)) for chunk in _batches(examples, batch_size)],
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


def dev_score(metrics_per_exit: list[dict[str, float]], metric: str, final_exit_only: bool) -> float:
    """The number early stopping maximises: `metric` averaged over all exits (how good early exiting can be), or
    of the final exit alone in two-stage's stage 1, where only the final head is trained."""
    if final_exit_only:
        return metrics_per_exit[-1][metric]
    return sum(metrics[metric] for metrics in metrics_per_exit) / len(metrics_per_exit)


def train_stage(
    model: EarlyExitModel,
    config: TrainConfig,
    stage: str,
    epochs: int,
    parameter_groups: list[dict],
    weights: torch.Tensor,
    distill_weight: float,
    train_examples: list,
    dev_examples: list,
    history: list[dict],
) -> dict:
    """Run up to `epochs` epochs of one stage, report each exit on dev after every epoch (appended to `history`).

    `stage` is `joint` (all exits together, the default), `backbone` (two-stage 1: backbone + final head) or
    `heads` (two-stage 2: backbone frozen). With `config.early_stopping` = N the stage stops after N epochs
    without a better dev score and the best epoch's weights are put back. Returns the kept epoch's record."""
    backbone_frozen = stage == "heads" or config.freeze_backbone
    metric = SELECTION_METRICS[config.task]
    optimizer = torch.optim.AdamW(parameter_groups, weight_decay=0.01)
    total_steps = -(-len(train_examples) // config.batch_size) * epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    best, best_state = None, None
    for epoch in range(1, epochs + 1):
        model.train()
        if backbone_frozen:
            model.backbone.eval()  # no dropout in a frozen backbone
        if stage == "heads":
            model.exits.heads[-1].eval()  # the frozen final head: a steady teacher, no dropout
        order = list(train_examples)
        random.shuffle(order)
        name = "" if stage == "joint" else f"{stage} "
        progress = tqdm(
            _batches(order, config.batch_size), desc=f"{name}epoch {epoch}/{epochs}", unit="batch"
        )
        running = None
        for chunk in progress:
            inputs = model.encode_examples(chunk)
            targets = label_tensor(chunk, model.spec.labels, config.task)
            loss = joint_loss(
                model.forward_all_exits(inputs),
                targets,
                model.multi_label,
                weights,
                distill_weight,
                config.distill_temperature,
            )
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            progress.set_postfix(loss=f"{running:.4f}")

        dev = per_layer_metrics(model, dev_examples)
        record = {
            "stage": stage,
            "epoch": epoch,
            "loss": running,
            "dev_accuracy_per_exit": [round(m["accuracy"], 4) for m in dev],
            f"dev_{metric}_per_exit": [round(m[metric], 4) for m in dev],
            "dev_score": round(dev_score(dev, metric, final_exit_only=stage == "backbone"), 4),
        }
        history.append(record)
        tqdm.write(  # stderr, like the progress bar: `--json` keeps stdout to one JSON object
            f"{name}epoch {epoch}: dev accuracy per exit " + " ".join(f"{m['accuracy']:.3f}" for m in dev),
            file=sys.stderr,
        )
        if best is None or record["dev_score"] > best["dev_score"]:
            best = record
            if config.early_stopping:
                best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        elif config.early_stopping and epoch - best["epoch"] >= config.early_stopping:
            tqdm.write(f"early stopping: no better dev score since epoch {best['epoch']}", file=sys.stderr)
            break
    if best_state is not None and best is not history[-1]:
        model.load_state_dict(best_state)
    return best if config.early_stopping else history[-1]


def train(config: TrainConfig) -> dict:
    """Train, evaluate each exit on the dev set after every epoch, save the model directory; return a summary."""
    config.validate()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    train_examples = read_task_examples(config.train_path, config.task, "train", config.max_samples)
    dev_examples = read_task_examples(config.dev_path, config.task, "dev", config.max_dev_samples)
    train_examples, skipped_train = _markable(train_examples, config.task, config.train_path)
    dev_examples, skipped_dev = _markable(dev_examples, config.task, config.dev_path)
    labels = label_vocabulary(train_examples, config.task)
    model = build_model(config, labels)
    weights = layer_weights(model.num_layers, config.layer_weights)
    heads = model.exits.heads

    history: list[dict] = []
    kept: list[dict] = []
    started = time.perf_counter()
    if not config.two_stage:
        if config.freeze_backbone:
            model.backbone.requires_grad_(False)
        groups = [{"params": model.exits.parameters(), "lr": config.head_learning_rate}]
        if not config.freeze_backbone:
            groups.append({"params": model.backbone.parameters(), "lr": config.learning_rate})
        kept.append(
            train_stage(
                model,
                config,
                "joint",
                config.epochs,
                groups,
                weights,
                config.distill_weight,
                train_examples,
                dev_examples,
                history,
            )
        )
    else:
        # Stage 1: fine-tune the backbone for the final exit alone, as a plain classifier would be trained, so
        # early-exit losses cannot pull the full-depth prediction down (DeeBERT's two-stage scheme).
        final_only = torch.zeros(model.num_layers)
        final_only[-1] = 1.0
        groups = [
            {"params": heads[-1].parameters(), "lr": config.head_learning_rate},
            {"params": model.backbone.parameters(), "lr": config.learning_rate},
        ]
        kept.append(
            train_stage(
                model,
                config,
                "backbone",
                config.epochs,
                groups,
                final_only,
                0.0,
                train_examples,
                dev_examples,
                history,
            )
        )
        # Stage 2: the backbone and the final head stay as stage 1 left them; the other heads learn to
        # approximate them (labels, plus the final exit's soft labels with --distill-weight).
        model.backbone.requires_grad_(False)
        heads[-1].requires_grad_(False)
        groups = [
            {"params": [p for head in heads[:-1] for p in head.parameters()], "lr": config.head_learning_rate}
        ]
        kept.append(
            train_stage(
                model,
                config,
                "heads",
                config.stage2_epochs or config.epochs,
                groups,
                weights,
                config.distill_weight,
                train_examples,
                dev_examples,
                history,
            )
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
        "max_length": config.max_length,
        "freeze_backbone": config.freeze_backbone,
        "layer_weights": config.layer_weights,
        "distill_weight": config.distill_weight,
        "distill_temperature": config.distill_temperature,
        "early_stopping": config.early_stopping,
        "two_stage": config.two_stage,
        "stage2_epochs": (config.stage2_epochs or config.epochs) if config.two_stage else None,
        "selection_metric": SELECTION_METRICS[config.task],
        "kept_epochs": {record["stage"]: record["epoch"] for record in kept},
        "dev_accuracy_per_exit": kept[-1]["dev_accuracy_per_exit"],
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
