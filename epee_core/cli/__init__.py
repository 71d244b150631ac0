"""The `epee` command line: one module per command group, each parsing its flags and calling the library.

Errors a user can cause (bad file, YAML, policy or value) print one line `epee: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .audit import add_audit
from .calibrate import add_calibrate
from .common import user_errors
from .data import add_data
from .evaluate import add_bench, add_evaluate
from .gate import add_train_gate
from .loadtest import add_loadtest
from .modelserver import add_serve
from .recertify import add_recertify
from .report import add_report
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
    add_serve,
    add_bench,
    add_loadtest,
    add_report,
    add_data,
    add_audit,
    add_recertify,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epee", description="Early-exit serving of biomedical transformers."
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="`epee COMMAND --help` shows its flags"
    )
    for add in COMMANDS:
        add(commands)
    return parser


def quiet_progress_bars() -> None:
    """No "Loading weights" bars on every model load: noise in a CLI. Transformers reads the setting when it is
    imported; a command that never loads a model never imports it."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_progress_bars()
    try:
        args.run(args)
    except user_errors() as error:  # evaluated only when something was raised: no torch import for --help
        print(f"epee: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
