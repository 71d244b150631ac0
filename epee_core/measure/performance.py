"""The performance report: samples/s of full, the calibrated EPEE policy and the oracle at several batch sizes,
per model of the results report, timed side by side in one run.

    OMP_NUM_THREADS=1 python -m epee_core.measure.performance --data data --models models/results \\
        --output docs/performance.md [--recorded docs/performance.json]

Each model is timed by `measure.bench.run_bench` (what `epee bench` runs) on a fixed random sample of its dev
split (`--max-samples`, seed as in the results report). The EPEE policy is the model's calibrated YAML
(`<models>/<run>.yaml`) when there is one; otherwise it is calibrated here with `epee calibrate`'s search
(1-point accuracy budget) on the dev rows outside the timed sample, or on the whole dev split when fewer than
`MIN_CALIBRATION_ROWS` rows are left outside it (the report says which). `--recorded` puts an earlier report's
figures beside the new ones. Resumable: a model whose `performance.json` was measured with the same settings is
read back unless `--rerun`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ..calibration import CalibrationOptions, build_cache, calibrate, search_space
from ..data.text import read_task_examples
from ..engine.model import EarlyExitModel
from ..engine.policies import Policy, make_policy
from ..engine.runner import run_bucketed
from ..evaluation.evaluate import WARMUP_BATCHES, prepare_batches
from ..serving.config import ServeConfig
from .bench import run_bench
from .results import DATASETS, EVAL_SEED, dev_rows, log

RESULT_FILE = "performance.json"
COMPILE_FILE = "compile_check.json"
PROFILE_FILE = "profile.json"
DEFAULT_RUNS = [
    f"{dataset}-{backbone}"
    for backbone in ("minilm", "albert-small", "gpt2-small")
    for dataset in ("ade", "ddi", "git")
] + ["pneumoniamnist-vit-small"]
MIN_CALIBRATION_ROWS = 200
MAX_CALIBRATION_ROWS = 600
# The runner's `torch.profiler` labels and the names the report gives them.
PROFILE_PARTS = {
    "epee.layer": "layers",
    "epee.exit_heads": "exit heads + pooling",
    "epee.policy": "policy",
    "epee.embed": "embed",
}


def dataset_of(run: str):
    name = run.split("-", 1)[0]
    if name not in DATASETS:
        raise SystemExit(f"{run}: no data set '{name}' (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def split_dev(
    run: str, data_dir: Path, max_samples: int, skip_invalid: bool = False, labels: list[str] | None = None
) -> tuple[list, list, int, bool, dict[str, int]]:
    """The timed sample (the rows `results.dev_rows` picks: same seed, same draw), the calibration rows, the
    split size, and whether the calibration rows include the timed ones."""
    data = read_task_examples(
        data_dir / dataset_of(run).dev, dataset_of(run).task, "eval", skip_invalid=skip_invalid, labels=labels
    )
    everything = data.examples
    if len(everything) <= max_samples:
        timed, rest = everything, []
    else:
        chosen = random.Random(EVAL_SEED).sample(range(len(everything)), max_samples)
        timed = [everything[index] for index in chosen]
        taken = set(chosen)
        rest = [example for index, example in enumerate(everything) if index not in taken]
    if len(rest) >= MIN_CALIBRATION_ROWS:
        rest = random.Random(EVAL_SEED).sample(rest, min(len(rest), MAX_CALIBRATION_ROWS))
        return timed, rest, len(everything), False, data.skipped_rows
    return timed, everything[:MAX_CALIBRATION_ROWS], len(everything), True, data.skipped_rows


def calibrated_policy(
    model: EarlyExitModel, run: str, models_dir: Path, calibration_rows: list, overlaps: bool
) -> tuple[Policy, dict]:
    """The model's calibrated YAML policy, else EPEE calibrated here: `epee calibrate`'s search restricted to
    the `epee` settings (the full search may pick another rule, e.g. a static exit), 1-point accuracy budget."""
    yaml_path = models_dir / f"{run}.yaml"
    if yaml_path.is_file():
        policy = ServeConfig.load(yaml_path).policy
        return policy, {"source": f"calibrated YAML {yaml_path}", "policy": policy.describe()}
    batches = prepare_batches(model, calibration_rows, 32)
    options = CalibrationOptions()
    settings = [policy for policy in search_space(model.num_layers) if policy.name == "epee"]
    result = calibrate(build_cache(model, batches), model.spec, options, policies=settings)
    chosen, full = result.dev["chosen"], result.dev["full"]
    where = "all dev rows, including the timed sample" if overlaps else "dev rows outside the timed sample"
    return result.chosen.policy, {
        "source": f"calibrated here (`epee calibrate`'s search over its {len(settings)} `epee` settings) on "
        f"{len(calibration_rows)} {where}, accuracy budget {options.max_accuracy_drop}, "
        f"{options.held_back_fraction:.0%} held back",
        "policy": result.chosen.policy.describe(),
        "calibration_rows": len(calibration_rows),
        "includes_timed_rows": overlaps,
        "calibration_accuracy": chosen.metric,
        "calibration_full_accuracy": full.metric,
        "calibration_layer_speedup": chosen.layer_speedup,
        "warnings": result.warnings,
    }


def settings_of(args: argparse.Namespace) -> dict:
    return {"max_samples": args.max_samples, "batch_sizes": args.batch_sizes, "threads": args.threads}


def measure_run(run: str, args: argparse.Namespace) -> dict:
    """Calibrate (unless a YAML exists) and bench one model; cached in its `performance.json`."""
    model_dir = Path(args.models) / run
    cached_path = model_dir / RESULT_FILE
    if cached_path.is_file() and not args.rerun:
        cached = json.loads(cached_path.read_text(encoding="utf-8"))
        if cached.get("settings") == settings_of(args):
            log(f"{run}: measured before, read back from {cached_path}")
            return cached
    started = time.perf_counter()
    dataset = dataset_of(run)
    model = EarlyExitModel.from_pretrained(model_dir)
    timed, calibration_rows, split_size, overlaps, skipped = split_dev(
        run, Path(args.data), args.max_samples, args.skip_invalid, model.spec.labels
    )
    log(f"{run}: calibrating on {len(calibration_rows)} rows")
    policy, calibration = calibrated_policy(model, run, Path(args.models), calibration_rows, overlaps)
    log(f"{run}: {policy.describe()}; timing {len(timed)} rows at batch sizes {args.batch_sizes}")
    policies = [make_policy("full"), policy, make_policy("oracle")]
    if policy.name in ("full", "oracle"):
        policies = [make_policy("full"), make_policy("oracle")]
    bench = run_bench(model, timed, policies, args.batch_sizes, args.threads)
    result = {
        "run": run,
        "dataset": dataset.name,
        "task": dataset.task,
        "f1_key": dataset.f1_key,
        "split_size": split_size,
        "skipped_rows": skipped,
        "calibration": calibration,
        "epee_policy": policy.name,
        "settings": settings_of(args),
        "seconds": round(time.perf_counter() - started, 1),
        **bench,
    }
    cached_path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return result


# --- torch.compile check ---------------------------------------------------------------------------------------


def compile_check(run: str, args: argparse.Namespace, batch_size: int = 8, max_rows: int = 240) -> dict:
    """Eager vs `torch.compile`d layer blocks (dynamic shapes) on the same batches, taking turns batch by batch
    after every batch has been seen once by both (so recompilation for new shapes is not timed). The compiled
    layers live in a second copy of the model; BERT-family backbones only (MiniLM)."""
    eager = EarlyExitModel.from_pretrained(Path(args.models) / run)
    compiled = EarlyExitModel.from_pretrained(Path(args.models) / run)
    layers = compiled.backbone.model.encoder.layer
    examples, _, _ = dev_rows(
        dataset_of(run), Path(args.data), max_rows, args.skip_invalid, eager.spec.labels
    )
    batches = prepare_batches(eager, examples, batch_size)
    policy = make_policy("full")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        started = time.perf_counter()
        for index, layer in enumerate(list(layers)):
            layers[index] = torch.compile(layer, dynamic=True)
        for inputs, _ in batches:  # compiles, and recompiles for every new shape
            run_bucketed(compiled, inputs, policy)
        compile_seconds = time.perf_counter() - started
        models = {"eager": eager, "compiled": compiled}
        seconds = {"eager": 0.0, "compiled": 0.0}
        for number, (inputs, _) in enumerate(batches):
            for name in ("eager", "compiled") if number % 2 else ("compiled", "eager"):
                began = time.perf_counter()
                run_bucketed(models[name], inputs, policy)
                seconds[name] += time.perf_counter() - began
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "run": run,
        "seconds": round(time.perf_counter() - started, 1),
        "batch_size": batch_size,
        "num_samples": len(examples),
        "policy": "full",
        "compile_and_warmup_seconds": round(compile_seconds, 1),
        "eager_samples_per_second": round(len(examples) / seconds["eager"], 2),
        "compiled_samples_per_second": round(len(examples) / seconds["compiled"], 2),
        "compiled_vs_eager": round(seconds["eager"] / seconds["compiled"], 3),
    }


# --- where the time goes --------------------------------------------------------------------------------------


def measured_policy(results: list[dict], run: str) -> Policy:
    """The EPEE policy the report timed for `run` (its calibrated one), else EPEE's defaults."""
    measured = next((result for result in results if result["run"] == run), None)
    if measured is None:
        return make_policy("epee")
    name = measured["epee_policy"]
    return make_policy(name, next(row for row in measured["results"] if row["policy"] == name)["params"])


