"""The `epee` command line (docs/design.md, "Commands"). Each sub-command parses its flags here and calls the engine.

Errors a user can cause (bad file, YAML, policy or value) print one line `epee: error: ...` and exit 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..engine.spec import RUNTIMES, ConfigError

if TYPE_CHECKING:
    from ..engine.policies import Policy
    from ..serving.config import ServeConfig

# Building the parser imports no torch (`epee --help` stays fast): modules that need it are imported where a
# command runs.


class CommandError(Exception):
    """A failure the user must act on (server down, unknown model...); printed as one line, exit 2."""


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions a user's input causes (bad file, YAML, policy or value): one line `epee: error: ...`.

    `PolicyError` and `InputError` live in modules that import torch; only code that imported them can raise
    them, so they count once loaded, and a failing `epee deploy` reports its error without loading torch."""
    errors: list[type[Exception]] = [ConfigError, CommandError]
    for module, name in (("engine.policies", "PolicyError"), ("engine.inputs", "InputError")):
        loaded = sys.modules.get(f"epee_core.{module}")
        if loaded is not None:
            errors.append(getattr(loaded, name))
    return tuple(errors)


def warn(message: str) -> None:
    """A warning for the user of a command: one line `epee: warning: ...` on stderr."""
    print(f"epee: warning: {message}", file=sys.stderr)


def parse_set_values(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` pairs as a dict of strings (types are checked by the policy)."""
    from ..engine.policies import PolicyError

    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PolicyError(f"--set expects KEY=VALUE, got {pair!r}")
        values[key.strip()] = value.strip()
    return values


def policies_from_args(names: str | None, set_pairs: list[str], config_path: str | None) -> list[Policy]:
    """Policies named by `--policy a,b`, starting from a model YAML's `epee:` section (`--config`) and `--set`."""
    from ..engine.policies import POLICY_NAMES, PolicyError, make_policy
    from ..serving.config import ServeConfig

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


def add_model_data_arguments(parser, data_help: str) -> None:
    """`--model` (the model directory) and `--data` (`data_help`), both required."""
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--data", required=True, help=data_help)


def add_skip_invalid(parser) -> None:
    """`--skip-invalid`, the same in every command that reads a data file."""
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave unusable rows (bad JSON, missing fields, unmarkable entities, labels the model does not "
        "know) out and count them, instead of stopping at the first",
    )


def read_model_data(args, model):
    """`--data` as the model's labelled examples (`--max-samples`, `--skip-invalid`): a `data.TaskData`."""
    from ..data.text import read_task_examples

    return read_task_examples(
        args.data,
        model.spec.task,
        "eval",
        args.max_samples,
        skip_invalid=args.skip_invalid,
        labels=model.spec.labels,
    )


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


def add_numerics_arguments(parser, what: str) -> None:
    """`--quantize none|int8` and `--runtime torch|onnxruntime` (default: the `--config` YAML's, else none and
    torch)."""
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        help=f"{what} (default: the --config YAML's 'quantize', else none); int8 runs on the CPU",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="where the float32 layers run: torch, or onnxruntime on the CPU (default: the --config YAML's "
        "'runtime', else torch)",
    )


def numerics_choice(args, serve: ServeConfig | None) -> dict[str, str]:
    """The `quantize` and `runtime` a command loads its model with: the flags, else the model YAML's, else none
    and torch (keyword arguments of `EarlyExitModel.from_pretrained`)."""
    return {
        "quantize": args.quantize or (serve.quantize if serve else "none"),
        "runtime": args.runtime or (serve.runtime if serve else "torch"),
    }
