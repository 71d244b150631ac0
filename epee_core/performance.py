"""The performance report (issue 9): samples/s of full, calibrated EPEE and the oracle at several batch sizes, with
the runner before issue 9 and the current one timed side by side, for the models of the results report.

    OMP_NUM_THREADS=1 python -m epee_core.performance --data ../shared/data --models models/results \\
        --output docs/performance.md

Each model is timed by `epee_core.bench.run_bench` (what `epee bench` runs) on a fixed random sample of its dev
split (`--max-samples`, seed as in the results report). The EPEE policy is the model's calibrated YAML
(`<models>/<run>.yaml`) when there is one; otherwise it is calibrated here with `epee calibrate`'s search
(1-point accuracy budget) on the dev rows outside the timed sample, or on the whole dev split when fewer than
`MIN_CALIBRATION_ROWS` rows are left outside it (the report says which). Resumable: a model whose
`performance.json` was measured with the same settings is read back unless `--rerun`.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from . import runner as runner_module
from . import runner_before as runner_before_module
from .bench import run_bench
from .calibration import CalibrationOptions, build_cache, calibrate, search_space
from .config import ServeConfig
from .data import read_task_examples
from .evaluation import RUNNERS, WARMUP_BATCHES, check_runners, prepare_batches
from .model import EarlyExitModel
from .policies import Policy, make_policy
from .results import DATASETS, EVAL_SEED, dev_rows, log
from .runner import run_early_exit

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


def dataset_of(run: str):
    name = run.split("-", 1)[0]
    if name not in DATASETS:
        raise SystemExit(f"{run}: no data set '{name}' (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def split_dev(run: str, data_dir: Path, max_samples: int) -> tuple[list, list, int, bool]:
    """The timed sample (the rows `results.dev_rows` picks: same seed, same draw), the calibration rows, the
    split size, and whether the calibration rows include the timed ones."""
    everything = read_task_examples(data_dir / dataset_of(run).dev, dataset_of(run).task, "eval")
    if len(everything) <= max_samples:
        timed, rest = everything, []
    else:
        chosen = random.Random(EVAL_SEED).sample(range(len(everything)), max_samples)
        timed = [everything[index] for index in chosen]
        taken = set(chosen)
        rest = [example for index, example in enumerate(everything) if index not in taken]
    if len(rest) >= MIN_CALIBRATION_ROWS:
        rest = random.Random(EVAL_SEED).sample(rest, min(len(rest), MAX_CALIBRATION_ROWS))
        return timed, rest, len(everything), False
    return timed, everything[:MAX_CALIBRATION_ROWS], len(everything), True


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
    return {
        "max_samples": args.max_samples,
        "batch_sizes": args.batch_sizes,
        "runners": args.runners,
        "threads": args.threads,
    }


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
    timed, calibration_rows, split_size, overlaps = split_dev(run, Path(args.data), args.max_samples)
    log(f"{run}: calibrating on {len(calibration_rows)} rows")
    policy, calibration = calibrated_policy(model, run, Path(args.models), calibration_rows, overlaps)
    log(f"{run}: {policy.describe()}; timing {len(timed)} rows at batch sizes {args.batch_sizes}")
    policies = [make_policy("full"), policy, make_policy("oracle")]
    if policy.name in ("full", "oracle"):
        policies = [make_policy("full"), make_policy("oracle")]
    bench = run_bench(model, timed, policies, args.batch_sizes, args.threads, args.runners)
    result = {
        "run": run,
        "dataset": dataset.name,
        "task": dataset.task,
        "f1_key": dataset.f1_key,
        "split_size": split_size,
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
    after every batch has been seen once by both (so recompilation for new shapes is not timed). BERT-family
    backbones only (MiniLM)."""
    model = EarlyExitModel.from_pretrained(Path(args.models) / run)
    layers = model.backbone.model.encoder.layer
    eager_layers = list(layers)
    examples, _ = dev_rows(dataset_of(run), Path(args.data), max_rows)
    batches = prepare_batches(model, examples, batch_size)
    policy = make_policy("full")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        started = time.perf_counter()
        compiled_layers = [torch.compile(layer, dynamic=True) for layer in eager_layers]

        def use(which: list) -> None:
            for index, layer in enumerate(which):
                layers[index] = layer

        use(compiled_layers)
        for inputs, _ in batches:  # compiles, and recompiles for every new shape
            run_early_exit(model, inputs, policy)
        compile_seconds = time.perf_counter() - started
        seconds = {"eager": 0.0, "compiled": 0.0}
        for number, (inputs, _) in enumerate(batches):
            for name in ("eager", "compiled") if number % 2 else ("compiled", "eager"):
                use(eager_layers if name == "eager" else compiled_layers)
                began = time.perf_counter()
                run_early_exit(model, inputs, policy)
                seconds[name] += time.perf_counter() - began
        use(eager_layers)
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


