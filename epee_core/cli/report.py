"""`epee report results` and `epee report performance`: the generators of docs/results.md and docs/performance.md
(`measure.results`, `measure.performance`)."""

from __future__ import annotations

import argparse
import json
import shlex
from functools import partial

from .common import add_skip_invalid

DEFAULT_DATA = "data"  # where `epee data convert` writes the public sets (docs/data.md)
DEFAULT_MODELS = "models/results"


def add_report(commands) -> None:
    parser = commands.add_parser(
        "report",
        help="regenerate the results report (docs/results.md) or the performance report (docs/performance.md)",
    )
    reports = parser.add_subparsers(dest="report", required=True, metavar="REPORT", help="which report")
    add_results_report(reports)
    add_performance_report(reports)


# Each report's one-line help and the description its own --help shows.
ABOUT = {
    "results": (
        "train every backbone × data set, certify a policy on half of the dev split, measure on the other",
        "Train every backbone × data set with its default recipe, certify a policy on half of the dev split and "
        "measure on the other half; write docs/results.md and a JSON next to it. Resumable.",
    ),
    "performance": (
        "time full depth, the calibrated EPEE policy and the oracle side by side per model",
        "Time full, calibrated EPEE and the oracle side by side per model of the results report; write "
        "docs/performance.md and a JSON next to it. Resumable.",
    ),
}


def add_report_parser(reports, name: str, only_help: str):
    """A report's parser with the flags both reports take: where the data sets, the models and the report are,
    which runs, torch threads and the unusable-rows rule."""
    help, description = ABOUT[name]
    parser = reports.add_parser(name, help=help, description=description)
    for flag, default, what in (
        ("--data", DEFAULT_DATA, "folder holding ade/, ddi/, git/, … (data/catalogue.py)"),
        ("--models", DEFAULT_MODELS, "the model directories, one per run (the results report trains them)"),
        ("--output", f"docs/{name}.md", "Markdown report; the JSON goes next to it"),
    ):
        parser.add_argument(flag, default=default, help=f"{what} (default {default})")
    parser.add_argument("--only", help=only_help)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_skip_invalid(parser)
    return parser


def add_results_report(reports) -> None:
    only = "comma-separated runs such as minilm/ade,vit-small/pneumoniamnist (default: all)"
    parser = add_report_parser(reports, "results", only)
    parser.add_argument("--batch-size", type=int, default=8, help="measurement batch size (default 8)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    for flag, what in (
        ("--remeasure", "certify and measure again even if report/measurement.json exists"),
        (
            "--update",
            "keep the other runs of the JSON next to --output and replace only the runs measured now (with --only)",
        ),
        (
            "--skip-untrained",
            "report only the runs whose model is trained (the others are listed as missing)",
        ),
        ("--commands", "print the epee train commands and stop"),
        ("--json", "print the report as one JSON object"),
    ):
        parser.add_argument(flag, action="store_true", help=what)
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
    only = (
        "comma-separated runs (model directories) such as ade-minilm,pneumoniamnist-vit-small (default: the "
        "MiniLM, ALBERT and GPT-2 runs on ADE, DDI and GIT, and ViT on PneumoniaMNIST)"
    )
    parser = add_report_parser(reports, "performance", only)
    parser.add_argument("--max-samples", type=int, default=400, help="timed dev rows per model (default 400)")
    parser.add_argument(
        "--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)"
    )
    parser.add_argument(
        "--recorded", metavar="JSON", help="an earlier performance.json whose figures go beside the new ones"
    )
    for flag, what in (
        ("--compile-check", "torch.compile'd layer blocks against eager on this (BERT-family) run"),
        ("--profile", "each part of the runner (layers, heads, policy, bookkeeping) on this run"),
    ):
        parser.add_argument(flag, metavar="RUN", help=f"also time {what}, e.g. ade-minilm")
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
