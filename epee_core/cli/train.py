"""`epee train`: train a backbone and its exit heads."""

from __future__ import annotations

from ..engine.spec import TASKS
from ..training.recipes import AUGMENTATIONS, CLASS_BALANCE
from .common import emit

INPUT_FLAGS = (
    ("--train", "training JSONL file; images: MedMNIST .npz (train_*) or image folder"),
    ("--dev", "dev JSONL file (per-exit accuracy after each epoch); images: .npz (val_*) or image folder"),
    ("--output", "model directory to write"),
)
# flag, type, choices, help: every recipe value defaults to the backbone's recipe (training/recipes.py)
RECIPE_FLAGS = (
    ("--epochs", int, None, "passes over the training rows"),
    ("--batch-size", int, None, "training rows per optimizer step"),
    ("--lr", float, None, "backbone learning rate"),
    ("--head-lr", float, None, "exit heads' learning rate"),
    ("--max-length", int, None, "maximum tokens per input (text)"),
    ("--augment", None, AUGMENTATIONS, "image augmentation: mild (rotation, shift, zoom, brightness/contrast; "
     "no flips), flip (mild + horizontal flips), none"),
    ("--class-balance", None, CLASS_BALANCE, "for skewed label sets: weights (inverse-frequency loss weights), "
     "sampler (draw rows with those weights), none"),
    ("--balance-power", float, None, "class weights ∝ (1 / class count)^P: 1 = fully balanced, 0.5 = half-way "
     "(in log-odds)"),
)  # fmt: skip


def add_train(commands) -> None:
    parser = commands.add_parser(
        "train", help="train a backbone and its exit heads on a JSONL data set (images: .npz or image folder)"
    )
    parser.add_argument("--task", required=True, choices=TASKS, help="what the model predicts")
    parser.add_argument(
        "--backbone",
        required=True,
        help="minilm, bert-small, albert-small, gpt2-small, vit-small, or a local Hugging Face checkpoint dir",
    )
    for flag, text in INPUT_FLAGS:
        parser.add_argument(flag, required=True, help=text)
    recipe = parser.add_argument_group(
        "recipe (default: the backbone's recipe, printed when training starts; docs/training.md)"
    )
    for flag, kind, choices, text in RECIPE_FLAGS:
        recipe.add_argument(flag, type=kind, choices=choices, help=text)
    parser.add_argument(
        "--max-samples", type=int, help="train on a seeded, label-stratified sample of N training rows"
    )
    parser.add_argument(
        "--max-dev-samples", type=int, help="report on a seeded, label-stratified sample of N dev rows"
    )
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the exit heads")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, samples and batch order")
    parser.add_argument("--threads", type=int, help="torch threads while training (default: torch's)")
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave unusable rows out (counted per reason) instead of stopping at the first",
    )
    parser.add_argument(
        "--pooling", choices=["mean", "cls", "last"], help="exit pooling (default: the backbone's)"
    )
    exits = parser.add_argument_group("exit training options (docs/training.md)")
    exits.add_argument(
        "--layer-weights",
        default="pabee",
        help="loss weight of each exit: pabee (exit i counts i times, default), uniform, or one weight per layer "
        "comma-separated (e.g. 1,1,1,1,1,2)",
    )
    exits.add_argument(
        "--distill-weight",
        type=float,
        help="self-distillation α in [0, 1]: early exits learn (1-α)·label loss + α·soft loss against the final "
        "exit (default: the recipe's, minilm 0.5, others 0 = off)",
    )
    exits.add_argument(
        "--distill-temperature",
        type=float,
        default=2.0,
        help="softmax temperature of distillation (default 2)",
    )
    exits.add_argument(
        "--rank-weight",
        type=float,
        default=0.0,
        help="β ≥ 0 of certainty ranking: each early exit also learns β·max(0, margin − (H_wrong − H_right)) over "
        "its right/wrong row pairs in a batch, H its normalised entropy (CascadeBERT's difficulty-aware "
        "objective; default 0 = off)",
    )
    exits.add_argument(
        "--rank-margin",
        type=float,
        default=0.3,
        help="margin of certainty ranking in normalised entropy, in (0, 1] (default 0.3)",
    )
    exits.add_argument(
        "--early-stopping",
        type=int,
        metavar="N",
        help="stop after N epochs without a better dev score (the task metric averaged over exits) and save "
        "the best epoch's model",
    )
    exits.add_argument(
        "--two-stage",
        action="store_true",
        help="stage 1 fine-tunes the backbone with the final exit only; stage 2 trains the other exit heads "
        "on the frozen backbone",
    )
    exits.add_argument("--stage2-epochs", type=int, metavar="N", help="epochs of stage 2 (default: --epochs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_train)


def train_config_from_args(args):
    """The TrainConfig that `epee train` flags describe (checked by `TrainConfig.validate` when training starts)."""
    from ..training.trainer import TrainConfig

    return TrainConfig(
        task=args.task,
        backbone=args.backbone,
        train_path=args.train,
        dev_path=args.dev,
        output=args.output,
        epochs=args.epochs,
        max_samples=args.max_samples,
        max_dev_samples=args.max_dev_samples,
        freeze_backbone=args.freeze_backbone,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        head_learning_rate=args.head_lr,
        max_length=args.max_length,
        pooling=args.pooling,
        layer_weights=args.layer_weights,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        rank_weight=args.rank_weight,
        rank_margin=args.rank_margin,
        early_stopping=args.early_stopping,
        two_stage=args.two_stage,
        stage2_epochs=args.stage2_epochs,
        augment=args.augment,
        class_balance=args.class_balance,
        balance_power=args.balance_power,
        skip_invalid=args.skip_invalid,
        threads=args.threads,
    )


def run_train(args) -> None:
    from ..training.trainer import train

    summary = train(train_config_from_args(args))
    kept = summary["dev_accuracy_per_exit"]
    emit(
        summary,
        args.json,
        lambda s: (
            f"saved {s['output']} ({s['train_seconds']} s, {s['train_samples_per_second']} training "
            f"samples/s); dev accuracy per exit: {kept}"
        ),
    )