@contextmanager
def timed_parts(model: EarlyExitModel, seconds: dict[str, float], tokens: list[int]) -> Iterator[None]:
    """Time the runner's parts while inside: embeddings, layer calls (and the tokens they process), exit heads
    with pooling, and the policy; whatever else a runner spends is bookkeeping. Wraps the model's own methods
    and the runners' `policy_step`, and puts them back on exit."""

    def timed(key: str, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            output = function(*args, **kwargs)
            seconds[key] += time.perf_counter() - started
            return output

        return wrapper

    backbone, exits = model.backbone, model.exits
    layer = backbone.layer

    def counted_layer(index, hidden, bias):
        tokens[0] += hidden.shape[0] * hidden.shape[1]
        return layer(index, hidden, bias)

    backbone.embed = timed("embed", backbone.embed)
    backbone.layer = timed("layers", counted_layer)
    exits.forward = timed("exit heads + pooling", exits.forward)
    modules = [runner_module, runner_before_module]
    originals = [module.policy_step for module in modules]
    for module, original in zip(modules, originals):
        module.policy_step = timed("policy", original)
    try:
        yield
    finally:
        for name in ("embed", "layer"):
            del backbone.__dict__[name]
        del exits.__dict__["forward"]
        for module, original in zip(modules, originals):
            module.policy_step = original


PROFILE_PARTS = ("layers", "exit heads + pooling", "policy", "embed")


def profile_run(run: str, args: argparse.Namespace, policy: Policy, max_rows: int = 320) -> dict:
    """Milliseconds per batch in each part of each runner at batch 8 and 32 (`full` and `policy`), runners
    taking turns batch by batch; also the layer-tokens each runner processes and the padding share of a batch."""
    model = EarlyExitModel.from_pretrained(Path(args.models) / run).eval()
    examples, _ = dev_rows(dataset_of(run), Path(args.data), max_rows)
    runners = ["before", "unbucketed", "current"]
    rows, padding = [], {}
    seconds: dict[str, float] = defaultdict(float)
    tokens = [0]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with timed_parts(model, seconds, tokens):
            for batch_size in (8, 32):
                batches = prepare_batches(model, examples, batch_size)
                masks = [inputs["attention_mask"] for inputs, _ in batches]
                padding[batch_size] = round(
                    1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks), 3
                )
                for current_policy in (make_policy("full"), policy):
                    totals = {name: defaultdict(float) for name in runners}
                    for inputs, labels in batches[:WARMUP_BATCHES]:
                        for name in runners:
                            RUNNERS[name](model, inputs, current_policy, labels)
                    for number, (inputs, labels) in enumerate(batches):
                        for turn in range(len(runners)):
                            name = runners[(number + turn) % len(runners)]
                            seconds.clear()
                            tokens[0] = 0
                            started = time.perf_counter()
                            RUNNERS[name](model, inputs, current_policy, labels)
                            totals[name]["total"] += time.perf_counter() - started
                            totals[name]["tokens"] += tokens[0]
                            for key, value in seconds.items():
                                totals[name][key] += value
                    for name in runners:
                        total = totals[name]
                        per_batch = {
                            key: total[key] * 1000 / len(batches) for key in ("total", *PROFILE_PARTS)
                        }
                        rows.append(
                            {
                                "batch_size": batch_size,
                                "policy": current_policy.describe(),
                                "runner": name,
                                "ms_per_batch": round(per_batch["total"], 2),
                                **{f"{key}_ms": round(per_batch[key], 2) for key in PROFILE_PARTS},
                                "bookkeeping_ms": round(
                                    per_batch["total"] - sum(per_batch[key] for key in PROFILE_PARTS), 2
                                ),
                                "layer_tokens_per_batch": round(total["tokens"] / len(batches)),
                            }
                        )
    finally:
        torch.set_num_threads(previous_threads)
    return {"run": run, "num_samples": len(examples), "padding_share": padding, "rows": rows}


