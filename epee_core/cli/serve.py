"""`epee package`, `epee deploy` and `epee demo`: build an archive, run it on TorchServe."""

from __future__ import annotations

import argparse

from .common import CommandError, emit, format_table


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
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        help="set the archived YAML's 'quantize' (int8: workers quantize at load; default: as the YAML says)",
    )
    parser.add_argument(
        "--scheduler",
        choices=("batch", "continuous"),
        help="continuous: layer-level scheduling on TorchServe's continuous batching (requests join at the next "
        "layer and leave at their exit); batch: TorchServe's dynamic batching (default: as the YAML says)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_package)


def run_package(args) -> None:
    from ..ops.packaging import PackageError, package_model

    try:
        summary = package_model(
            args.model, args.config, args.name, args.version, args.export_path, args.quantize, args.scheduler
        )
    except PackageError as error:
        raise CommandError(str(error)) from None
    emit(
        summary,
        args.json,
        lambda s: f"wrote {s['archive']} ({s['size_mb']} MB, {s['task']}, policy {s['policy']})",
    )


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
    register.add_argument("--mar", required=True, help="archive name in the model store (NAME.mar)")
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
    rollout.add_argument(
        "--mar", required=True, help="the new version's archive in the model store (NAME.mar)"
    )
    rollout.add_argument("--name", required=True, help="the model name requests use (/predictions/NAME)")
    rollout.add_argument("--workers", type=int, default=1, help="workers of the new version (default 1)")
    rollout.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for an old version's queue to empty",
    )


def run_deploy(args) -> None:
    from ..ops.management import ManagementClient, ServerError, management_token

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
    from ..ops.demo import render_demo
    from ..ops.demo import run_demo as demo
    from ..ops.management import ServerError
    from ..ops.packaging import PackageError

    try:
        result = demo(".", keep_running=args.keep_running, retrain=args.retrain)
    except (ServerError, PackageError) as error:
        raise CommandError(str(error)) from None
    emit(result, args.json, render_demo)
