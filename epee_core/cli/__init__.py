"""The `epee` command line: one module per command group, each parsing its flags and calling the library.

Errors a user can cause (bad file, YAML, policy or value) print one line `epee: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from .calibrate import add_calibrate
from .common import USER_ERRORS, CommandError
from .data import add_data
from .evaluate import add_bench, add_evaluate
from .gate import add_train_gate
from .loadtest import add_loadtest
from .serve import add_demo, add_deploy, add_package
from .train import add_train

COMMANDS = [
    add_train,
    add_train_gate,
    add_evaluate,
    add_calibrate,
    add_package,
    add_deploy,
    add_demo,
    add_bench,
    add_loadtest,
    add_data,
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