def profile_run(run: str, args: argparse.Namespace, results: list[dict], max_rows: int = 320) -> dict:
    """Milliseconds per batch in each labelled part of the runner at batch 8 and 32 (`full` and the run's EPEE
    policy), read from `torch.profiler`; also the layer-tokens a batch processes and the padding share."""
    policy = measured_policy(results, run)
    model = EarlyExitModel.from_pretrained(Path(args.models) / run).eval()
    examples, _, _ = dev_rows(
        dataset_of(run), Path(args.data), max_rows, args.skip_invalid, model.spec.labels
    )
    rows, padding = [], {}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for batch_size in (8, 32):
            batches = prepare_batches(model, examples, batch_size)
            masks = [inputs["attention_mask"] for inputs, _ in batches]
            padding[batch_size] = round(
                1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks), 3
            )
            for current_policy in (make_policy("full"), policy):
                for inputs, labels in batches[:WARMUP_BATCHES]:
                    run_bucketed(model, inputs, current_policy, labels)
                tokens = 0
                with profile(activities=[ProfilerActivity.CPU]) as profiler:
                    started = time.perf_counter()
                    for inputs, labels in batches:
                        tokens += sum(run_bucketed(model, inputs, current_policy, labels).tokens_per_layer)
                    total = time.perf_counter() - started
                parts: dict[str, float] = defaultdict(float)
                for event in profiler.key_averages():
                    if event.key in PROFILE_PARTS:
                        parts[PROFILE_PARTS[event.key]] += event.cpu_time_total / 1e6
                per_batch = {key: value * 1000 / len(batches) for key, value in parts.items()}
                ms_per_batch = total * 1000 / len(batches)
                rows.append(
                    {
                        "batch_size": batch_size,
                        "policy": current_policy.describe(),
                        "ms_per_batch": round(ms_per_batch, 2),
                        **{
                            f"{name}_ms": round(per_batch.get(name, 0.0), 2)
                            for name in PROFILE_PARTS.values()
                        },
                        "bookkeeping_ms": round(ms_per_batch - sum(per_batch.values()), 2),
                        "layer_tokens_per_batch": round(tokens / len(batches)),
                    }
                )
    finally:
        torch.set_num_threads(previous_threads)
    return {"run": run, "num_samples": len(examples), "padding_share": padding, "rows": rows}


