"""`epee train`: train a backbone and its exit heads."""

from __future__ import annotations

from ..engine.spec import TASKS
from .common import emit


def add_train(commands) -> None:
    parser = commands.add_parser(
        "train", help="train a backbone and its exit heads on a JSONL data set (images: .npz or image folder)"
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument(
        "--backbone",
        required=True,
        help="minilm, bert-small, albert-small, gpt2-small, vit-small, or a local Hugging Face checkpoint dir",
    )
    parser.add_argument(
        "--train", required=True, help="training JSONL file; images: MedMNIST .npz (train_*) or image folder"
    )
    parser.add_argument(
        "--dev",
        required=True,
        help="dev JSONL file (per-exit accuracy after each epoch); images: .npz (val_*) or image folder",
    )
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-samples", type=int, help="use only the first N training examples")
    parser.add_argument("--max-dev-samples", type=int, help="use only the first N dev examples")
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the exit heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5, help="backbone learning rate (default 5e-5)")
    parser.add_argument(
        "--head-lr", type=float, default=1e-3, help="exit heads' learning rate (default 1e-3)"
    )
    parser.add_argument("--max-length", type=int, default=128, help="maximum tokens per input")
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
        default=0.0,
        help="self-distillation α in [0, 1]: early exits learn (1-α)·label loss + α·soft loss against the final "
        "exit (default 0 = off)",
    )
    exits.add_argument(
        "--distill-temperature",
        type=float,
        default=2.0,
        help="softmax temperature of distillation (default 2)",
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
        early_stopping=args.early_stopping,
        two_stage=args.two_stage,
        stage2_epochs=args.stage2_epochs,
    )


def run_train(args) -> None:
    from ..training.trainer import train

    summary = train(train_config_from_args(args))
    kept = summary["dev_accuracy_per_exit"]
    emit(
        summary,
        args.json,
        lambda s: f"saved {s['output']} ({s['train_seconds']} s); dev accuracy per exit: {kept}",
    )
