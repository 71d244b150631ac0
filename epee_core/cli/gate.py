"""`epee train-gate`: fit the learned exit gate of a model directory on training data."""

from __future__ import annotations

from .common import emit


def add_train_gate(commands) -> None:
    parser = commands.add_parser(
        "train-gate",
        help="fit the learned exit gate (policy 'gate') on training data and write gate.safetensors",
    )
    parser.add_argument("--model", required=True, help="model directory (gate.safetensors is written there)")
    parser.add_argument("--data", required=True, help="training JSONL file (never the rows you calibrate on)")
    parser.add_argument("--max-samples", type=int, help="use only the first N examples")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="rows per engine call while caching exit logits (default 32)",
    )
    parser.add_argument(
        "--held-out-fraction",
        type=float,
        default=0.2,
        help="rows kept out of the fit to score the gate (default 0.2)",
    )
    parser.add_argument(
        "--class-weight",
        choices=["none", "balanced"],
        default="balanced",
        help="logistic regression class weights (default balanced: on ADE the same ranking (AUC) but thresholds "
        "spread over the grid, and a faster certified setting than unweighted)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the held-out split and the fit (default 0)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_train_gate)


def _render(record: dict) -> str:
    held = record.get("held_out") or {}
    return (
        f"wrote {record['gate_file']} (fitted on {record['fit_rows']} of {record['rows']} rows of "
        f"{record['data']}); held-out rows: AUC {held.get('auc', 'n/a')}, accuracy {held.get('accuracy', 'n/a')}, "
        f"exits agreeing with full depth {held.get('agree_rate', 'n/a')}"
    )


def run_train_gate(args) -> None:
    from ..training.gate import train_gate

    record = train_gate(
        args.model,
        args.data,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        held_out_fraction=args.held_out_fraction,
        class_weight=args.class_weight,
        seed=args.seed,
    )
    emit(record, args.json, _render)
