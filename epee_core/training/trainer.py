"""Training exit heads (and the backbone) with the PABEE-style joint loss Σ_i w_i·loss_i, w_i = i / Σ_j j, and its
options: other layer weights, self-distillation from the final exit, early stopping on dev, and two-stage training
(backbone + final head first, then the other heads on the frozen backbone); the recipe defaults of each backbone,
label-stratified samples, class balance, image augmentation and length-bucketed batches. See docs/training.md."""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..data.sampling import stratified_sample
from ..data.text import example_labels, label_tensor, label_vocabulary, read_task_examples
from ..engine.backbones import build_backbone, check_backbone
from ..engine.inputs import ENTITY_MARKERS, Example, ImageExample, add_entity_markers, model_text
from ..engine.model import EarlyExitModel
from ..engine.signals import layer_probs, normalised_entropy, predictions
from ..engine.spec import ConfigError, ModelSpec
from ..evaluation.metrics import task_metrics
from .augment import augmentation
from .recipes import AUGMENTATIONS, CLASS_BALANCE, recipe_for

NEGATIVE_LABELS = ("None", "none", "false", "no_relation", "NA", "Other")
LAYER_WEIGHT_SCHEMES = ("pabee", "uniform")
# The dev metric early stopping watches (averaged over exits), per task: what the results report ranks by.
SELECTION_METRICS = {
    "text-classification": "accuracy",
    "image-classification": "accuracy",
    "relation-extraction": "micro_f1",
    "multi-label": "example_f1",
}


# TrainConfig fields whose None means "the backbone's recipe value" (training/recipes.py).
RECIPE_FIELDS = (
    "epochs",
    "learning_rate",
    "head_learning_rate",
    "batch_size",
    "max_length",
    "augment",
    "class_balance",
    "balance_power",
    "distill_weight",
)
# How many batches' worth of shuffled rows are sorted by length together (length bucketing).
BUCKET_CHUNK_BATCHES = 50