def profile_table(profile_report: dict) -> list[str]:
    parts = [f"{name} ms" for name in PROFILE_PARTS.values()]
    lines = [
        "| batch | policy | ms/batch | " + " | ".join(parts) + " | bookkeeping ms | layer-tokens/batch |",
        "|---|---|---|" + "---|" * len(parts) + "---|---|",
    ]
    for row in profile_report["rows"]:
        cells = [str(row["batch_size"]), f"`{row['policy']}`", f"{row['ms_per_batch']:.1f}"]
        cells += [f"{row[f'{name}_ms']:.2f}" for name in PROFILE_PARTS.values()]
        cells += [f"{row['bookkeeping_ms']:.2f}", str(row["layer_tokens_per_batch"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- rendering -------------------------------------------------------------------------------------------------


def _rows(result: dict, batch_size: int) -> dict[str, dict]:
    """The rows of one batch size by policy; an earlier report's `current` runner rows where it timed several."""
    return {
        row["policy"]: row
        for row in result["results"]
        if row["batch_size"] == batch_size and row.get("runner", "current") == "current"
    }


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def model_table(result: dict) -> list[str]:
    key = result["f1_key"]
    lines = [
        f"| batch | policy | accuracy | {key} | avg exit | layer × | samples/s | × full | × oracle | realised |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch_size in result["batch_sizes"]:
        for name, row in _rows(result, batch_size).items():
            lines.append(
                f"| {batch_size} | {name} | {row['accuracy']:.3f} | {row.get(key, 0):.3f} | "
                f"{row['avg_exit_layer']:.2f} | {row['layer_speedup']:.2f} | {row['samples_per_second']:.1f} | "
                f"{_fmt(row['throughput_vs_full'])} | {_fmt(row['throughput_vs_oracle'])} | "
                f"{_fmt(row['realised_saving'])} |"
            )
    return lines


def summary_table(results: list[dict], batch_size: int, recorded: dict[str, dict]) -> list[str]:
    lines = [
        "| model | EPEE policy | accuracy full → EPEE | layer × | EPEE × full | realised | full samples/s | "
        "EPEE samples/s | EPEE × full recorded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        rows, name = _rows(result, batch_size), result["epee_policy"]
        if name not in rows:
            continue
        full, epee = rows["full"], rows[name]
        before = _rows(recorded[result["run"]], batch_size).get(name) if result["run"] in recorded else None
        lines.append(
            f"| {result['run']} | {result['calibration']['policy']} | {full['accuracy']:.3f} → "
            f"{epee['accuracy']:.3f} | {epee['layer_speedup']:.2f} | {_fmt(epee['throughput_vs_full'])} | "
            f"{_fmt(epee['realised_saving'])} | {full['samples_per_second']:.1f} | "
            f"{epee['samples_per_second']:.1f} | {_fmt(before['throughput_vs_full'] if before else None)} |"
        )
    return lines


def render_markdown(report: dict) -> str:
    results = report["models"]
    batch_sizes = report["settings"]["batch_sizes"]
    glance = 8 if 8 in batch_sizes else batch_sizes[-1]
    recorded = {model["run"]: model for model in (report.get("recorded") or {}).get("models", [])}
    lines = [
        "# Performance: full depth, calibrated EPEE and the oracle",
        "",
        f"Generated by `{report['command']}` on {report['generated']}; do not edit by hand. Raw numbers: "
        f"`performance.json`. Measuring took {report['measure_seconds'] / 60:.1f} min"
        + (
            f" (this invocation {report['seconds'] / 60:.1f} min, the rest read back from an earlier one)."
            if report["seconds"] < 0.9 * report["measure_seconds"]
            else "."
        ),
        "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores, shared with other jobs while "
        f"this ran), {report['machine']['platform']}, Python {report['machine']['python']}, torch "
        f"{report['machine']['torch']}; {report['settings']['threads']} torch thread(s), OMP_NUM_THREADS="
        f"{report['machine']['omp_num_threads']}. Git revision {report['git_revision']}.",
        "",
        "How it is measured: `epee bench`'s timing (`measure.bench.run_bench`) on a fixed random sample of "
        f"{report['settings']['max_samples']} dev rows per model (seed {EVAL_SEED}, the results report's sample; "
        "PneumoniaMNIST: val), tokenised once, through the serving runner (length-bucketed). Every policy takes its "
        "turn on each batch (the order rotating) after untimed warm-up batches, so a busy neighbour slows all of "
        "them alike: compare ratios within a table, not absolute numbers across runs.",
        "",
        "`× full`: samples/s over `full`'s. `realised`: measured time saving over the layer saving "
        "(1 − avg exit / layers); 1.0 = every skipped layer became saved time."
        + (f" `recorded`: the same ratio in {report['recorded_from']}." if recorded else ""),
        "",
        f"## Batch {glance} at a glance",
        "",
        *summary_table(results, glance, recorded),
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in report["notes"]],
    ]
    if report.get("compile_check"):
        check = report["compile_check"]
        lines += [
            "",
            "## torch.compile of the layer block",
            "",
            f"{check['run']}, `full`, batch {check['batch_size']}, {check['num_samples']} rows, eager and "
            f"compiled layers (`torch.compile(layer, dynamic=True)`) taking turns batch by batch after a first "
            f"pass that compiled every shape ({check['compile_and_warmup_seconds']} s): eager "
            f"{check['eager_samples_per_second']} samples/s, compiled {check['compiled_samples_per_second']} "
            f"samples/s ({check['compiled_vs_eager']}×). "
            + (
                "It pays, but is not used yet."
                if check["compiled_vs_eager"] >= 1.1
                else "Not worth its compile time (paid again by every worker at start and for new shapes): the "
                "runner does not compile."
            ),
        ]
    if report.get("profile"):
        profile_report = report["profile"]
        padding = ", ".join(
            f"{share:.0%} at batch {size}" for size, share in profile_report["padding_share"].items()
        )
        lines += [
            "",
            "## Where the time goes",
            "",
            f"{profile_report['run']}, {profile_report['num_samples']} dev rows, milliseconds per batch in each "
            "part of the runner, read from `torch.profiler` (the runner labels its parts; bookkeeping = the rest: "
            f"compaction, bucketing, host reads, output writes). Padding share of a batch's tokens: {padding}.",
            "",
            *profile_table(profile_report),
        ]
    for result in results:
        lines += [
            "",
            f"## {result['run']} ({result['num_samples']} of {result['split_size']} dev rows, "
            f"{result['num_layers']} layers)",
            "",
            f"EPEE policy: `{result['calibration']['policy']}` — {result['calibration']['source']}."
            + (
                f" Calibration accuracy {result['calibration']['calibration_accuracy']:.3f} vs full "
                f"{result['calibration']['calibration_full_accuracy']:.3f}."
                if "calibration_accuracy" in result["calibration"]
                else ""
            ),
            "",
            *model_table(result),
        ]
    return "\n".join(lines) + "\n"


def derived_notes(results: list[dict]) -> list[str]:
    """What the numbers say, from the measurements themselves."""
    notes = []
    if any(8 in result["batch_sizes"] for result in results):
        values = [
            _rows(result, 8)[result["epee_policy"]]["realised_saving"]
            for result in results
            if 8 in result["batch_sizes"] and result["epee_policy"] in _rows(result, 8)
        ]
        met = [value for value in values if value is not None and value >= 0.9]
        notes.append(f"EPEE's realised saving is ≥ 0.9 at batch 8 for {len(met)} of {len(values)} models.")
    notes += [
        "Length bucketing removes most padding for `full` as well as for early exit, so early exit is compared "
        "against a baseline that already skips padding.",
        "Long inputs tend to exit later than short ones, so the share of *tokens* skipped is smaller than the "
        "share of layers skipped (rows weigh alike in the layer speed-up); once padding is gone, time follows "
        "tokens (see the profile's layer-tokens per batch).",
        "Each extra sub-batch pays a layer call's fixed cost (reading the layer's weights again); early exit "
        "leaves small sub-batches, where that cost weighs most.",
    ]
    return notes


# --- command line ----------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


def git_revision() -> str:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision


def cached_or_measured(args, run: str | None, file_name: str, what: str, measure, *extra) -> dict | None:
    """A side measurement on one run, read back from the run's directory when made with the same threads."""
    if not run:
        return None
    path = Path(args.models) / run / file_name
    cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not args.rerun else None
    if cached is not None and cached.get("threads") == args.threads:
        return cached
    log(f"{what} on {run}")
    started = time.perf_counter()
    measured = {**measure(run, args, *extra), "threads": args.threads}
    measured["seconds"] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(measured, indent=2) + "\n", encoding="utf-8")
    return measured


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m epee_core.measure.performance",
        description="Time full, calibrated EPEE and the oracle side by side per model; write "
        "docs/performance.md and a JSON next to it.",
    )
    parser.add_argument("--data", default="data", help="folder holding ade/, ddi/, git/, …")
    parser.add_argument("--models", default="models/results", help="the results report's model directories")
    parser.add_argument(
        "--output", default="docs/performance.md", help="Markdown report; the JSON goes next to it"
    )
    parser.add_argument("--only", help=f"comma-separated runs (default: {','.join(DEFAULT_RUNS)})")
    parser.add_argument("--max-samples", type=int, default=400, help="timed dev rows per model (default 400)")
    parser.add_argument(
        "--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)"
    )
    parser.add_argument(
        "--recorded", metavar="JSON", help="an earlier performance.json whose figures go beside the new ones"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
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
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave unusable data rows out (counted per reason) instead of stopping at the first",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size.strip()]
    runs = [run.strip() for run in args.only.split(",")] if args.only else DEFAULT_RUNS
    missing = [run for run in runs if not (Path(args.models) / run).is_dir()]
    if missing:
        raise SystemExit(
            f"no model directory {Path(args.models) / missing[0]} (train it with epee_core.measure.results)"
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    results = [measure_run(run, args) for run in runs]
    check = cached_or_measured(args, args.compile_check, COMPILE_FILE, "torch.compile check", compile_check)
    profile = cached_or_measured(
        args, args.profile, PROFILE_FILE, "profiling the runner", profile_run, results
    )
    report = {
        "command": shlex.join(["python", "-m", "epee_core.measure.performance", *(argv or sys.argv[1:])]),
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.perf_counter() - started, 1),
        "measure_seconds": round(
            sum(result["seconds"] for result in results)
            + (check or {}).get("seconds", 0.0)
            + (profile or {}).get("seconds", 0.0),
            1,
        ),
        "machine": machine(),
        "git_revision": git_revision(),
        "settings": settings_of(args),
        "notes": derived_notes(results),
        "compile_check": check,
        "profile": profile,
        "models": results,
        "recorded_from": args.recorded,
        "recorded": json.loads(Path(args.recorded).read_text(encoding="utf-8")) if args.recorded else None,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    output.write_text(render_markdown(report), encoding="utf-8")
    log(f"wrote {output} and {output.with_suffix('.json')} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