def profile_table(profile: dict) -> list[str]:
    parts = [f"{key} ms" for key in PROFILE_PARTS]
    lines = [
        "| batch | policy | runner | ms/batch | "
        + " | ".join(parts)
        + " | bookkeeping ms | layer-tokens/batch |",
        "|---|---|---|---|" + "---|" * len(parts) + "---|---|",
    ]
    for row in profile["rows"]:
        cells = [str(row["batch_size"]), f"`{row['policy']}`", row["runner"], f"{row['ms_per_batch']:.1f}"]
        cells += [f"{row[f'{key}_ms']:.2f}" for key in PROFILE_PARTS]
        cells += [f"{row['bookkeeping_ms']:.2f}", str(row["layer_tokens_per_batch"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- rendering -------------------------------------------------------------------------------------------------


def _rows(result: dict, runner: str, batch_size: int) -> dict[str, dict]:
    return {
        row["policy"]: row
        for row in result["results"]
        if row["runner"] == runner and row["batch_size"] == batch_size
    }


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def model_table(result: dict) -> list[str]:
    key = result["f1_key"]
    before_name, after_name = result["runners"][0], result["runners"][-1]
    lines = [
        f"| batch | policy | accuracy | {key} | avg exit | layer × | samples/s {before_name} | samples/s "
        f"{after_name} | {after_name} / {before_name} | × full {before_name} | × full {after_name} | realised "
        f"{before_name} | realised {after_name} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch_size in result["batch_sizes"]:
        before, after = _rows(result, before_name, batch_size), _rows(result, after_name, batch_size)
        for name, row in after.items():
            old = before[name]
            same = old["exit_layer_counts"] == row["exit_layer_counts"] and old["accuracy"] == row["accuracy"]
            accuracy = f"{row['accuracy']:.3f}" + ("" if same else f" ({before_name}: {old['accuracy']:.3f})")
            lines.append(
                f"| {batch_size} | {name} | {accuracy} | {row.get(key, 0):.3f} | {row['avg_exit_layer']:.2f} | "
                f"{row['layer_speedup']:.2f} | {old['samples_per_second']:.1f} | {row['samples_per_second']:.1f} | "
                f"{row['samples_per_second'] / old['samples_per_second']:.2f} | "
                f"{_fmt(old['throughput_vs_full'])} | {_fmt(row['throughput_vs_full'])} | "
                f"{_fmt(old['realised_saving'])} | {_fmt(row['realised_saving'])} |"
            )
    return lines


def summary_table(results: list[dict], batch_size: int) -> list[str]:
    before_name, after_name = results[0]["runners"][0], results[0]["runners"][-1]
    lines = [
        f"| model | EPEE policy | accuracy full → EPEE | layer × | EPEE × full {before_name} | EPEE × full "
        f"{after_name} | realised {before_name} | realised {after_name} | full samples/s {before_name} → "
        f"{after_name} | EPEE samples/s {before_name} → {after_name} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        before, after = _rows(result, before_name, batch_size), _rows(result, after_name, batch_size)
        name = result["epee_policy"]
        if batch_size not in result["batch_sizes"] or name not in after:
            continue
        full_old, full_new, epee_old, epee_new = before["full"], after["full"], before[name], after[name]
        lines.append(
            f"| {result['run']} | {result['calibration']['policy']} | {full_new['accuracy']:.3f} → "
            f"{epee_new['accuracy']:.3f} | {epee_new['layer_speedup']:.2f} | "
            f"{_fmt(epee_old['throughput_vs_full'])} | {_fmt(epee_new['throughput_vs_full'])} | "
            f"{_fmt(epee_old['realised_saving'])} | {_fmt(epee_new['realised_saving'])} | "
            f"{full_old['samples_per_second']:.1f} → {full_new['samples_per_second']:.1f} | "
            f"{epee_old['samples_per_second']:.1f} → {epee_new['samples_per_second']:.1f} |"
        )
    return lines


def render_markdown(report: dict) -> str:
    results = report["models"]
    runners = report["settings"]["runners"]
    batch_sizes = report["settings"]["batch_sizes"]
    glance = 8 if 8 in batch_sizes else batch_sizes[-1]
    lines = [
        "# Performance: the runner before and after issue 9",
        "",
        f"Generated by `{report['command']}` on {report['generated']}; do not edit by hand. Raw numbers: "
        f"`performance.json`. Measuring took {report['measure_seconds'] / 60:.1f} min (calibration and timing of "
        f"every model{', the torch.compile check' if report.get('compile_check') else ''}"
        f"{', the profile' if report.get('profile') else ''}"
        + (
            f"; this invocation {report['seconds'] / 60:.1f} min, the rest read back from `performance.json` "
            "files of an earlier invocation with the same settings)."
            if report["seconds"] < 0.9 * report["measure_seconds"]
            else ")."
        ),
        "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores, shared with other jobs while "
        f"this ran), {report['machine']['platform']}, Python {report['machine']['python']}, torch "
        f"{report['machine']['torch']}; {report['settings']['threads']} torch thread(s), OMP_NUM_THREADS="
        f"{report['machine']['omp_num_threads']}. Git revision {report['git_revision']}.",
        "",
        "How it is measured: `epee_core.bench.run_bench` (what `epee bench` runs) on a fixed random sample of "
        f"{report['settings']['max_samples']} dev rows per model (seed {EVAL_SEED}, the results report's sample; "
        "PneumoniaMNIST: val), tokenised once. Every runner × policy pair takes its turn on each batch (the order "
        "rotating) after 3 untimed warm-up batches, so a busy neighbour slows all of them alike: compare ratios "
        "within a table, not absolute numbers across tables. Runners: "
        + ", ".join(f"`{name}`" for name in runners)
        + " — `before` is the runner as it was before issue 9 (`epee_core/runner_before.py`, kept unchanged), "
        "`current` is what serving runs now (`run_bucketed`: the lean loop with length bucketing). Both give "
        "every row the same exit layer and prediction (tested); an accuracy cell would show both if they differed.",
        "",
        "`× full`: samples/s over `full`'s with the same runner. `realised`: measured time saving over the layer "
        "saving (1 − avg exit / layers); 1.0 = every skipped layer became saved time. The EPEE policy is each "
        "model's calibrated one (source per model below).",
        "",
        f"## Batch {glance} at a glance",
        "",
        *summary_table(results, glance),
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
        profile = report["profile"]
        padding = ", ".join(
            f"{share:.0%} at batch {size}" for size, share in profile["padding_share"].items()
        )
        lines += [
            "",
            "## Where the time goes",
            "",
            f"{profile['run']}, {profile['num_samples']} dev rows, milliseconds per batch in each part of each runner "
            "(runners taking turns batch by batch; parts timed by wrapping the model's methods and the runners' "
            "`policy_step`; bookkeeping = the rest: compaction, bucketing, host reads, output writes). "
            f"`unbucketed` is the lean loop without length bucketing. Padding share of a batch's tokens: {padding}.",
            "",
            *profile_table(profile),
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
    """What the numbers say about bucketing, per batch size, from the measurements themselves."""
    notes = []
    before_name, after_name = results[0]["runners"][0], results[0]["runners"][-1]
    for batch_size in results[0]["batch_sizes"]:
        full_gain, epee_gain = [], []
        for result in results:
            before, after = _rows(result, before_name, batch_size), _rows(result, after_name, batch_size)
            name = result["epee_policy"]
            if name not in after:
                continue
            full_gain.append(after["full"]["samples_per_second"] / before["full"]["samples_per_second"])
            epee_gain.append(after[name]["samples_per_second"] / before[name]["samples_per_second"])
        if full_gain:
            notes.append(
                f"batch {batch_size}: `{after_name}` runs `full` {min(full_gain):.2f}–{max(full_gain):.2f}× "
                f"(median {sorted(full_gain)[len(full_gain) // 2]:.2f}×) and EPEE {min(epee_gain):.2f}–"
                f"{max(epee_gain):.2f}× (median {sorted(epee_gain)[len(epee_gain) // 2]:.2f}×) as fast as "
                f"`{before_name}`."
            )
    if any(8 in result["batch_sizes"] for result in results):
        for runner in (before_name, after_name):
            values = [
                _rows(result, runner, 8)[result["epee_policy"]]["realised_saving"]
                for result in results
                if 8 in result["batch_sizes"] and result["epee_policy"] in _rows(result, runner, 8)
            ]
            met = [value for value in values if value is not None and value >= 0.9]
            notes.append(
                f"Issue 9's goal, EPEE's realised saving ≥ 0.9 at batch 8: met for {len(met)} of {len(values)} "
                f"models with `{runner}`."
            )
    notes += [
        "Where the realised saving falls with bucketing: the pre-issue-9 runner already cut padding that no remaining row needs as rows left, so early exit got a "
        "padding saving that `full` did not: its realised saving included it. Length bucketing gives `full` that "
        "saving too, so the same EPEE run is compared against a faster baseline.",
        "Long inputs tend to exit later than short ones, so the share of *tokens* skipped is smaller than the "
        "share of layers skipped (rows weigh alike in the layer speed-up); once padding is gone, time follows "
        "tokens (issue 9's profile, models/ade-minilm-4k with its calibrated policy at batch 8: 2.07× fewer "
        "layer-tokens for 2.27× fewer layers).",
        "Each extra sub-batch pays a layer call's fixed cost (reading the layer's weights again, ~1.5 ms for "
        "MiniLM); early exit leaves small sub-batches, where that cost weighs most.",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m epee_core.performance",
        description="Time full, calibrated EPEE and the oracle with the runner before issue 9 and the current "
        "one side by side; write docs/performance.md and a JSON next to it.",
    )
    parser.add_argument("--data", default="../shared/data", help="folder holding ade/, ddi/, git/, …")
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
        "--runners",
        default="before,current",
        help=f"runners timed side by side, first = before (from {', '.join(RUNNERS)}; default before,current)",
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
        help="also time each part of each runner (layers, heads, policy, bookkeeping) on this run, e.g. ade-minilm",
    )
    parser.add_argument("--rerun", action="store_true", help="measure again even if performance.json matches")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size.strip()]
    args.runners = [name.strip() for name in args.runners.split(",") if name.strip()]
    try:
        check_runners(args.runners)
    except ValueError as error:
        raise SystemExit(f"--runners: {error}") from None
    if len(args.runners) < 2:
        raise SystemExit("--runners: name two runners to compare, e.g. before,current")
    runs = [run.strip() for run in args.only.split(",")] if args.only else DEFAULT_RUNS
    missing = [run for run in runs if not (Path(args.models) / run).is_dir()]
    if missing:
        raise SystemExit(
            f"no model directory {Path(args.models) / missing[0]} (train it with epee_core.results)"
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    results = [measure_run(run, args) for run in runs]
    check = None
    if args.compile_check:
        check_path = Path(args.models) / args.compile_check / COMPILE_FILE
        if check_path.is_file() and not args.rerun:
            check = json.loads(check_path.read_text(encoding="utf-8"))
        if check is None or check.get("threads") != args.threads:
            log(f"torch.compile check on {args.compile_check}")
            check = {**compile_check(args.compile_check, args), "threads": args.threads}
            check_path.write_text(json.dumps(check, indent=2) + "\n", encoding="utf-8")
    profile = None
    if args.profile:
        profile_path = Path(args.models) / args.profile / PROFILE_FILE
        if profile_path.is_file() and not args.rerun:
            profile = json.loads(profile_path.read_text(encoding="utf-8"))
        if profile is None or profile.get("threads") != args.threads:
            log(f"profiling the runners on {args.profile}")
            measured = next((result for result in results if result["run"] == args.profile), None)
            policy = make_policy("epee")
            if measured is not None:
                policy = make_policy(
                    measured["epee_policy"],
                    next(r for r in measured["results"] if r["policy"] == measured["epee_policy"])["params"],
                )
            started_profile = time.perf_counter()
            profile = {**profile_run(args.profile, args, policy), "threads": args.threads}
            profile["seconds"] = round(time.perf_counter() - started_profile, 1)
            profile_path.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    report = {
        "command": shlex.join(["python", "-m", "epee_core.performance", *(argv or sys.argv[1:])]),
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
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    output.write_text(render_markdown(report), encoding="utf-8")
    log(f"wrote {output} and {output.with_suffix('.json')} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
