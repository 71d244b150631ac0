"""`epee serve`: the model directory and model YAML of `epee package`, served by a KServe ModelServer (OIP v2 on
REST and gRPC) instead of TorchServe. The platform package (`kserve_server`) is imported only when the command
runs, so `epee --help` never imports KServe."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import CommandError


def add_serve(commands) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve a model directory on KServe's model server (Open Inference Protocol v2, REST + gRPC)",
    )
    parser.add_argument("--model", required=True, help="model directory (epee train output)")
    parser.add_argument(
        "--config", required=True, help="model YAML: its 'epee:' section (as for epee package)"
    )
    parser.add_argument("--name", help="model name: /v2/models/NAME (default: the model directory's name)")
    parser.add_argument("--version", help="model version reported in metadata and answers")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind REST and gRPC (default 0.0.0.0)")
    parser.add_argument("--http-port", type=int, default=8080, help="REST port (default 8080)")
    parser.add_argument("--grpc-port", type=int, default=8081, help="gRPC port (default 8081)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes; only 1: one process runs one layer-level scheduler, which batches across all "
        "requests (scale out with replicas)",
    )
    parser.set_defaults(run=run_serve)


def run_serve(args) -> None:
    model_dir, config = Path(args.model), Path(args.config)
    if not (model_dir / "config.json").is_file():
        raise CommandError(f"{model_dir}: not a model directory (no config.json; see epee train)")
    if not config.is_file():
        raise CommandError(f"{config}: no such model YAML")
    if args.workers != 1:
        raise CommandError(
            f"--workers {args.workers}: epee serve runs one process (one scheduler batches every request at "
            "layer granularity); scale out with replicas"
        )
    # The model YAML and the model are read in the background once the server listens (torch is not imported
    # before): liveness answers at once, readiness once loaded; a bad YAML or model ends the process (exit 2).
    # KServe parses sys.argv when it is imported (kserve.model_server): it must not see our flags.
    sys.argv = sys.argv[:1]
    from kserve_server.model import EarlyExitKServeModel
    from kserve_server.server import EarlyExitModelServer

    name = args.name or model_dir.resolve().name
    model = EarlyExitKServeModel(name, model_dir, config, version=args.version)
    EarlyExitModelServer(model, args.host, args.http_port, args.grpc_port).serve()
