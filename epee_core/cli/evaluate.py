"""`epee evaluate` and `epee bench`: accuracy, exit layers and throughput of policies on labelled data."""

from __future__ import annotations

import json

from .common import (
    CommandError,
    add_model_data_arguments,
    add_numerics_arguments,
    add_skip_invalid,
    emit,
    format_table,
    numerics_choice,
    policies_from_args,
    read_model_data,
)

EVALUATE_COLUMNS = [
    ("policy", "policy"),
    ("accuracy", "accuracy"),
    ("macro_f1", "macro_f1"),
    ("avg_exit_layer", "avg_exit"),
    ("layer_speedup", "layer_x"),
    ("samples_per_second", "samples/s"),
    ("speedup_vs_full", "speed_x"),
]


def add_evaluate(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="accuracy, average exit layer and speed of policies on labelled data"
    )
    add_model_data_arguments(
        parser, "labelled JSONL file; images: MedMNIST .npz (test_* if present, else val_*) or image folder"
    )
    parser.add_argument(
        "--policy",
        help='policy names, comma-separated (default: epee; the policies: docs/design.md, "Policies")',
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="policy parameter")
    parser.add_argument(
        "--config", help="model YAML whose 'epee:' section gives the policy and its parameters"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per engine call (default 8)")
    parser.add_argument("--max-samples", type=int, help="use only the first N examples")
    add_numerics_arguments(parser, "run the model in int8")
    add_skip_invalid(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args) -> None:
    from ..engine.model import EarlyExitModel
    from ..evaluation.evaluate import evaluate_policies
    from ..serving.config import ServeConfig

    policies = policies_from_args(args.policy, args.set, args.config)
    serve = ServeConfig.load(args.config) if args.config else None
    model = EarlyExitModel.from_pretrained(args.model, **numerics_choice(args, serve))
    data = read_model_data(args, model)
    results = evaluate_policies(model, data.examples, policies, args.batch_size)
    columns = list(EVALUATE_COLUMNS)
    extra = {"relation-extraction": ("micro_f1", "micro_f1"), "multi-label": ("example_f1", "example_f1")}
    if model.spec.task in extra:
        columns.insert(3, extra[model.spec.task])
    output = results[0] if len(results) == 1 else {"model": args.model, "data": args.data, "results": results}
    output["skipped_rows"] = data.skipped_rows
    emit(output, args.json, lambda _: format_table(results, columns))


def add_bench(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="in-process side-by-side benchmark: full, the YAML's policy, PABEE, entropy, oracle at several "
        "batch sizes",
        description="Run every policy on the same inputs at each batch size (policies take turns batch by "
        "batch after warm-up, torch threads pinned the same for all) and report samples/s, p50/p95 per-batch "
        "latency, accuracy, average exit layer, and throughput relative to full and to the oracle. Writes "
        "JSON + markdown.",
    )
    add_model_data_arguments(
        parser, "labelled data: JSONL; images: MedMNIST .npz (test_* if present, else val_*) or image folder"
    )
    parser.add_argument(
        "--config", help="model YAML whose 'epee:' section gives the policy, its parameters and num_threads"
    )
    parser.add_argument(
        "--policies",
        help="comma-separated policies (default: full, the YAML's policy or epee, patience, entropy, oracle)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="policy parameter")
    parser.add_argument(
        "--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)"
    )
    parser.add_argument("--max-samples", type=int, help="use only the first N examples")
    add_skip_invalid(parser)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for every policy (default: the YAML's num_threads, else torch's)",
    )
    parser.add_argument(
        "--output-dir", help="where bench-MODEL-DATA.json/.md go (default load_tests/reports/<date>)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), help="weights' dtype (default float32)"
    )
    add_numerics_arguments(parser, "run the policies in int8; the `hf` row stays the float32 stock forward")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_open_loop_arguments(parser)
    parser.set_defaults(run=run_bench)


def add_open_loop_arguments(parser) -> None:
    """`--arrival-rate` turns `epee bench` into the open-loop latency benchmark (measure/openloop.py)."""
    group = parser.add_argument_group(
        "open loop",
        "latency under Poisson arrivals: the stock handler, full depth and the YAML's policy batch-level at "
        "each --delays value, and the policy on the layer-level scheduler",
    )
    group.add_argument(
        "--arrival-rate",
        metavar="R[,R...]",
        help="Poisson arrival rates: requests/s, or a fraction of full depth's measured capacity like 0.75x",
    )
    group.add_argument(
        "--delays", default="0,5,10,20,50", help="maxBatchDelay values (ms) swept for batch-level contestants"
    )
    group.add_argument(
        "--requests", type=int, default=400, help="requests per contestant and rate (default 400)"
    )
    group.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="contestants take turns over this many rounds of the requests, so machine drift hits all alike",
    )
    group.add_argument(
        "--slo-p95-ms", type=float, help="p95 objective for slo_capacity (default: the YAML's slo_p95_ms)"
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the arrival schedule (default 0)")
    group.add_argument(
        "--cohort-threads",
        type=int,
        help="threads that run the layer-level scheduler's cohorts side by side (default: the YAML's "
        "cohort_threads, else --threads); the batch contestants use --threads torch threads",
    )
    # batch contestants take the YAML's batchSize (8 without a YAML or for a continuous one)
    group.add_argument("--plot", help="write the latency-vs-load plot (PNG) here")


def parse_batch_sizes(text: str) -> list[int]:
    """`--batch-sizes 1,8,32` as a list of positive integers."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"--batch-sizes expects comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise CommandError(f"--batch-sizes expects positive integers, got {text!r}")
    return sizes


def bench_placement(device_name: str, dtype_name: str | None):
    """`--device` and `--dtype` as torch objects; a user error when CUDA is asked for and missing."""
    import torch

    from ..serving.config import DTYPES

    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise CommandError(f"--device must be cpu, cuda or cuda:N, got {device_name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device_name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device must be cpu, cuda or cuda:N, got {device_name!r}")
    return device, DTYPES[dtype_name or "float32"]


def run_bench(args) -> None:
    from pathlib import Path

    if args.arrival_rate:
        return run_open_loop_bench(args)
    from ..engine.model import EarlyExitModel
    from ..engine.policies import PolicyError
    from ..measure import bench
    from ..measure.loadtest import default_report_dir
    from ..serving.config import ServeConfig

    batch_sizes = parse_batch_sizes(args.batch_sizes)
    serve = ServeConfig.load(args.config) if args.config else None
    names = args.policies or ",".join(bench.default_policy_names(serve.policy.name if serve else "epee"))
    policies = policies_from_args(names, args.set, args.config)
    if len({policy.name for policy in policies}) != len(policies):
        raise PolicyError(f"--policies names a policy twice: {names}")
    device, dtype = bench_placement(args.device, args.dtype)
    numerics = numerics_choice(args, serve)
    model = EarlyExitModel.from_pretrained(args.model, device=device, dtype=dtype, **numerics)
    # the stock-handler baseline is the plain float32 torch model, whatever the policies run in (a runtime
    # leaves `stock_forward` in torch)
    stock = (
        EarlyExitModel.from_pretrained(args.model, device=device) if numerics["quantize"] != "none" else None
    )
    data = read_model_data(args, model)
    threads = args.threads or (serve.num_threads if serve else None)
    report = bench.run_bench(model, data.examples, policies, batch_sizes, threads, stock_model=stock)
    report = {"model": args.model, "data": args.data, "config": args.config, "device": str(device),
              "dtype": str(model.dtype).removeprefix("torch."), **numerics, **report}  # fmt: skip
    report["skipped_rows"] = data.skipped_rows
    stem = f"bench-{Path(args.model).name}-{Path(args.data).stem}"
    json_path, markdown_path = bench.write_report(report, args.output_dir or default_report_dir(), stem)
    report["written"] = [str(json_path), str(markdown_path)]
    emit(report, args.json, lambda r: bench.render_markdown(r) + "\nwrote " + ", ".join(r["written"]))


def run_open_loop_bench(args) -> None:
    """`epee bench --arrival-rate`: one JSON object with `results`, `best`, `comparisons`, `slo_capacity`."""
    import dataclasses
    import sys
    from pathlib import Path

    import torch

    from ..engine.model import EarlyExitModel
    from ..engine.spec import read_yaml
    from ..measure import openloop
    from ..measure.loadtest import default_report_dir
    from ..serving.config import ServeConfig

    serve = ServeConfig.load(args.config) if args.config else ServeConfig()
    yaml_config = read_yaml(args.config) if args.config else {}
    if args.policies:
        names = [name for name in args.policies.split(",") if name.strip() not in ("full", "hf")]
        policy = policies_from_args(names[0] if names else "full", args.set, args.config)[0]
    else:
        policy = serve.policy
    # the batch contestants' batch: the YAML's, unless the YAML is for the continuous scheduler (its batchSize is
    # the requests in flight): then TorchServe's usual 8
    continuous_yaml = bool(yaml_config.get("continuousBatching"))
    batch_size = 8 if continuous_yaml else int(yaml_config.get("batchSize", 8))
    try:
        delays = tuple(float(part) for part in args.delays.split(","))
    except ValueError:
        raise CommandError(f"--delays expects comma-separated milliseconds, got {args.delays!r}") from None
    if args.requests < 10:
        raise CommandError(f"--requests must be at least 10, got {args.requests}")
    device, dtype = bench_placement(args.device, args.dtype)
    numerics = numerics_choice(args, serve if args.config else None)
    model = EarlyExitModel.from_pretrained(args.model, device=device, dtype=dtype, **numerics)
    stock = (
        EarlyExitModel.from_pretrained(args.model, device=device) if numerics["quantize"] != "none" else None
    )
    data = read_model_data(args, model)
    threads = args.threads or serve.num_threads or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    limits = serve.scheduler_limits
    if args.cohort_threads is not None:
        if args.cohort_threads < 1:
            raise CommandError(f"--cohort-threads must be at least 1, got {args.cohort_threads}")
        limits = dataclasses.replace(limits, cohort_threads=args.cohort_threads)
    bench = openloop.OpenLoopBench(model, data.examples, policy, batch_size, delays, limits,
                                   args.requests, args.seed, stock, args.rounds)  # fmt: skip
    say = (lambda message: print(message, file=sys.stderr)) if not args.json else None
    try:
        report = openloop.run_open_loop(bench, args.arrival_rate, args.slo_p95_ms or serve.slo_p95_ms, say)
    except ValueError as error:
        raise CommandError(str(error)) from None
    finally:
        torch.set_num_threads(previous_threads)
    report = {"model": args.model, "data": args.data, "config": args.config, "policy": policy.describe(),
              "threads": threads, "cohort_threads": limits.cohort_threads, **numerics, **report,
              "skipped_rows": data.skipped_rows}  # fmt: skip
    stem = f"openloop-{Path(args.model).name}-{Path(args.data).stem}"
    out_dir = Path(args.output_dir or default_report_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(openloop.render_markdown(report))
    report["written"] = [str(out_dir / f"{stem}.json"), str(out_dir / f"{stem}.md")]
    if args.plot:
        openloop.plot_latency(report, args.plot)
        report["written"].append(args.plot)
    emit(report, args.json, lambda r: openloop.render_markdown(r) + "\nwrote " + ", ".join(r["written"]))
