"""`epee package`, `epee deploy` and `epee demo`: build an archive, run it on TorchServe."""

from __future__ import annotations

import argparse
from pathlib import Path

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


# `epee deploy` actions, listed in `epee --help`.
DEPLOY_ACTIONS = ("register", "scale", "unregister", "list", "describe", "set-default", "rollout")
NAMED_MODEL_ACTIONS = ("scale", "describe", "unregister", "set-default")  # --name NAME, or NAME positionally


def add_deploy(commands) -> None:
    parser = commands.add_parser(
        "deploy", help=f"models on a running TorchServe: {', '.join(DEPLOY_ACTIONS)}"
    )
    actions = parser.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="`ACTION --help` shows its flags"
    )

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--management-url", help="management API (default $EPEE_MANAGEMENT_URL or http://127.0.0.1:8081)"
        )
        sub.add_argument("--token", help="management key (default $EPEE_MANAGEMENT_KEY, else --key-file)")
        sub.add_argument("--key-file", help="TorchServe's key_file.json (default ./key_file.json if present)")
        sub.add_argument("--json", action="store_true", help="print TorchServe's JSON answer")
        sub.set_defaults(run=run_deploy, action=name)
        return sub

    def model(sub: argparse.ArgumentParser, version_help: str) -> None:
        """`--name NAME` and `--version VERSION`, as every deploy action names a model; `NAME [VERSION]` as
        positionals still work (the older usage)."""
        sub.add_argument("--name", help="model name (/predictions/NAME)")
        sub.add_argument("--version", help=version_help)
        sub.add_argument("positional_name", nargs="?", metavar="NAME", help="the same as --name NAME")
        sub.add_argument("positional_version", nargs="?", metavar="VERSION", help="the same as --version")

    def archive(sub: argparse.ArgumentParser, what: str) -> None:
        sub.add_argument("--mar", required=True, help=f"{what} in the model store (NAME.mar)")
        sub.add_argument(
            "--model-store",
            help="where that archive is on this machine (default: ./config.properties' model_store, else "
            "model_store): its model YAML is checked before TorchServe is asked; an archive not found here is "
            "left to the worker's own check",
        )

    register = action("register", "register a .mar from the model store and start its workers")
    archive(register, "archive")
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
    model(scale, "the version to scale (default: the default version)")
    scale.add_argument("--min-workers", type=int, required=True, help="workers to keep running")
    scale.add_argument("--max-workers", type=int, help="most workers (default: --min-workers)")
    unregister = action("unregister", "unregister a model (or one version of it)")
    model(unregister, "the version to unregister (default: the default version)")
    action("list", "list the registered models")
    describe = action("describe", "workers, batch settings and status of a model")
    model(describe, "a version, or 'all' (default: the default version)")
    set_default = action("set-default", "make VERSION the version that serves /predictions/NAME")
    model(set_default, "the version to serve (required)")
    rollout = action(
        "rollout",
        "serve a new version with no request dropped: register it, make it the default, drain and "
        "unregister the old version(s)",
    )
    archive(rollout, "the new version's archive")
    rollout.add_argument("--name", required=True, help="the model name requests use (/predictions/NAME)")
    rollout.add_argument("--workers", type=int, default=1, help="workers of the new version (default 1)")
    rollout.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for an old version's queue to empty",
    )


def _one_of(flag: str, option: str | None, positional: str | None) -> str | None:
    """A value given as `flag` or as a positional; both at once must agree."""
    if option is not None and positional is not None and option != positional:
        raise CommandError(f"{flag} {option} and the positional {positional} disagree: give one of them")
    return option if option is not None else positional


def deploy_model(args) -> tuple[str, str | None]:
    """The model NAME (and VERSION) a deploy action names, as `--name`/`--version` or positionals."""
    name = _one_of("--name", args.name, args.positional_name)
    version = _one_of("--version", args.version, args.positional_version)
    if name is None:
        raise CommandError(f"deploy {args.action}: name the model with --name NAME")
    if version is None and args.action == "set-default":
        raise CommandError("deploy set-default: give the version to serve with --version VERSION")
    return name, version


def check_local_archive(args) -> None:
    """The archive's model YAML checked as a worker will check it, when the archive is in the model store."""
    from ..ops.packaging import check_archive
    from ..ops.torchserve import read_properties

    store = args.model_store
    if store is None:
        started_here = Path("config.properties")
        store = read_properties(started_here).get("model_store") if started_here.is_file() else None
    path = Path(store or "model_store") / args.mar
    if path.is_file():
        check_archive(path)


def run_deploy(args) -> None:
    from ..ops.management import ManagementClient, ServerError, management_token

    if args.action in ("register", "rollout"):
        check_local_archive(args)
    name, version = deploy_model(args) if args.action in NAMED_MODEL_ACTIONS else (None, None)
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
            result = client.scale(name, args.min_workers, args.max_workers, version)
        elif args.action == "unregister":
            result = client.unregister(name, version)
        elif args.action == "list":
            result = client.list_models()
        elif args.action == "describe":
            result = client.describe(name, version)
        elif args.action == "rollout":
            log = (lambda message: None) if args.json else print
            result = client.rollout(args.mar, args.name, args.workers, args.drain_timeout, log=log)
        else:
            result = client.set_default(name, version)
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
