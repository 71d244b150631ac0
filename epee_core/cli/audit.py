"""`epee audit`: replay a stream of requests through a model YAML's policy with a shadow audit and the
disagreement monitor (docs/monitoring.md), in one process; after an alarm, rows are served at full depth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import CommandError, emit

# flag, type, default, help
AUDIT_OPTIONS = (
    ("--audit-fraction", float, 0.02, "share of rows also run to full depth (default 0.02)"),
    ("--alpha", float, 0.05, "false-alarm level (default 0.05)"),
    ("--epsilon", float, None, "certified disagreement rate (default: from the guarantee)"),
    ("--seed", int, 0, "seed of the audit sampling (default 0)"),
    ("--batch-size", int, 8, "rows per engine call (default 8)"),
)


def add_audit(commands) -> None:
    parser = commands.add_parser(
        "audit",
        help="replay a JSONL request stream with a shadow audit and the anytime-valid disagreement alarm",
        description="Serve each row with the --config YAML's policy; a seeded fraction of rows also runs to full "
        "depth and feeds the monitor (H0: disagreement with full depth <= the certified rate). After the alarm "
        "every row is served at full depth. The rate is the YAML's guarantee: its epsilon for a consistency "
        "certificate, its consistency_bound (else its epsilon) for an accuracy certificate.",
    )
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--config", required=True, help="model YAML: its policy and its 'guarantee'")
    parser.add_argument(
        "--stream", required=True, help="JSONL requests, one per line: {'text'} or {'text', 'head', 'tail'}"
    )
    for flag, kind, default, text in AUDIT_OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument(
        "--rows-out", help="write one JSON line per row: exit layer, policy, audit, disagreement"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_audit)


def certified_rate(guarantee: dict[str, Any] | None, config_path: str) -> tuple[float, str]:
    """The disagreement rate H0 allows and where it comes from (see the command's description)."""
    from ..serving.config import monitored_rate

    if guarantee is None:
        raise CommandError(f"{config_path}: no 'guarantee' in the 'epee:' section; pass --epsilon")
    return monitored_rate(guarantee)


def read_stream(path: str, service) -> list[str]:
    """The model inputs of the stream's rows, checked as the server checks a request body."""
    from ..serving.service import RequestError

    inputs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise CommandError(f"{path}: {error.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            if not isinstance(fields, dict):
                raise CommandError(f"{path}: line {number}: expected a JSON object")
            inputs.append(service.decode_row(fields))
        except (json.JSONDecodeError, RequestError) as error:
            raise CommandError(f"{path}: line {number}: {error}") from None
    if not inputs:
        raise CommandError(f"{path}: no rows")
    return inputs


def check_fractions(args) -> None:
    if not 0.0 < args.audit_fraction <= 1.0:
        raise CommandError(f"--audit-fraction must be in (0, 1], got {args.audit_fraction}")
    if not 0.0 < args.alpha < 1.0:
        raise CommandError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.epsilon is not None and not 0.0 < args.epsilon < 1.0:
        raise CommandError(f"--epsilon must be in (0, 1), got {args.epsilon}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")


def run_audit(args) -> None:
    import numpy as np
    import torch

    from ..engine.model import EarlyExitModel
    from ..engine.policies import make_policy
    from ..engine.runner import run_bucketed
    from ..serving.config import ServeConfig
    from ..serving.monitor import DisagreementMonitor
    from ..serving.service import TextService

    check_fractions(args)
    serve = ServeConfig.load(args.config)
    if args.epsilon is not None:
        epsilon, source = args.epsilon, "--epsilon"
    else:
        epsilon, source = certified_rate(serve.guarantee, args.config)
    if not 0.0 < epsilon < 1.0:
        raise CommandError(f"{args.config}: {source} must be in (0, 1) to be monitored, got {epsilon}")
    model = EarlyExitModel.from_pretrained(args.model, quantize=serve.quantize, runtime=serve.runtime)
    if model.spec.task == "image-classification":
        raise CommandError("epee audit replays text requests; image models are not supported yet")
    service = TextService(model, serve)
    inputs = read_stream(args.stream, service)
    audited_rows = np.random.default_rng(args.seed).random(len(inputs)) < args.audit_fraction
    monitor = DisagreementMonitor(epsilon, args.alpha)
    full = make_policy("full")
    multi_label = model.spec.multi_label
    rows, alarm_at_row = [], None

    def run(policy, batch: list[str]):
        with torch.inference_mode():
            result = run_bucketed(model, service.encode_inputs(batch), policy)
        return result.predictions(multi_label), result.exit_layer.tolist()

    for start in range(0, len(inputs), args.batch_size):
        batch = inputs[start : start + args.batch_size]
        served = None if monitor.alarmed else run(serve.policy, batch)
        needs_full = monitor.alarmed or bool(audited_rows[start : start + len(batch)].any())
        reference = run(full, batch) if needs_full else None
        for offset in range(len(batch)):
            row = start + offset
            if monitor.alarmed:  # the fallback: full depth from the row after the alarm on
                rows.append({"row": row + 1, "exit_layer": reference[1][offset], "policy": full.name,
                             "audited": False, "disagree": None})  # fmt: skip
                continue
            record = {"row": row + 1, "exit_layer": served[1][offset], "policy": serve.policy.name,
                      "audited": bool(audited_rows[row]), "disagree": None}  # fmt: skip
            if record["audited"]:
                record["disagree"] = not torch.equal(served[0][offset], reference[0][offset])
                if monitor.update(record["disagree"]):
                    alarm_at_row = row + 1
            rows.append(record)
    if args.rows_out:
        Path(args.rows_out).write_text("".join(json.dumps(record) + "\n" for record in rows))
    state = monitor.state()
    result = {
        "alarm_at_row": alarm_at_row,
        "alarm_at_audited": monitor.alarm_at,
        "wealth": state["wealth"],
        "threshold": state["threshold"],
        "epsilon": epsilon,
        "epsilon_source": source,
        "alpha": args.alpha,
        "observed_disagreement": state["observed_disagreement"],
        "rows": len(rows),
        "audited": monitor.audited,
        "disagreements": monitor.disagreements,
        "policy": serve.policy.describe(),
        "fallback": full.name,
        "audit_layers": monitor.audited * model.num_layers,
        "served_layers": sum(record["exit_layer"] for record in rows),
        "reason": describe(monitor, alarm_at_row),
    }
    emit(result, args.json, lambda r: "\n".join(f"{key}: {value}" for key, value in r.items()))


def describe(monitor, alarm_at_row: int | None) -> str:
    """One line: why the monitor alarmed, or that it did not."""
    seen = f"{monitor.disagreements} disagreements in {monitor.audited} audited rows"
    if alarm_at_row is None:
        return f"no alarm: wealth {monitor.wealth:.3g} < 1/alpha = {1 / monitor.alpha:g} after {seen}"
    return (
        f"alarm at row {alarm_at_row}: wealth reached 1/alpha = {1 / monitor.alpha:g} after {seen} "
        f"(H0: disagreement <= {monitor.epsilon:g}); rows after it served at full depth"
    )
