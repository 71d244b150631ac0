"""`epee loadtest`: Locust runs, comparisons and soaks against a TorchServe (or, `run --platform kserve`, an
`epee serve`) on this machine."""

from __future__ import annotations

import argparse

from .common import CommandError, emit


def add_loadtest(commands) -> None:
    from ..measure.loadtest import DEFAULT_SLO, LOCUSTFILE

    parser = commands.add_parser(
        "loadtest",
        help="Locust load tests on a local TorchServe: run (clinical-day load), check (SLO check), compare (EPEE "
        "vs full), soak",
        description="Headless Locust runs of load_tests/locustfile.py with the clinical-day shape (morning "
        "ramp, clinic hours, ward-round burst, evening tail), bounded by --peak-users and --duration, against "
        "http://127.0.0.1 only. Payload weights and think time: EPEE_* variables (load_tests/README.md).",
    )
    actions = parser.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="`ACTION --help` shows its flags"
    )

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
            "--data-dir", help="folder of ade/, mtsamples/, ddi/, pneumoniamnist/ (default data)"
        )
        sub.add_argument("--output-dir", help="reports folder (default load_tests/reports/<date>)")
        sub.add_argument("--locustfile", default=str(LOCUSTFILE), help="default: the repository's")

    run = action(
        "run", "one headless run against a running TorchServe, then the SLO check (exit 2 if violated)"
    )
    run.add_argument("--host", default="http://127.0.0.1:8080", help="inference API (127.0.0.1 only)")
    run.add_argument(
        "--hosts",
        default="",
        metavar="URL,URL",
        help="spread the users over these replicas (each user keeps one; 127.0.0.1 only; replaces --host). "
        "Behind one address (a Kubernetes Service), give that address as --host instead",
    )
    run.add_argument(
        "--processes",
        type=int,
        default=0,
        help="Locust's --processes: a master and N worker processes in one command (default 0: one process)",
    )
    run.add_argument("--text-model", default="", help="model for the text users (ADE + MTSamples)")
    run.add_argument("--relation-model", default="", help="model for the relation users (DDI)")
    run.add_argument("--image-model", default="", help="model for the image users (PneumoniaMNIST PNG)")
    run.add_argument("--policy-override", default="", help="send X-EPEE-Policy: NAME with every request")
    run.add_argument("--key-file", default="key_file.json", help="TorchServe's key_file.json (inference key)")
    run.add_argument(
        "--platform",
        choices=("torchserve", "kserve"),
        default="torchserve",
        help="torchserve: POST /predictions/MODEL (default); kserve: Open Inference Protocol requests to "
        "/v2/models/MODEL/infer on `epee serve`",
    )
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
    compare.add_argument(
        "--schedulers",
        default="batch",
        help="comma-separated: batch (EPEE and full depth on TorchServe's dynamic batching) and/or continuous "
        "(adds EPEE on the layer-level scheduler); default batch",
    )
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
    from ..measure.loadtest import LoadTestError, render_slo_check, stats_result
    from ..ops.management import ServerError

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
    emit(result, args.json, render_compare if args.action == "compare" else render_slo_check)
    if not result["passed"]:
        raise CommandError("SLO violated: " + "; ".join(result["slo_violations"]))


def loadtest_run(args, slo: str | None) -> dict:
    from pathlib import Path

    from ..measure.loadtest import LoadRun, default_report_dir, run_slo_check
    from ..ops.management import read_key_file

    models = {
        "--text-model": args.text_model,
        "--relation-model": args.relation_model,
        "--image-model": args.image_model,
    }
    if not any(models.values()):
        raise CommandError("name a model: --text-model, --relation-model or --image-model")
    key_file = Path(args.key_file)
    hosts = [host.strip().rstrip("/") for host in args.hosts.split(",") if host.strip()]
    run = LoadRun(
        host=hosts[0] if hosts else args.host,
        hosts=hosts,
        processes=args.processes,
        models={option: name for option, name in models.items() if name},
        peak_users=args.peak_users,
        duration=args.duration,
        prefix=Path(args.output_dir or default_report_dir()) / args.name,
        policy_override=args.policy_override,
        inference_key=read_key_file(key_file).get("inference") if key_file.is_file() else None,
        data_dir=args.data_dir,
        locustfile=Path(args.locustfile),
        platform=args.platform,
    )
    return run_slo_check(run, slo)


def server_job_fields(args) -> dict:
    """The fields `compare` and `soak` share: the model to package (`--model`, `--config`), the server's
    `--ts-config`, the model `--name` and the reports' `--output-dir`."""
    from pathlib import Path

    return {
        "model_dir": Path(args.model),
        "config": Path(args.config),
        "ts_config": Path(args.ts_config),
        "name": args.name,
        "output_dir": Path(args.output_dir) if args.output_dir else None,
    }


def loadtest_compare(args, slo: str | None) -> dict:
    from pathlib import Path

    from ..measure.comparison import ComparisonJob, run_comparison
    from ..ops.packaging import PackageError

    job = ComparisonJob(
        **server_job_fields(args),
        peak_users=args.peak_users,
        duration=args.duration,
        warmup=args.warmup,
        cooldown=args.cooldown,
        slo=Path(slo) if slo else None,
        data_dir=args.data_dir,
        locustfile=Path(args.locustfile),
        schedulers=schedulers_from(args.schedulers),
    )
    try:
        return run_comparison(job)
    except PackageError as error:
        raise CommandError(str(error)) from None


def schedulers_from(text: str) -> tuple[str, ...]:
    """`--schedulers batch,continuous`: batch is always run (it is the reference)."""
    from ..measure.comparison import SCHEDULERS

    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in SCHEDULERS]
    if unknown or not names:
        raise CommandError(f"--schedulers takes {', '.join(SCHEDULERS)}, got {text!r}")
    return tuple(dict.fromkeys(("batch", *names)))


def run_soak_command(args) -> None:
    from pathlib import Path

    from ..measure.loadtest import LoadTestError
    from ..measure.soak import SoakJob, render_soak, run_soak
    from ..ops.management import ServerError
    from ..ops.packaging import PackageError

    job = SoakJob(
        **server_job_fields(args),
        duration=args.duration,
        rate=args.rate,
        warmup=args.warmup,
        bad_fraction=args.bad_fraction,
        max_rss_growth_mb=args.max_rss_growth_mb,
        data=Path(args.data) if args.data else None,
    )
    try:
        report = run_soak(job)
    except (ServerError, LoadTestError, PackageError) as error:
        raise CommandError(str(error)) from None
    emit(report, args.json, lambda r: render_soak(r) + "\nwrote " + ", ".join(r["files"].values()))
    if not report["passed"]:
        raise CommandError(
            "soak failed: " + "; ".join(check for check, ok in report["checks"].items() if not ok)
        )


def render_compare(report: dict) -> str:
    from ..measure.comparison import render_comparison

    return render_comparison(report) + "\nwrote " + ", ".join(report["files"].values())
