"""`epee recertify`: certify a setting again on a worker's audit records and write the model YAML to roll out."""

from __future__ import annotations

from .common import emit


def add_recertify(commands) -> None:
    parser = commands.add_parser(
        "recertify",
        help="re-run Learn-then-Test on a worker's audit records (after an alarm); write a new model YAML",
        description="Read the audit records a worker wrote (epee: audit_records; each audited row's logits at "
        "every exit, no text), certify a setting on them as `epee calibrate` does on dev data (consistency with "
        "full depth by default; accuracy with --labels) and write the --config YAML with the new policy and "
        "guarantee, ready for `epee package` and `epee deploy rollout`. See docs/monitoring.md.",
    )
    parser.add_argument("--model", required=True, help="model directory the worker served")
    parser.add_argument(
        "--config", required=True, help="the model YAML the worker served (kept but the policy)"
    )
    parser.add_argument("--audit", required=True, help="audit records (JSONL written by the worker)")
    parser.add_argument(
        "--labels", help="JSONL {'request_id', 'label'} for audited requests the site has labelled"
    )
    parser.add_argument("--output", required=True, help="new model YAML to write")
    parser.add_argument(
        "--guarantee",
        choices=("consistency", "accuracy"),
        default="consistency",
        help="consistency (default, no labels needed) or accuracy (needs --labels)",
    )
    parser.add_argument("--epsilon", type=float, help="budget (default: the old guarantee's epsilon)")
    parser.add_argument("--risk", type=float, help="delta (default: the old guarantee's delta)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ordering / test split (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_recertify)


def run_recertify(args) -> None:
    from ..calibration.recertify import recertify
    from ..calibration.sweep import CalibrationOptions, describe_guarantee
    from ..engine.spec import read_yaml
    from ..serving.config import ServeConfig

    previous = ServeConfig.from_model_yaml(read_yaml(args.config), args.config).guarantee or {}
    options = CalibrationOptions(
        max_accuracy_drop=args.epsilon if args.epsilon is not None else previous.get("epsilon", 0.01),
        risk=args.risk if args.risk is not None else previous.get("delta", 0.1),
        held_back_fraction=0.6,
        seed=args.seed,
        guarantee=args.guarantee,
    )
    result, config = recertify(args.model, args.config, args.audit, args.output, args.labels, options)
    certified = bool(result.certificate and result.certificate["certified"])
    summary = {
        "output": args.output,
        "rows": int(result.split.calibration.numel() + result.split.held_back.numel()),
        "certified": certified,
        "policy": result.chosen.policy.describe(),
        "guarantee": result.guarantee,
        "reason": result.choice.reason,
        "summary": describe_guarantee(result.guarantee, certified),
    }
    emit(summary, args.json, lambda s: f"{s['summary']}\nserve {s['policy']}\nwrote {s['output']}")
