"""The `epee` command line (DESIGN §7). Each sub-command parses its flags here and calls the engine.

Errors a user can cause (bad file, YAML, policy or value) print one line `epee: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .config import TASKS, ConfigError, ServeConfig
from .data import InputError
from .policies import POLICY_NAMES, Policy, PolicyError, make_policy

USER_ERRORS = (ConfigError, PolicyError, InputError)


class CommandError(Exception):
    """A failure the user must act on (server down, unknown model...); printed as one line, exit 2."""


def parse_set_values(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` pairs as a dict of strings (types are checked by the policy)."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PolicyError(f"--set expects KEY=VALUE, got {pair!r}")
        values[key.strip()] = value.strip()
    return values


def policies_from_args(names: str | None, set_pairs: list[str], config_path: str | None) -> list[Policy]:
    """Policies named by `--policy a,b`, starting from a model YAML's `epee:` section (`--config`) and `--set`."""
    base_params: dict[str, Any] = {}
    default_name = "epee"
    if config_path:
        serve = ServeConfig.load(config_path)
        base_params, default_name = dict(serve.policy_params), serve.policy.name
    overrides = parse_set_values(set_pairs)
    chosen = [name.strip() for name in (names or default_name).split(",") if name.strip()]
    if not chosen:
        raise PolicyError(f"--policy is empty: expected one or more of {', '.join(POLICY_NAMES)}")
    policies = []
    for name in chosen:
        policies.append(make_policy(name, {**base_params, **overrides}, strict=False))
        if len(chosen) == 1:  # a single policy: every --set key must be one it uses
            make_policy(
                name, {**{k: v for k, v in base_params.items() if k in policies[0].params}, **overrides}
            )
    for key in overrides:
        if not any(key in policy.params for policy in policies):
            raise PolicyError(f"--set {key}: none of the policies {', '.join(chosen)} takes '{key}'")
    return policies