@dataclass
class TrainConfig:
    task: str
    backbone: str
    train_path: str
    dev_path: str
    output: str
    # None: the backbone's recipe value (`RECIPE_FIELDS`, filled in by `with_recipe`).
    epochs: int | None = None
    max_samples: int | None = None  # a seeded, label-stratified sample of the training rows
    freeze_backbone: bool = False
    seed: int = 0
    batch_size: int | None = None
    learning_rate: float | None = None  # backbone
    head_learning_rate: float | None = None  # exit heads
    warmup_ratio: float = 0.1
    max_length: int | None = None
    pooling: str | None = None
    max_dev_samples: int | None = None  # a seeded, label-stratified sample of the dev rows
    augment: str | None = None  # images: none, mild, flip
    class_balance: str | None = None  # none, weights (loss), sampler (balanced draws)
    balance_power: float | None = None  # class weights ∝ n_c^-power (1: balanced)
    skip_invalid: bool = False  # leave unusable rows out (counted) instead of stopping at the first
    threads: int | None = None  # torch threads while training (default: torch's)
    length_bucketing: bool = True  # text: batches of similar length, so they carry little padding
    # Exit-training options; the defaults are the original joint loss (measured in docs/training.md).
    layer_weights: str = "pabee"  # pabee (i / Σi), uniform, or one comma-separated weight per layer
    distill_weight: float | None = None  # α: early exits learn (1 − α)·task loss + α·T²·KL(final exit ‖ exit)
    distill_temperature: float = 2.0  # T
    rank_weight: float = 0.0  # β: early exits add β·`ranking_loss` (0: off)
    rank_margin: float = 0.3  # its margin in normalised entropy
    early_stopping: int | None = None  # patience in epochs on the dev score; the best epoch's model is saved
    two_stage: bool = False  # stage 1: backbone + final head; stage 2: the other heads, backbone frozen
    stage2_epochs: int | None = None  # epochs of stage 2 (default: `epochs`)

    def with_recipe(self) -> tuple[TrainConfig, dict]:
        """This config with every unset recipe field taken from the backbone's recipe, and a record of the
        recipe: its name, the values used and which of them the caller set (`overridden`)."""
        name, recipe = recipe_for(self.backbone, self.task)
        defaults = recipe.as_dict()
        image = self.task == "image-classification"
        values, overridden = {}, []
        for key in RECIPE_FIELDS:
            given = getattr(self, key)
            if given is not None:
                overridden.append(key)
            values[key] = given if given is not None else defaults.get(key)
        if image:
            values["max_length"] = None
            values["augment"] = values["augment"] or "none"
        record = {"name": name, **{key: value for key, value in values.items() if value is not None}}
        record["overridden"] = overridden
        return replace(self, **values), record

    def validate(self) -> None:
        """Raise ConfigError naming the flag of the first out-of-range value (before any data is read)."""
        missing = [
            key
            for key in RECIPE_FIELDS
            if getattr(self, key) is None and key not in ("max_length", "augment")
        ]
        if missing:
            raise ValueError(
                f"TrainConfig.validate needs the recipe filled in (with_recipe), {missing} unset"
            )
        check_backbone(self.backbone)
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
        if self.rank_weight < 0:
            raise ConfigError(f"--rank-weight must be >= 0, got {self.rank_weight}")
        if not 0.0 < self.rank_margin <= 1.0:
            raise ConfigError(f"--rank-margin must be in (0, 1], got {self.rank_margin}")
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
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        for flag, value in (("--max-samples", self.max_samples), ("--max-dev-samples", self.max_dev_samples)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if not 0.0 <= self.balance_power <= 1.0:
            raise ConfigError(f"--balance-power must be in [0, 1], got {self.balance_power}")
        if self.class_balance not in CLASS_BALANCE:
            raise ConfigError(
                f"--class-balance {self.class_balance!r}: expected one of {', '.join(CLASS_BALANCE)}"
            )
        if self.class_balance == "sampler" and self.task == "multi-label":
            raise ConfigError(
                "--class-balance sampler draws rows by their one label; for multi-label use weights or none"
            )
        if self.augment is not None and self.augment not in AUGMENTATIONS:
            raise ConfigError(f"--augment {self.augment!r}: expected one of {', '.join(AUGMENTATIONS)}")
        if self.augment not in (None, "none") and self.task != "image-classification":
            raise ConfigError(f"--augment {self.augment} is for image-classification, not {self.task}")


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


def task_loss(
    logits: torch.Tensor, targets: torch.Tensor, multi_label: bool, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy against the labels (BCE per label for multi-label). `class_weights`: per-class weights of
    the cross-entropy, or for multi-label each label's weight of its positive term (`pos_weight`)."""
    if multi_label:
        return nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=class_weights)
    return nn.functional.cross_entropy(logits, targets, weight=class_weights)


def class_weights(examples: list, labels: list[str], task: str, power: float = 0.5) -> torch.Tensor:
    """Inverse-frequency weights: class c weighs n_c^-power, scaled so the mean weight of a training row is 1.
    The effective class prior moves from the data's towards uniform, in log-odds by the share `power`: 1 is
    fully balanced (what a changed or unknown class prior calls for), 0.5 half-way, which lifts rare classes
    without drowning the common ones (DDI: `None` 0.65, `effect` 2.2, `int` 8.7). Multi-label: each label's
    positive term weighs (negatives / positives)^power."""
    counts = Counter(label for example in examples for label in example_labels(example, task))
    n = torch.tensor([float(counts[label]) for label in labels]).clamp(min=1.0)
    if task == "multi-label":
        return ((len(examples) - n).clamp(min=1.0) / n).pow(power)
    weights = n.pow(-power)
    return weights * n.sum() / (n * weights).sum()


def row_weights(examples: list, labels: list[str], task: str, power: float = 0.5) -> list[float]:
    """Each training row's draw weight for `--class-balance sampler`: its class's `class_weights` value."""
    weights = class_weights(examples, labels, task, power)
    index = {label: i for i, label in enumerate(labels)}
    return [float(weights[index[example.label]]) for example in examples]


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


def ranking_loss(
    logits: torch.Tensor, targets: torch.Tensor, multi_label: bool, margin: float
) -> torch.Tensor:
    """Certainty ranking within a batch (CascadeBERT's difficulty-aware objective, Li et al. 2021, with the exit
    policies' own signal): every row the exit gets right should be more certain than every row it gets wrong, by
    `margin` in normalised entropy H. Mean over such pairs of max(0, margin − (H_wrong − H_right)); 0 when the
    batch has no right/wrong pair. Multi-label: a row is right when its whole label set is."""
    probs = layer_probs(logits, multi_label)
    entropy = normalised_entropy(probs, multi_label)
    guessed = predictions(probs, multi_label)
    right = (guessed == targets.bool()).all(-1) if multi_label else guessed == targets
    gaps = entropy[~right].unsqueeze(0) - entropy[right].unsqueeze(1)  # [right, wrong]
    if gaps.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph: no pair, no gradient
    return torch.relu(margin - gaps).mean()


def joint_loss(
    all_logits: torch.Tensor,
    targets: torch.Tensor,
    multi_label: bool,
    weights: torch.Tensor | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 2.0,
    class_weights: torch.Tensor | None = None,
    rank_weight: float = 0.0,
    rank_margin: float = 0.3,
) -> torch.Tensor:
    """Σ_i w_i·loss_i over the exits of `all_logits` [L, B, C] (w: PABEE's by default). With distillation every
    exit but the last learns (1 − α)·task loss + α·distillation loss; the final exit keeps the plain task loss.
    With `rank_weight` β every exit but the last adds β·`ranking_loss`."""
    num_layers = all_logits.shape[0]
    weights = layer_weights(num_layers) if weights is None else weights
    final_logits = all_logits[-1].detach()
    per_layer = []
    for index, logits in enumerate(all_logits):
        loss = task_loss(logits, targets, multi_label, class_weights)
        if distill_weight > 0 and index < num_layers - 1:
            soft = distillation_loss(logits, final_logits, distill_temperature, multi_label)
            loss = (1 - distill_weight) * loss + distill_weight * soft
        if rank_weight > 0 and index < num_layers - 1:
            loss = loss + rank_weight * ranking_loss(logits, targets, multi_label, rank_margin)
        per_layer.append(loss)
    return (torch.stack(per_layer) * weights.to(all_logits.device)).sum()


# --- data and model --------------------------------------------------------------------------------------------


def _batches(items: list, batch_size: int) -> list[list]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def token_lengths(model: EarlyExitModel, examples: list) -> list[int] | None:
    """Tokens per example as the model will see them (truncated to max_length); None for images."""
    if model.spec.task == "image-classification":
        return None
    texts = [model_text(example, model.spec.task) for example in examples]
    encoded = model.tokenizer(texts, truncation=True, max_length=model.spec.max_length)
    return [len(ids) for ids in encoded["input_ids"]]


def epoch_batches(
    order: list[int], batch_size: int, lengths: list[int] | None, rng: random.Random
) -> list[list[int]]:
    """One epoch's batches of row indices from a shuffled `order`. With `lengths` (length bucketing), each chunk
    of `BUCKET_CHUNK_BATCHES` batches' rows is sorted by length and cut into batches, and the batches are
    shuffled: rows of similar length share a batch (little padding) while which rows meet stays random."""
    if lengths is None:
        return _batches(order, batch_size)
    chunk = batch_size * BUCKET_CHUNK_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda index: lengths[index])
        batches += _batches(part, batch_size)
    rng.shuffle(batches)
    return batches


