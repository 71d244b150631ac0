"""`epee report results` and `epee report performance`: the generators of docs/results.md and docs/performance.md
(`measure.results`, `measure.performance`)."""

from __future__ import annotations

import argparse
import json
import shlex
from functools import partial

from .common import add_skip_invalid

DEFAULT_DATA = "../shared/data"
DEFAULT_MODELS = "models/results"


def add_report(commands) -> None:
    parser = commands.add_parser(
        "report",
        help="regenerate the results report (docs/results.md) or the performance report (docs/performance.md)",
    )
    reports = parser.add_subparsers(dest="report", required=True, metavar="REPORT")
    add_results_report(reports)
    add_performance_report(reports)


def add_report_arguments(parser, output: str, models_help: str) -> None:
    """The flags both reports take: where the data sets, the models and the report are, the runs, threads and the
    unusable-rows rule."""
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help="folder holding ade/, ddi/, git/, … (data/catalogue.py)"
    )
    parser.add_argument("--models", default=DEFAULT_MODELS, help=models_help)
    parser.add_argument("--output", default=output, help="Markdown report; the JSON goes next to it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_skip_invalid(parser)


def add_results_report(reports) -> None:
    parser = reports.add_parser(
        "results",
        help="train every backbone × data set, certify a policy on half of the dev split, measure on the other",
        description="Train every backbone × data set with its default recipe, certify a policy on half of the "
        "dev split and measure on the other half; write docs/results.md. Resumable.",
    )
    add_report_arguments(parser, "docs/results.md", "where trained models are kept (resumable)")
    parser.add_argument(
        "--only", help="comma-separated runs such as minilm/ade,vit-small/pneumoniamnist (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="measurement batch size (default 8)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="certify and measure again even if report/measurement.json exists",
    )
    parser.add_argument(
        "--skip-untrained",
        action="store_true",
        help="report only the runs whose model is trained (the others are listed as missing)",
    )
    parser.add_argument("--commands", action="store_true", help="print the epee train commands and stop")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(run=partial(run_results_report, parser))


def run_results_report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from ..measure import results

    if args.commands:
        print("\n".join(results.train_commands(args)))
        return
    report = results.write_report(args, command_line(parser, args))
    if args.json:
        print(json.dumps(report, indent=2))


def add_performance_report(reports) -> None:
    parser = reports.add_parser(
        "performance",
        help="time full depth, the calibrated EPEE policy and the oracle side by side per model",
        description="Time full, calibrated EPEE and the oracle side by side per model of the results report; "
        "write docs/performance.md and a JSON next to it. Resumable.",
    )
    add_report_arguments(parser, "docs/performance.md", "the results report's model directories")
    parser.add_argument(
        "--only",
        help="comma-separated runs (model directories) such as ade-minilm,pneumoniamnist-vit-small (default: the "
        "MiniLM, ALBERT and GPT-2 runs on ADE, DDI and GIT, and ViT on PneumoniaMNIST)",
    )
    parser.add_argument("--max-samples", type=int, default=400, help="timed dev rows per model (default 400)")
    parser.add_argument(
        "--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)"
    )
    parser.add_argument(
        "--recorded", metavar="JSON", help="an earlier performance.json whose figures go beside the new ones"
    )
    parser.add_argument(
        "--compile-check",
        metavar="RUN",
        help="also time torch.compile'd layer blocks against eager on this (BERT-family) run, e.g. ade-minilm",
    )
    parser.add_argument(
        "--profile",
        metavar="RUN",
        help="also time each part of the runner (layers, heads, policy, bookkeeping) on this run, e.g. ade-minilm",
    )
    parser.add_argument("--rerun", action="store_true", help="measure again even if performance.json matches")
    parser.set_defaults(run=partial(run_performance_report, parser))


def run_performance_report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from ..measure import performance

    command = command_line(parser, args)
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size.strip()]
    performance.write_report(args, command)


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces `args`: the report's command and every flag not at its default."""
    defaults = vars(parser.parse_args([]))
    words = parser.prog.split()
    for name, value in vars(args).items():
        if name not in defaults or value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)