def emit(result: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    """Print one JSON object (`--json`) or the human-readable rendering."""
    print(json.dumps(result, indent=2, default=str) if as_json else render(result))


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain text table of `rows` with (key, header) columns; floats get 4 significant decimals."""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    body = [[cell(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(header), *(len(line[i]) for line in body)) for i, (_, header) in enumerate(columns)]
    lines = ["  ".join(header.ljust(width) for (_, header), width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(value.ljust(width) for value, width in zip(line, widths)) for line in body]
    return "\n".join(lines)


# --- train -----------------------------------------------------------------------------------------------------


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
    from .training import TrainConfig

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
    from .training import train

    summary = train(train_config_from_args(args))
    kept = summary["dev_accuracy_per_exit"]
    emit(
        summary,
        args.json,
        lambda s: f"saved {s['output']} ({s['train_seconds']} s); dev accuracy per exit: {kept}",
    )


# --- evaluate --------------------------------------------------------------------------------------------------

EVALUATE_COLUMNS = [
    ("policy", "policy"),
    ("accuracy", "accuracy"),
    ("macro_f1", "macro_f1"),
    ("avg_exit_layer", "avg_exit"),
    ("layer_speedup", "layer_x"),
    ("samples_per_second", "samples/s"),
    ("speedup_vs_full", "speed_x"),
]


def add_evaluate(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="accuracy, average exit layer and speed of policies on labelled data"
    )
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument(
        "--data",
        required=True,
        help="labelled JSONL file; images: MedMNIST .npz (test_* if present, else val_*) or image folder",
    )
    parser.add_argument(
        "--policy", help=f"one or more of {','.join(POLICY_NAMES)}, comma-separated (default: epee)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="policy parameter")
    parser.add_argument(
        "--config", help="model YAML whose 'epee:' section gives the policy and its parameters"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args) -> None:
    from .data import read_task_examples
    from .evaluation import evaluate_policies
    from .model import EarlyExitModel

    policies = policies_from_args(args.policy, args.set, args.config)
    model = EarlyExitModel.from_pretrained(args.model)
    examples = read_task_examples(args.data, model.spec.task, "eval", args.max_samples)
    results = evaluate_policies(model, examples, policies, args.batch_size)
    columns = list(EVALUATE_COLUMNS)
    extra = {"relation-extraction": ("micro_f1", "micro_f1"), "multi-label": ("example_f1", "example_f1")}
    if model.spec.task in extra:
        columns.insert(3, extra[model.spec.task])
    output = results[0] if len(results) == 1 else {"model": args.model, "data": args.data, "results": results}
    emit(output, args.json, lambda _: format_table(results, columns))


# --- calibrate -------------------------------------------------------------------------------------------------

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
    from .calibration import CalibrationJob, CalibrationOptions, ServingOptions, run_calibration

    job = CalibrationJob(
        model_dir=args.model,
        data_path=args.data,
        output=args.output,
        plot=args.plot,
        cache_path=args.cache,
        report_path=args.report,
        max_samples=args.max_samples,
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


# --- package ---------------------------------------------------------------------------------------------------


def add_package(commands) -> None:
    parser = commands.add_parser(
        "package", help="package a model directory and its model YAML as a TorchServe .mar"
    )
    parser.add_argument("--model", required=True, help="model directory (epee train output)")
    parser.add_argument("--config", required=True, help="model YAML: TorchServe keys and the 'epee:' section")
    parser.add_argument("--name", required=True, help="model name: the archive is EXPORT_PATH/NAME.mar")
    parser.add_argument("--version", default="1.0", help="model version (default 1.0)")
    parser.add_argument(
        "--export-path", default="model_store", help="where to write the .mar (default model_store)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_package)


def run_package(args) -> None:
    from .packaging import PackageError, package_model

    try:
        summary = package_model(args.model, args.config, args.name, args.version, args.export_path)
    except PackageError as error:
        raise CommandError(str(error)) from None
    emit(
        summary,
        args.json,
        lambda s: f"wrote {s['archive']} ({s['size_mb']} MB, {s['task']}, policy {s['policy']})",
    )


# --- deploy ----------------------------------------------------------------------------------------------------


def add_deploy(commands) -> None:
    parser = commands.add_parser(
        "deploy", help="register, scale, describe, list, unregister models on TorchServe"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument(
            "--management-url", help="management API (default $EPEE_MANAGEMENT_URL or http://127.0.0.1:8081)"
        )
        sub.add_argument("--token", help="management key (default $EPEE_MANAGEMENT_KEY, else --key-file)")
        sub.add_argument("--key-file", help="TorchServe's key_file.json (default ./key_file.json if present)")
        sub.add_argument("--json", action="store_true", help="print TorchServe's JSON answer")
        sub.set_defaults(run=run_deploy, action=name)
        return sub

    register = action("register", "register a .mar from the model store and start its workers")
    register.add_argument(
        "--mar", required=True, help="archive name in the model store (NAME.mar)"
    )
    register.add_argument("--name", help="model name (default: the archive's)")
    register.add_argument("--batch-size", type=int, help="TorchServe batch size (default: the model YAML's)")
    register.add_argument(
        "--max-batch-delay", type=int, help="ms to wait for a batch to fill (default: YAML's)"
    )
    register.add_argument(
        "--initial-workers",
        type=int,
        default=1,
        help="workers to start (TorchServe uses the model YAML's minWorkers/maxWorkers instead when set)",
    )
    register.add_argument("--response-timeout", type=int, help="seconds (default: the model YAML's)")
    scale = action("scale", "set the number of workers of a model")
    scale.add_argument("name")
    scale.add_argument("--min-workers", type=int, required=True)
    scale.add_argument("--max-workers", type=int, help="default: --min-workers")
    scale.add_argument("--version")
    unregister = action("unregister", "unregister a model (or one version of it)")
    unregister.add_argument("name")
    unregister.add_argument("--version")
    action("list", "list the registered models")
    describe = action("describe", "workers, batch settings and status of a model")
    describe.add_argument("name")
    describe.add_argument("--version", help="a version, or 'all'")
    set_default = action("set-default", "make VERSION the version that serves /predictions/NAME")
    set_default.add_argument("name")
    set_default.add_argument("version")
    rollout = action(
        "rollout",
        "serve a new version with no request dropped: register it, make it the default, drain and "
        "unregister the old version(s)",
    )
    rollout.add_argument("--mar", required=True, help="the new version's archive in the model store (NAME.mar)")
    rollout.add_argument("--name", required=True, help="the model name requests use (/predictions/NAME)")
    rollout.add_argument("--workers", type=int, default=1, help="workers of the new version (default 1)")
    rollout.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds to wait for an old version's queue to empty"
    )


def run_deploy(args) -> None:
    from .deploy import ManagementClient, ServerError, management_token

    try:
        client = ManagementClient(args.management_url, management_token(args.token, args.key_file))
        if args.action == "register":
            result = client.register(
                args.mar,
                args.name,
                args.batch_size,
                args.max_batch_delay,
                args.initial_workers,
                args.response_timeout,
            )
        elif args.action == "scale":
            result = client.scale(args.name, args.min_workers, args.max_workers, args.version)
        elif args.action == "unregister":
            result = client.unregister(args.name, args.version)
        elif args.action == "list":
            result = client.list_models()
        elif args.action == "describe":
            result = client.describe(args.name, args.version)
        elif args.action == "rollout":
            log = (lambda message: None) if args.json else print
            result = client.rollout(args.mar, args.name, args.workers, args.drain_timeout, log=log)
        else:
            result = client.set_default(args.name, args.version)
    except ServerError as error:
        raise CommandError(str(error)) from None
    emit(result, args.json, render_deploy)


def render_deploy(result) -> str:
    if isinstance(result, dict) and "replaced" in result:  # rollout
        return f"{result['model']} now serves version {result['version']}"
    if isinstance(result, dict) and "models" in result:
        models = result["models"]
        return (
            format_table(models, [("modelName", "model"), ("modelUrl", "archive")]) if models else "no models"
        )
    if isinstance(result, list):  # describe
        rows = [
            {
                "model": entry.get("modelName"),
                "version": entry.get("modelVersion"),
                "workers": f"{sum(w.get('status') == 'READY' for w in entry.get('workers', []))} ready "
                f"of {entry.get('minWorkers')}-{entry.get('maxWorkers')}",
                "batch": f"{entry.get('batchSize')} / {entry.get('maxBatchDelay')} ms",
                "queue": entry.get("jobQueueStatus", {}).get("pendingRequests", ""),
            }
            for entry in result
        ]
        columns = [
            ("model", "model"),
            ("version", "version"),
            ("workers", "workers"),
            ("batch", "batch / delay"),
        ]
        return format_table(rows, columns + [("queue", "pending")])
    return str(result.get("status", result)) if isinstance(result, dict) else str(result)


# --- demo ------------------------------------------------------------------------------------------------------


def add_demo(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="build the default ADE model, package it, serve it with TorchServe, query it, show results",
    )
    parser.add_argument("--keep-running", action="store_true", help="leave TorchServe running afterwards")
    parser.add_argument("--retrain", action="store_true", help="rebuild models/ade-minilm even if it exists")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_demo)


def run_demo(args) -> None:
    from .demo import render_demo
    from .demo import run_demo as demo
    from .deploy import ServerError
    from .packaging import PackageError

    try:
        result = demo(".", keep_running=args.keep_running, retrain=args.retrain)
    except (ServerError, PackageError) as error:
        raise CommandError(str(error)) from None
    emit(result, args.json, render_demo)


# --- bench -----------------------------------------------------------------------------------------------------


def add_bench(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="in-process side-by-side benchmark: full, the YAML's policy, PABEE, entropy, oracle at several "
        "batch sizes",
        description="Run every policy on the same inputs at each batch size (policies take turns batch by "
        "batch after warm-up, torch threads pinned the same for all) and report samples/s, p50/p95 per-batch "
        "latency, accuracy, average exit layer, and throughput relative to full and to the oracle. Writes "
        "JSON + markdown.",
    )
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument(
        "--data",
        required=True,
        help="labelled data: JSONL; images: MedMNIST .npz (test_* if present, else val_*) or image folder",
    )
    parser.add_argument(
        "--config", help="model YAML whose 'epee:' section gives the policy, its parameters and num_threads"
    )
    parser.add_argument(
        "--policies",
        help="comma-separated policies (default: full, the YAML's policy or epee, patience, entropy, oracle)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="policy parameter")
    parser.add_argument(
        "--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)"
    )
    parser.add_argument("--max-samples", type=int, help="use only the first N examples")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for every policy (default: the YAML's num_threads, else torch's)",
    )
    parser.add_argument(
        "--output-dir", help="where bench-MODEL-DATA.json/.md go (default load_tests/reports/<date>)"
    )
    parser.add_argument(
        "--runners",
        default="current",
        help="comma-separated runners timed side by side: current (what serving runs: lean loop + length "
        "bucketing), unbucketed, before (the runner before issue 9); default current",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_bench)


def parse_batch_sizes(text: str) -> list[int]:
    """`--batch-sizes 1,8,32` as a list of positive integers."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"--batch-sizes expects comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise CommandError(f"--batch-sizes expects positive integers, got {text!r}")
    return sizes


def run_bench(args) -> None:
    from pathlib import Path

    from . import bench
    from .data import read_task_examples
    from .evaluation import check_runners
    from .loadtest import default_report_dir
    from .model import EarlyExitModel

    batch_sizes = parse_batch_sizes(args.batch_sizes)
    serve = ServeConfig.load(args.config) if args.config else None
    names = args.policies or ",".join(bench.default_policy_names(serve.policy.name if serve else "epee"))
    policies = policies_from_args(names, args.set, args.config)
    if len({policy.name for policy in policies}) != len(policies):
        raise PolicyError(f"--policies names a policy twice: {names}")
    model = EarlyExitModel.from_pretrained(args.model)
    examples = read_task_examples(args.data, model.spec.task, "eval", args.max_samples)
    threads = args.threads or (serve.num_threads if serve else None)
    runners = [name.strip() for name in args.runners.split(",") if name.strip()]
    try:
        check_runners(runners)
    except ValueError as error:
        raise CommandError(f"--runners: {error}") from None
    report = bench.run_bench(model, examples, policies, batch_sizes, threads, runners)
    report = {"model": args.model, "data": args.data, "config": args.config, **report}
    stem = f"bench-{Path(args.model).name}-{Path(args.data).stem}"
    json_path, markdown_path = bench.write_report(report, args.output_dir or default_report_dir(), stem)
    report["written"] = [str(json_path), str(markdown_path)]
    emit(report, args.json, lambda r: bench.render_markdown(r) + "\nwrote " + ", ".join(r["written"]))


# --- loadtest --------------------------------------------------------------------------------------------------


def add_loadtest(commands) -> None:
    from .loadtest import DEFAULT_SLO, LOCUSTFILE

    parser = commands.add_parser(
        "loadtest",
        help="Locust load tests on a local TorchServe: clinical-day load, SLO gate, EPEE vs full comparison",
        description="Headless Locust runs of load_tests/locustfile.py with the clinical-day shape (morning "
        "ramp, clinic hours, ward-round burst, evening tail), bounded by --peak-users and --duration, against "
        "http://127.0.0.1 only. Payload weights and think time: EPEE_* variables (load_tests/README.md).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--slo", default=str(DEFAULT_SLO), help="SLO YAML (default load_tests/slo.yaml; '' = none)"
        )
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        sub.set_defaults(run=run_loadtest, action=name)
        return sub

    def load_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--peak-users", type=int, default=4, help="users at the ward-round peak (default 4)")
        sub.add_argument("--duration", type=int, default=120, help="seconds per run (default 120)")
        sub.add_argument(
            "--data-dir", help="folder of ade/, mtsamples/, ddi/, pneumoniamnist/ (../shared/data)"
        )
        sub.add_argument("--output-dir", help="reports folder (default load_tests/reports/<date>)")
        sub.add_argument("--locustfile", default=str(LOCUSTFILE), help="default: the repository's")

    run = action(
        "run", "one headless run against a running TorchServe, then the SLO gate (exit 2 if violated)"
    )
    run.add_argument("--host", default="http://127.0.0.1:8080", help="inference API (127.0.0.1 only)")
    run.add_argument("--text-model", default="", help="model for the text users (ADE + MTSamples)")
    run.add_argument("--relation-model", default="", help="model for the relation users (DDI)")
    run.add_argument("--image-model", default="", help="model for the image users (PneumoniaMNIST PNG)")
    run.add_argument("--policy-override", default="", help="send X-EPEE-Policy: NAME with every request")
    run.add_argument("--key-file", default="key_file.json", help="TorchServe's key_file.json (inference key)")
    run.add_argument("--name", default="run", help="file prefix of the Locust CSV/HTML (default run)")
    load_options(run)
    compare = action(
        "compare",
        "one command: package MODEL with CONFIG, start TorchServe, register the archive twice (EPEE and full "
        "depth), run the identical load against each, write comparison.md + latency.png, stop the server "
        "(exit 2 if the EPEE run violates the SLO)",
    )
    compare.add_argument("--model", required=True, help="model directory")
    compare.add_argument("--config", required=True, help="model YAML (allow_request_override must be true)")
    compare.add_argument("--ts-config", default="config.properties", help="default ./config.properties")
    compare.add_argument(
        "--name", help="archive name (default MODEL-loadtest; registered as NAME-epee, NAME-full)"
    )
    compare.add_argument(
        "--warmup", type=int, default=15, help="seconds of light load per model (default 15)"
    )
    compare.add_argument("--cooldown", type=float, default=5.0, help="seconds after each run (default 5)")
    load_options(compare)
    check = action("check", "check a finished Locust run (--csv PREFIX) against the SLO (exit 2 if violated)")
    check.add_argument("--csv", required=True, help="the PREFIX Locust was given with --csv")
    soak_help = (
        "package MODEL, start TorchServe, send a steady rate of real (and some bad) requests for --duration "
        "seconds, count sent/answered/lost and worker RSS, stop the server; write soak.md/.json (exit 2 if a "
        "request was lost, a good one not answered 200, a bad one not 4xx, or RSS grew past the bound)"
    )
    soak = actions.add_parser("soak", help=soak_help, description=soak_help)
    soak.add_argument("--model", required=True, help="model directory (a text task)")
    soak.add_argument("--config", required=True, help="model YAML")
    soak.add_argument("--ts-config", default="config.properties", help="default ./config.properties")
    soak.add_argument("--name", help="model name (default MODEL-soak)")
    soak.add_argument("--duration", type=float, default=600, help="seconds of steady load (default 600)")
    soak.add_argument("--rate", type=float, default=4.0, help="requests per second (default 4)")
    soak.add_argument("--warmup", type=float, default=10, help="seconds before counting (default 10)")
    soak.add_argument("--bad-fraction", type=float, default=0.1, help="share of bad requests (default 0.1)")
    soak.add_argument("--max-rss-growth-mb", type=float, default=64, help="worker RSS bound (default 64 MB)")
    soak.add_argument("--data", help="JSONL of the model's task (default: the embedded ADE dev sentences)")
    soak.add_argument("--output-dir", help="reports folder (default load_tests/reports/<date>)")
    soak.add_argument("--json", action="store_true", help="print one JSON object")
    soak.set_defaults(run=run_soak_command, action="soak")


def run_loadtest(args) -> None:
    from .deploy import ServerError
    from .loadtest import LoadTestError, render_gate, stats_result

    slo = args.slo or None
    try:
        if args.action == "check":
            result = stats_result(args.csv, slo)
        elif args.action == "run":
            result = loadtest_run(args, slo)
        else:
            result = loadtest_compare(args, slo)
    except (ServerError, LoadTestError) as error:
        raise CommandError(str(error)) from None
    emit(result, args.json, render_compare if args.action == "compare" else render_gate)
    if not result["passed"]:
        raise CommandError("SLO violated: " + "; ".join(result["slo_violations"]))


def loadtest_run(args, slo: str | None) -> dict:
    from pathlib import Path

    from .deploy import read_key_file
    from .loadtest import LoadRun, default_report_dir, gate

    models = {
        "--text-model": args.text_model,
        "--relation-model": args.relation_model,
        "--image-model": args.image_model,
    }
    if not any(models.values()):
        raise CommandError("name a model: --text-model, --relation-model or --image-model")
    key_file = Path(args.key_file)
    run = LoadRun(
        host=args.host,
        models={option: name for option, name in models.items() if name},
        peak_users=args.peak_users,
        duration=args.duration,
        prefix=Path(args.output_dir or default_report_dir()) / args.name,
        policy_override=args.policy_override,
        inference_key=read_key_file(key_file).get("inference") if key_file.is_file() else None,
        data_dir=args.data_dir,
        locustfile=Path(args.locustfile),
    )
    return gate(run, slo)


def loadtest_compare(args, slo: str | None) -> dict:
    from pathlib import Path

    from .comparison import ComparisonJob, run_comparison
    from .packaging import PackageError

    job = ComparisonJob(
        model_dir=Path(args.model),
        config=Path(args.config),
        ts_config=Path(args.ts_config),
        name=args.name,
        peak_users=args.peak_users,
        duration=args.duration,
        warmup=args.warmup,
        cooldown=args.cooldown,
        output_dir=Path(args.output_dir) if args.output_dir else None,
        slo=Path(slo) if slo else None,
        data_dir=args.data_dir,
        locustfile=Path(args.locustfile),
    )
    try:
        return run_comparison(job)
    except PackageError as error:
        raise CommandError(str(error)) from None


def run_soak_command(args) -> None:
    from pathlib import Path

    from .deploy import ServerError
    from .loadtest import LoadTestError
    from .packaging import PackageError
    from .soak import SoakJob, render_soak, run_soak

    job = SoakJob(
        model_dir=Path(args.model),
        config=Path(args.config),
        ts_config=Path(args.ts_config),
        name=args.name,
        duration=args.duration,
        rate=args.rate,
        warmup=args.warmup,
        bad_fraction=args.bad_fraction,
        max_rss_growth_mb=args.max_rss_growth_mb,
        data=Path(args.data) if args.data else None,
        output_dir=Path(args.output_dir) if args.output_dir else None,
    )
    try:
        report = run_soak(job)
    except (ServerError, LoadTestError, PackageError) as error:
        raise CommandError(str(error)) from None
    emit(report, args.json, lambda r: render_soak(r) + "\nwrote " + ", ".join(r["files"].values()))
    if not report["passed"]:
        raise CommandError("soak failed: " + "; ".join(check for check, ok in report["checks"].items() if not ok))


def render_compare(report: dict) -> str:
    from .comparison import render_comparison

    return render_comparison(report) + "\nwrote " + ", ".join(report["files"].values())


# --- entry point -----------------------------------------------------------------------------------------------

COMMANDS = [
    add_train,
    add_evaluate,
    add_calibrate,
    add_package,
    add_deploy,
    add_demo,
    add_bench,
    add_loadtest,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epee", description="Early-exit serving of biomedical transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load are noise in a CLI
    try:
        args.run(args)
    except (*USER_ERRORS, CommandError) as error:
        print(f"epee: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