def padding_share(batches: list[list[int]], lengths: list[int] | None) -> float | None:
    """Share of the token slots of `batches` that are padding (None for images)."""
    if lengths is None:
        return None
    slots = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1.0 - sum(lengths[i] for batch in batches for i in batch) / slots


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


def dev_score(metrics_per_exit: list[dict[str, float]], metric: str, final_exit_only: bool) -> float:
    """The number early stopping maximises: `metric` averaged over all exits (how good early exiting can be), or
    of the final exit alone in two-stage's stage 1, where only the final head is trained."""
    if final_exit_only:
        return metrics_per_exit[-1][metric]
    return sum(metrics[metric] for metrics in metrics_per_exit) / len(metrics_per_exit)


@dataclass
class TrainingSet:
    """The training rows and what every epoch needs from them, computed once."""

    examples: list
    lengths: list[int] | None  # tokens per row (length bucketing); None for images or without bucketing
    draw_weights: list[float] | None  # `--class-balance sampler`: each row's draw weight
    class_weights: torch.Tensor | None  # `--class-balance weights`: the loss's class weights
    augment: object | None  # image augmentation (training only)
    rng: random.Random
    samples_seen: int = 0
    step_seconds: float = 0.0
    padding: list[float] | None = None

    def epoch(self, batch_size: int) -> list[list[int]]:
        """One epoch's batches of row indices: shuffled (or drawn class-balanced), length-bucketed for text."""
        count = len(self.examples)
        if self.draw_weights is not None:
            order = self.rng.choices(range(count), weights=self.draw_weights, k=count)
        else:
            order = list(range(count))
            self.rng.shuffle(order)
        batches = epoch_batches(order, batch_size, self.lengths, self.rng)
        share = padding_share(batches, self.lengths)
        if share is not None:
            self.padding = (self.padding or []) + [round(share, 4)]
        return batches

    def record(self) -> dict:
        """What the training record says about the rows as trained: class weights, length bucketing, padding and
        training speed."""
        speed = self.samples_seen / self.step_seconds if self.step_seconds else None
        return {
            "class_weights": None
            if self.class_weights is None
            else [round(float(w), 4) for w in self.class_weights],
            "length_bucketing": self.lengths is not None,
            "padding_share": round(sum(self.padding) / len(self.padding), 4) if self.padding else None,
            "train_samples_per_second": round(speed, 2) if speed else None,
        }

    def batch(self, indices: list[int]) -> list:
        """The examples of a batch; images freshly augmented."""
        chosen = [self.examples[index] for index in indices]
        if self.augment is None:
            return chosen
        return [ImageExample(self.augment(example.image), example.label) for example in chosen]


