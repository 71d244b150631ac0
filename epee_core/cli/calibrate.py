"""`epee calibrate`: choose a policy's thresholds for an accuracy budget and write the model YAML."""

from __future__ import annotations

from .common import add_skip_invalid, emit, format_table

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
        "a target speed-up). The choice is made on a calibration slice and checked on a held-back slice.",
    )
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument(
        "--data",
        required=True,
        help="labelled dev data: JSONL; images: MedMNIST .npz (test_* if present, else val_*) or image folder",
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
    parser.add_argument("--max-batch-delay", type=int, default=50, help="YAML maxBatchDelay in ms")
    parser.add_argument("--max-samples", type=int, help="use only the first N examples")
    parser.add_argument("--held-back-fraction", type=float, default=0.3, help="share of dev rows held back")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration / held-back split")
    add_skip_invalid(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_calibrate)


def render_calibration(report: dict) -> str:
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
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    written = [report["output"], report["report"]] + ([report["plot"]] if report["plot"] else [])
    return "\n".join(lines + ["", "wrote " + ", ".join(written)])


def run_calibrate(args) -> None:
    from ..calibration import CalibrationJob, CalibrationOptions, ServingOptions, run_calibration

    job = CalibrationJob(
        model_dir=args.model,
        data_path=args.data,
        output=args.output,
        plot=args.plot,
        cache_path=args.cache,
        report_path=args.report,
        max_samples=args.max_samples,
        skip_invalid=args.skip_invalid,
        serving=ServingOptions(batch_size=args.batch_size, max_batch_delay=args.max_batch_delay),
        options=CalibrationOptions(
            metric=args.metric,
            max_accuracy_drop=args.max_accuracy_drop,
            target_speedup=args.target_speedup,
            held_back_fraction=args.held_back_fraction,
            seed=args.seed,
        ),
    )
    report = run_calibration(job)
    emit(report, args.json, render_calibration)
