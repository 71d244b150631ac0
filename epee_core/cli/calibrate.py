"""`epee calibrate`: choose a policy's thresholds for an accuracy budget and write the model YAML."""

from __future__ import annotations

from ..engine.spec import RUNTIMES
from .common import add_model_data_arguments, add_skip_invalid, emit, format_table, warn

CALIBRATE_COLUMNS = [
    ("setting", "setting"),
    ("metric", "calibration"),
    ("held_back", "held back"),
    ("avg_exit_layer", "avg_exit"),
    ("layer_speedup", "layer_x"),
    ("est_speedup", "est_x"),
]


def add_calibrate(commands) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="choose the early-exit policy and its parameters on dev data; write the model YAML",
        description="Cache every exit's logits on the dev data once, replay hundreds of policy settings, and "
        "write the model YAML of the fastest setting within the accuracy budget (or the most accurate one at "
        "a target speed-up). By default the budget is certified: with probability at least 1 - RISK over the "
        "draw of the dev rows, the chosen setting's accuracy drop vs full depth on new data from the same "
        "distribution is at most the budget (candidates are ordered on a calibration slice and tested on a "
        "held-back slice; if none passes, full depth is served). See docs/calibration.md.",
    )
    add_model_data_arguments(
        parser,
        "labelled dev data: JSONL; images: MedMNIST .npz (test_* if present, else val_*) or image folder; "
        "with --guarantee consistency a JSONL without labels is accepted",
    )
    parser.add_argument("--output", required=True, help="model YAML to write (for `epee package --config`)")
    constraint = parser.add_mutually_exclusive_group()
    constraint.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.01,
        help="largest allowed absolute drop of the metric below full depth (default 0.01)",
    )
    constraint.add_argument(
        "--target-speedup",
        type=float,
        help="instead: the most accurate setting with at least X× fewer layers",
    )
    parser.add_argument(
        "--metric", default="accuracy", help="accuracy (default), macro_f1, micro_f1 or example_f1"
    )
    parser.add_argument("--plot", help="Pareto frontier PNG to write")
    parser.add_argument(
        "--cache", help="logit cache file: reused when it matches the model and data, else built"
    )
    parser.add_argument("--report", help="JSON report to write (default: OUTPUT with suffix .report.json)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="serving batch size (YAML batchSize, timed for the cost model)",
    )
    parser.add_argument(
        "--max-batch-delay",
        type=int,
        help="YAML maxBatchDelay in ms for the batch scheduler (default: the benchmark's best, docs/performance.md)",
    )
    parser.add_argument(
        "--scheduler",
        choices=("batch", "continuous"),
        help="how the YAML has TorchServe batch: continuous (the layer-level scheduler) or batch (dynamic "
        "batching); default: the benchmark's best (docs/performance.md)",
    )
    parser.add_argument("--max-samples", type=int, help="use only the first N examples")
    parser.add_argument(
        "--guarantee",
        default="accuracy",
        help="accuracy (default): certify the accuracy drop vs full depth; consistency: certify the "
        "disagreement with full depth (needs no labels); none: choose on the calibration slice only",
    )
    parser.add_argument(
        "--risk",
        type=float,
        default=0.1,
        help="probability that the certified budget does not hold (default 0.1)",
    )
    parser.add_argument(
        "--held-back-fraction",
        type=float,
        help="share of dev rows held back (default 0.6 when certifying, where they test; else 0.3)",
    )
    parser.add_argument(
        "--policies",
        help="policy families to search, comma-separated (default when certifying: max_prob, entropy, patience, "
        "epee; with --guarantee none: also static and fpabee)",
    )
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="calibrate the int8 model against float32 full depth and write 'quantize: int8' into the YAML",
    )
    parser.add_argument(
        "--runtime",
        choices=(*RUNTIMES, "auto"),
        default="auto",
        help="where the layers run while calibrating and serving, written into the YAML: torch, or onnxruntime "
        "(float32, CPU; 1.3-2.4x faster layers); auto (default): onnxruntime when installed and not int8",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration / held-back split")
    add_skip_invalid(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_calibrate)


def render_calibration(report: dict) -> str:
    from ..calibration.sweep import describe_guarantee

    metric = report["metric"]

    def row(entry: dict, name: str | None = None) -> dict:
        held = entry.get("held_back") or {}
        return {
            "setting": name or entry["setting"],
            **entry["calibration"],
            "held_back": held.get("metric", ""),
        }

    split = report["split"]
    chosen = report["chosen"]
    lines = [
        f"{report['num_settings']} settings replayed in {report['search_seconds']} s on {report['num_samples']} "
        f"samples ({split['calibration_samples']} calibration, {split['held_back_samples']} held back); "
        f"cache {report['cache']['status']}",
        "",
        f"{metric} on each slice:",
        format_table(
            [row(report["full"], "full"), row(report["oracle"], "oracle"), row(chosen, "chosen")],
            CALIBRATE_COLUMNS,
        ),
        "",
        f"chosen: {chosen['setting']} — {report['reason']}",
        f"all dev rows: {metric} {chosen['dev']['metric']:.4f} vs full {report['full']['dev']['metric']:.4f}, "
        f"{chosen['dev']['layer_speedup']:.2f}x fewer layers",
        "",
        "Pareto frontier (calibration slice):",
        format_table([row(entry) for entry in report["frontier"]], CALIBRATE_COLUMNS),
    ]
    if report["labels"] != "gold":
        lines.append(f"data without labels: {metric} is agreement with full depth")
    if report.get("guarantee") is not None:
        certified = report["certificate"]["certified"]
        lines.append(f"guarantee: {describe_guarantee(report['guarantee'], certified)}")
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    written = [report["output"], report["report"]] + ([report["plot"]] if report["plot"] else [])
    return "\n".join(lines + ["", "wrote " + ", ".join(written)])


def held_back_fraction(args) -> float:
    """--held-back-fraction, else 0.6 when certifying (the held-back rows are the test: more rows, a tighter
    bound) and 0.3 otherwise."""
    if args.held_back_fraction is not None:
        return args.held_back_fraction
    return 0.3 if args.guarantee == "none" else 0.6


def calibration_job(args):
    """The CalibrationJob an `epee calibrate` command line asks for."""
    from ..calibration import CalibrationJob, CalibrationOptions, ServingOptions
    from ..engine.onnx_layers import resolve_runtime

    return CalibrationJob(
        model_dir=args.model,
        data_path=args.data,
        output=args.output,
        plot=args.plot,
        cache_path=args.cache,
        report_path=args.report,
        max_samples=args.max_samples,
        skip_invalid=args.skip_invalid,
        serving=ServingOptions(
            batch_size=args.batch_size,
            quantize=args.quantize,
            runtime=resolve_runtime(args.runtime, args.quantize),
            # flags left out keep the benchmark's defaults (ServingOptions)
            **{
                key: value
                for key, value in (("max_batch_delay", args.max_batch_delay), ("scheduler", args.scheduler))
                if value is not None
            },
        ),
        options=CalibrationOptions(
            metric=args.metric,
            max_accuracy_drop=args.max_accuracy_drop,
            target_speedup=args.target_speedup,
            held_back_fraction=held_back_fraction(args),
            seed=args.seed,
            guarantee=args.guarantee,
            risk=args.risk,
            policies=tuple(name.strip() for name in args.policies.split(",")) if args.policies else None,
        ),
    )


def few_rows_warning(args, calibration_rows: int) -> str | None:
    """With `--guarantee none` and an accuracy budget ε: a warning when the choice was made on fewer rows than
    a certificate at that budget and `--risk` would need as test rows (`certify.min_test_rows`: 230 for
    ε = 0.01, δ = 0.1). On fewer rows, one row moves the accuracy by 1/n, more than ε/2 below 200 rows for
    ε = 0.01, so the chosen setting's drop cannot be told apart from the budget."""
    from ..calibration.certify import min_test_rows

    epsilon = args.max_accuracy_drop
    if (
        args.guarantee != "none"
        or args.target_speedup is not None
        or not (0 < epsilon < 1 and 0 < args.risk < 1)
    ):
        return None
    needed = min_test_rows(epsilon, args.risk)
    if calibration_rows >= needed:
        return None
    return (
        f"--guarantee none chose on {calibration_rows} calibration rows, where one row moves the accuracy by "
        f"{1 / calibration_rows:.3f}: too few to tell a drop of {epsilon:g} apart (a certificate at this budget "
        f"and --risk needs at least {needed} test rows; docs/calibration.md); use more dev rows"
    )


def run_calibrate(args) -> None:
    from ..calibration import run_calibration

    report = run_calibration(calibration_job(args))
    emit(report, args.json, render_calibration)
    warning = few_rows_warning(args, report["split"]["calibration_samples"])
    if warning:
        warn(warning)