def train_stage(
    model: EarlyExitModel,
    config: TrainConfig,
    stage: str,
    epochs: int,
    parameter_groups: list[dict],
    weights: torch.Tensor,
    distill_weight: float,
    training_set: TrainingSet,
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
    total_steps = -(-len(training_set.examples) // config.batch_size) * epochs
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
        name = "" if stage == "joint" else f"{stage} "
        progress = tqdm(
            training_set.epoch(config.batch_size), desc=f"{name}epoch {epoch}/{epochs}", unit="batch"
        )
        running = None
        for indices in progress:
            started = time.perf_counter()
            chunk = training_set.batch(indices)
            inputs = model.encode_examples(chunk)
            targets = label_tensor(chunk, model.spec.labels, config.task)
            loss = joint_loss(
                model.forward_all_exits(inputs),
                targets,
                model.multi_label,
                weights,
                distill_weight,
                config.distill_temperature,
                training_set.class_weights,
                config.rank_weight,
                config.rank_margin,
            )
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            training_set.step_seconds += time.perf_counter() - started
            training_set.samples_seen += len(chunk)
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
            f"{name}epoch {epoch}: dev accuracy per exit "
            + " ".join(f"{m['accuracy']:.3f}" for m in dev)
            + ("" if metric == "accuracy" else f"; {metric} " + " ".join(f"{m[metric]:.3f}" for m in dev)),
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


def _note(message: str) -> None:
    print(f"epee: {message}", file=sys.stderr, flush=True)


def describe_recipe(recipe: dict) -> str:
    """One line: the recipe's name and values, and which of them flags set."""
    names = {
        "epochs": "epochs",
        "learning_rate": "lr",
        "head_learning_rate": "head lr",
        "batch_size": "batch",
        "max_length": "max length",
        "augment": "augment",
        "class_balance": "class balance",
        "balance_power": "balance power",
        "distill_weight": "distill",
    }
    values = ", ".join(
        f"{label} {recipe[key]:g}" if isinstance(recipe[key], float) else f"{label} {recipe[key]}"
        for key, label in names.items()
        if key in recipe
    )
    line = f"recipe {recipe['name']}: {values}"
    if recipe["overridden"]:
        line += " (set by flags: " + ", ".join(names[key] for key in recipe["overridden"]) + ")"
    return line


def read_training_data(config: TrainConfig, notify=_note) -> tuple[list, list, list[str], dict]:
    """The training and dev examples, checked before any model is built: unusable rows (one rule, see
    `data.rows`), a training set with too few labels, dev labels the training set lacks. `--max-samples` and
    `--max-dev-samples` take seeded, label-stratified samples. Returns train, dev, labels and the skipped rows."""
    train_data = read_task_examples(
        config.train_path, config.task, "train", skip_invalid=config.skip_invalid, notify=notify
    )
    train_examples = stratified_sample(train_data.examples, config.max_samples, config.task, config.seed)
    labels = label_vocabulary(train_examples, config.task)
    if config.task != "multi-label" and len(labels) < 2:
        raise ConfigError(
            f"{config.train_path}: the training rows carry {len(labels)} label(s) ({', '.join(labels)}); "
            "a classifier needs at least 2"
        )
    if config.task == "multi-label" and not labels:
        raise ConfigError(f"{config.train_path}: no training row carries a label")
    dev_data = read_task_examples(
        config.dev_path,
        config.task,
        "dev",
        skip_invalid=config.skip_invalid,
        labels=labels,
        known_by="the training set" + (" sample" if config.max_samples else ""),
        notify=notify,
    )
    dev_examples = stratified_sample(dev_data.examples, config.max_dev_samples, config.task, config.seed)
    return (
        train_examples,
        dev_examples,
        labels,
        {"train": train_data.skipped_rows, "dev": dev_data.skipped_rows},
    )


def train(config: TrainConfig, notify=_note) -> dict:
    """Train, evaluate each exit on the dev set after every epoch, save the model directory; return a summary.

    Unset recipe fields come from the backbone's recipe (`training.recipes`); once the data has passed its
    checks, the recipe line goes to `notify` (stderr)."""
    config, recipe = config.with_recipe()
    config.validate()
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, recipe, notify)
    finally:
        torch.set_num_threads(previous_threads)


def _train(config: TrainConfig, recipe: dict, notify) -> dict:
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    train_examples, dev_examples, labels, skipped = read_training_data(config, notify)
    notify(describe_recipe(recipe))
    model = build_model(config, labels)
    training_set = build_training_set(config, model, train_examples, labels)
    history: list[dict] = []
    started = time.perf_counter()
    kept = run_stages(model, config, training_set, dev_examples, history)
    seconds = time.perf_counter() - started
    model.eval()
    model.spec.training = {
        **recorded_settings(config, recipe),
        "train_samples": len(train_examples),
        "dev_samples": len(dev_examples),
        "skipped_rows": skipped,
        "selection_metric": SELECTION_METRICS[config.task],
        "kept_epochs": {record["stage"]: record["epoch"] for record in kept},
        "dev_accuracy_per_exit": kept[-1]["dev_accuracy_per_exit"],
        "threads": torch.get_num_threads(),
        **training_set.record(),
        "train_seconds": round(seconds, 1),
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


def build_training_set(
    config: TrainConfig, model: EarlyExitModel, examples: list, labels: list[str]
) -> TrainingSet:
    """The training rows with their token lengths (length bucketing), class balance and image augmentation."""
    balance, power = config.class_balance, config.balance_power
    return TrainingSet(
        examples=examples,
        lengths=token_lengths(model, examples) if config.length_bucketing else None,
        draw_weights=row_weights(examples, labels, config.task, power) if balance == "sampler" else None,
        class_weights=class_weights(examples, labels, config.task, power) if balance == "weights" else None,
        augment=augmentation(config.augment),
        rng=random.Random(config.seed),
    )


def run_stages(
    model: EarlyExitModel,
    config: TrainConfig,
    training_set: TrainingSet,
    dev_examples: list,
    history: list[dict],
) -> list[dict]:
    """Train jointly, or in two stages with `config.two_stage`; return each stage's kept epoch record."""
    weights = layer_weights(model.num_layers, config.layer_weights)
    heads = model.exits.heads
    stage_args = (weights, config.distill_weight, training_set, dev_examples, history)
    if not config.two_stage:
        if config.freeze_backbone:
            model.backbone.requires_grad_(False)
        groups = [{"params": model.exits.parameters(), "lr": config.head_learning_rate}]
        if not config.freeze_backbone:
            groups.append({"params": model.backbone.parameters(), "lr": config.learning_rate})
        return [train_stage(model, config, "joint", config.epochs, groups, *stage_args)]
    # Stage 1: fine-tune the backbone for the final exit alone, as a plain classifier would be trained, so
    # early-exit losses cannot pull the full-depth prediction down (DeeBERT's two-stage scheme).
    final_only = torch.zeros(model.num_layers)
    final_only[-1] = 1.0
    groups = [
        {"params": heads[-1].parameters(), "lr": config.head_learning_rate},
        {"params": model.backbone.parameters(), "lr": config.learning_rate},
    ]
    first = train_stage(model, config, "backbone", config.epochs, groups, final_only, 0.0, *stage_args[2:])
    # Stage 2: the backbone and the final head stay as stage 1 left them; the other heads learn to
    # approximate them (labels, plus the final exit's soft labels with --distill-weight).
    model.backbone.requires_grad_(False)
    heads[-1].requires_grad_(False)
    groups = [
        {"params": [p for head in heads[:-1] for p in head.parameters()], "lr": config.head_learning_rate}
    ]
    second = train_stage(model, config, "heads", config.stage2_epochs or config.epochs, groups, *stage_args)
    return [first, second]


# TrainConfig fields the training record does not copy: the task and pooling are the model's own fields, the
# output is the model directory itself, the data paths are recorded as `train` and `dev`, threads and length
# bucketing as they took effect, and stage-2 epochs only for two-stage training.
NOT_RECORDED = (
    "task",
    "train_path",
    "dev_path",
    "output",
    "pooling",
    "warmup_ratio",
    "skip_invalid",
    "threads",
    "length_bucketing",
    "stage2_epochs",
)


def recorded_settings(config: TrainConfig, recipe: dict) -> dict:
    """The settings part of the training record (epee.yaml `training`): the recipe, the data files and every
    TrainConfig field that decides what is trained."""
    settings = {
        field.name: getattr(config, field.name) for field in fields(config) if field.name not in NOT_RECORDED
    }
    return {
        "backbone": settings.pop("backbone"),
        "recipe": recipe,
        "train": str(config.train_path),
        "dev": str(config.dev_path),
        **settings,
        "stage2_epochs": (config.stage2_epochs or config.epochs) if config.two_stage else None,
    }
