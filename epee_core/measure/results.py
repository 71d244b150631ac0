"""The results report: train every backbone × data set on a bounded budget, evaluate the policies on the
dev/val split, write `docs/results.md` (one table + notes derived from the numbers) and a JSON next to it.

    python -m epee_core.measure.results --data ../shared/data --models models/results --output docs/results.md

Resumable: a model directory whose `epee.yaml` records the same recipe is not retrained, and its evaluation is
read back from `evaluation.json` (unless `--reevaluate`). Training and timing are `training.train` and
`evaluation.evaluate.evaluate_policies`, exactly what `epee train` and `epee evaluate` run.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.text import read_task_examples
from ..engine.model import SPEC_FILE, EarlyExitModel
from ..engine.policies import make_policy
from ..engine.spec import ModelSpec
from ..evaluation.evaluate import evaluate_policies
from ..training.trainer import TrainConfig, train

EVALUATION_FILE = "evaluation.json"
POLICIES = ("full", "entropy", "patience", "epee", "fpabee", "oracle")
EARLY_EXIT_POLICIES = ("entropy", "patience", "epee", "fpabee")
TIMED_POLICIES = ("full", "epee")  # the table shows samples/s for these two
EVAL_SEED = 0
SAME_F1_MARGIN = 0.01  # |epee F1 − full F1| below this counts as "matches full depth"


@dataclass(frozen=True)
class DataSet:
    name: str
    task: str
    train: str  # relative to --data
    dev: str
    f1_key: str  # the task's F1 in the evaluate JSON


DATASETS = {
    "ade": DataSet("ade", "text-classification", "ade/train.jsonl", "ade/dev.jsonl", "macro_f1"),
    "ddi": DataSet("ddi", "relation-extraction", "ddi/train.jsonl", "ddi/dev.jsonl", "micro_f1"),
    "git": DataSet("git", "relation-extraction", "git/train.jsonl", "git/dev.jsonl", "micro_f1"),
    "chemprot": DataSet(
        "chemprot",
        "multi-label",
        "chemprot_multilabel/train.jsonl",
        "chemprot_multilabel/dev.jsonl",
        "example_f1",
    ),
    "pneumoniamnist": DataSet(
        "pneumoniamnist",
        "image-classification",
        "pneumoniamnist/pneumoniamnist.npz",
        "pneumoniamnist/pneumoniamnist.npz",
        "macro_f1",
    ),
}


@dataclass(frozen=True)
class Recipe:
    """A bounded training budget for one backbone (the same for every data set it is trained on)."""

    backbone: str
    epochs: int
    max_samples: int | None
    batch_size: int
    learning_rate: float
    head_learning_rate: float = 1e-3
    max_dev_samples: int | None = 300  # the per-epoch dev report during training only


# Chosen so the whole report (13 models) trains and evaluates in about an hour on a shared 2-core CPU with
# OMP_NUM_THREADS=1. MiniLM is pretrained and learns fastest; the *-small models train from scratch.
RECIPES = {
    "minilm": Recipe("minilm", epochs=1, max_samples=1500, batch_size=16, learning_rate=5e-5),
    "albert-small": Recipe("albert-small", epochs=2, max_samples=1200, batch_size=16, learning_rate=5e-4),
    "gpt2-small": Recipe("gpt2-small", epochs=2, max_samples=1200, batch_size=16, learning_rate=5e-4),
    "vit-small": Recipe("vit-small", epochs=5, max_samples=None, batch_size=64, learning_rate=1e-3),
}
TEXT_SETS = ("ade", "ddi", "git", "chemprot")
RUNS = [(backbone, name) for backbone in ("minilm", "albert-small", "gpt2-small") for name in TEXT_SETS] + [
    ("vit-small", "pneumoniamnist")
]


def run_name(backbone: str, dataset: str) -> str:
    return f"{dataset}-{backbone}"


def train_config(
    recipe: Recipe, dataset: DataSet, data_dir: Path, output: Path, skip_invalid: bool = False
) -> TrainConfig:
    return TrainConfig(
        task=dataset.task,
        backbone=recipe.backbone,
        train_path=str(data_dir / dataset.train),
        dev_path=str(data_dir / dataset.dev),
        output=str(output),
        epochs=recipe.epochs,
        max_samples=recipe.max_samples,
        max_dev_samples=recipe.max_dev_samples,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        head_learning_rate=recipe.head_learning_rate,
        skip_invalid=skip_invalid,
    )


def train_command(config: TrainConfig) -> str:
    """The `epee train` command line that runs the same training as `config`."""
    words = ["epee", "train", "--task", config.task, "--backbone", config.backbone]
    words += ["--train", config.train_path, "--dev", config.dev_path, "--output", config.output]
    words += ["--epochs", str(config.epochs), "--batch-size", str(config.batch_size)]
    words += ["--lr", f"{config.learning_rate:g}", "--head-lr", f"{config.head_learning_rate:g}"]
    if config.max_samples is not None:
        words += ["--max-samples", str(config.max_samples)]
    if config.max_dev_samples is not None:
        words += ["--max-dev-samples", str(config.max_dev_samples)]
    if config.skip_invalid:
        words += ["--skip-invalid"]
    return shlex.join(words)


def is_trained(model_dir: Path, recipe: Recipe) -> bool:
    """A finished model directory trained with this recipe (train() writes epee.yaml last)."""
    if not (model_dir / SPEC_FILE).is_file():
        return False
    record = ModelSpec.load(model_dir / SPEC_FILE).training
    return (
        record.get("epochs") == recipe.epochs
        and record.get("batch_size") == recipe.batch_size
        and record.get("learning_rate") == recipe.learning_rate
        and record.get("head_learning_rate") == recipe.head_learning_rate
        and (recipe.max_samples is None or record.get("train_samples", 0) <= recipe.max_samples)
    )


def dev_rows(
    dataset: DataSet,
    data_dir: Path,
    max_rows: int | None,
    skip_invalid: bool = False,
    labels: list[str] | None = None,
) -> tuple[list, int, dict[str, int]]:
    """The usable dev/val examples, or a fixed random sample of `max_rows` of them (some files are sorted by
    label, so the first rows would not do); also the number of usable rows and the skipped rows per reason
    (unusable rows, e.g. labels not in `labels`, are an error unless `skip_invalid`)."""
    data = read_task_examples(
        data_dir / dataset.dev, dataset.task, "eval", skip_invalid=skip_invalid, labels=labels
    )
    examples = data.examples
    if max_rows is None or len(examples) <= max_rows:
        return examples, len(examples), data.skipped_rows
    return random.Random(EVAL_SEED).sample(examples, max_rows), len(examples), data.skipped_rows


def evaluate_run(
    model_dir: Path,
    dataset: DataSet,
    data_dir: Path,
    batch_size: int,
    max_rows: int | None,
    skip_invalid: bool = False,
) -> dict:
    """Every policy (default parameters) on the dev/val split at `batch_size`, side by side."""
    model = EarlyExitModel.from_pretrained(model_dir)
    examples, split_size, skipped = dev_rows(dataset, data_dir, max_rows, skip_invalid, model.spec.labels)
    policies = [make_policy(name) for name in POLICIES]
    results = evaluate_policies(model, examples, policies, batch_size)
    return {
        "max_eval_rows": max_rows,
        "split_size": split_size,
        "num_layers": model.num_layers,
        "num_samples": len(examples),
        "skipped_rows": skipped,
        "results": {result["policy"]: result for result in results},
    }


def run_one(backbone: str, dataset_name: str, args: argparse.Namespace) -> dict:
    """Train (unless done) and evaluate (unless cached) one backbone on one data set."""
    recipe, dataset = RECIPES[backbone], DATASETS[dataset_name]
    data_dir, model_dir = Path(args.data), Path(args.models) / run_name(backbone, dataset_name)
    config = train_config(recipe, dataset, data_dir, model_dir, args.skip_invalid)
    retrained = not is_trained(model_dir, recipe)
    if retrained:
        log(f"train {run_name(backbone, dataset_name)}: {train_command(config)}")
        train(config)
    evaluation_path = model_dir / EVALUATION_FILE
    evaluation = None
    if evaluation_path.is_file() and not args.reevaluate and not retrained:
        evaluation = json.loads(evaluation_path.read_text(encoding="utf-8"))
        if (evaluation.get("max_eval_rows"), evaluation["results"]["full"]["batch_size"]) != (
            args.max_eval_rows,
            args.batch_size,
        ):
            evaluation = None  # measured with other settings
    if evaluation is None:
        log(f"evaluate {run_name(backbone, dataset_name)}")
        evaluation = evaluate_run(
            model_dir, dataset, data_dir, args.batch_size, args.max_eval_rows, args.skip_invalid
        )
        evaluation_path.write_text(json.dumps(evaluation, indent=2), encoding="utf-8")
    return {
        "backbone": backbone,
        "dataset": dataset_name,
        "task": dataset.task,
        "f1_key": dataset.f1_key,
        "recipe": asdict(recipe),
        "command": train_command(config),
        **evaluation,
        **training_record(model_dir),
    }


def training_record(model_dir: Path) -> dict:
    """What `epee.yaml` says about the training run: rows used, rows skipped, seconds."""
    record = ModelSpec.load(model_dir / SPEC_FILE).training
    skipped = record.get("skipped_rows", {}).get("train", 0)  # per reason, or (older records) a count
    return {
        "train_samples": record.get("train_samples"),
        "skipped_train_rows": sum(skipped.values()) if isinstance(skipped, dict) else skipped,
        "train_seconds": record.get("train_seconds"),
    }


# --- notes derived from the numbers ----------------------------------------------------------------------------


def verdict(run: dict, policy: str = "epee") -> str:
    """'improves', 'matches' or 'loses': the policy's task F1 against full depth, with SAME_F1_MARGIN."""
    key = run["f1_key"]
    delta = run["results"][policy][key] - run["results"]["full"][key]
    if delta > SAME_F1_MARGIN:
        return "improves"
    return "matches" if delta >= -SAME_F1_MARGIN else "loses"


def early_exit_share(result: dict) -> float:
    """Share of samples a policy stopped before the last layer."""
    counts = result["exit_layer_counts"]
    return 1 - counts[-1] / sum(counts)


def overthinking_note(run: dict) -> str:
    """A few sentences per run: does EPEE improve on, match or fall short of full depth, how often it stops
    early, how much overthinking there is to remove, and which early-exit rule does best."""
    results, key, layers = run["results"], run["f1_key"], run["num_layers"]
    full, epee, oracle = results["full"], results["epee"], results["oracle"]
    scores = f"{key} {full[key]:.3f} → {epee[key]:.3f}"
    depth = f"{epee['avg_exit_layer']:.2f} of {layers} layers"
    sentence = {
        "improves": f"EPEE **improves** on full depth ({scores}) at {depth}",
        "matches": f"EPEE matches full depth ({scores}) at {depth}",
        "loses": f"EPEE **loses** {full[key] - epee[key]:.3f} {key} against full depth at {depth}",
    }[verdict(run)]
    early_share = early_exit_share(epee)
    speed = epee["samples_per_second"] / full["samples_per_second"]
    overthought = oracle["accuracy"] - full["accuracy"]
    best = max(EARLY_EXIT_POLICIES, key=lambda name: (results[name][key], -results[name]["avg_exit_layer"]))
    best_text = f"{best} ({results[best][key]:.3f} at {results[best]['avg_exit_layer']:.2f} layers)"
    if best != "epee" and verdict(run, best) == "improves":
        best_text += ", above full depth"
    return (
        f"{sentence}, stopping before the last layer for {early_share:.0%} of samples "
        f"(τ = {epee['params']['entropy_threshold']}); {speed:.2f}× the samples/s of full at batch 8. "
        f"{overthought:.1%} of samples are right at some earlier exit but wrong at the last (oracle − full "
        f"accuracy). Best early-exit {key}: {best_text}."
    )


def summary_notes(runs: list[dict]) -> list[str]:
    """Counts across runs: where EPEE is above, level with or below full depth."""
    groups: dict[str, list[str]] = {"improves": [], "matches": [], "loses": []}
    for run in runs:
        groups[verdict(run)].append(f"{run['backbone']}/{run['dataset']}")
    improves, matches, loses = groups["improves"], groups["matches"], groups["loses"]
    others_above = [
        f"{run['backbone']}/{run['dataset']} ({', '.join(names)})"
        for run in runs
        if verdict(run) != "improves"
        and (names := [name for name in EARLY_EXIT_POLICIES if verdict(run, name) == "improves"])
    ]
    overthinking = [
        f"{run['backbone']}/{run['dataset']}"
        for run in runs
        if run["results"]["oracle"]["accuracy"] - run["results"]["full"]["accuracy"] >= 0.05
    ]
    rarely_early = [
        f"{run['backbone']}/{run['dataset']}"
        for run in runs
        if early_exit_share(run["results"]["epee"]) < 0.1
    ]
    return [
        f"EPEE above full depth (by more than {SAME_F1_MARGIN} F1, i.e. overthinking that early exit removes): "
        f"{', '.join(improves) or 'none'}.",
        f"EPEE level with full depth (within ±{SAME_F1_MARGIN} F1): {', '.join(matches) or 'none'}.",
        f"EPEE below full depth: {', '.join(loses) or 'none'}.",
        "At least 5 % of samples overthought (right at an earlier exit, wrong at the last): "
        f"{', '.join(overthinking) or 'none'}.",
        f"Another early-exit rule above full depth where EPEE is not: {', '.join(others_above) or 'none'}.",
        "EPEE stops early for fewer than 10 % of samples (its exits are rarely confident enough at the default "
        f"threshold; `epee calibrate` picks one per model): {', '.join(rarely_early) or 'none'}.",
    ]


# --- rendering -------------------------------------------------------------------------------------------------


def table_rows(run: dict) -> list[str]:
    key, layers = run["f1_key"], run["num_layers"]
    rows = []
    for index, name in enumerate(POLICIES):
        result = run["results"][name]
        speed = f"{result['samples_per_second']:.1f}" if name in TIMED_POLICIES else ""
        first = index == 0
        cells = [
            run["backbone"] if first else "",
            f"{run['dataset']} ({run['num_samples']} of {run['split_size']})" if first else "",
            key if first else "",
            name,
            f"{result['accuracy']:.3f}",
            f"{result[key]:.3f}",
            f"{result['avg_exit_layer']:.2f} / {layers}",
            speed,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def train_rows(run: dict) -> str:
    skipped = run["skipped_train_rows"]
    note = f" ({skipped} skipped: entities nest, cannot be marked)" if skipped else ""
    return f"{run['train_samples']}{note}"


def policy_settings() -> str:
    return "; ".join(make_policy(name).describe() for name in POLICIES)


def render_markdown(report: dict) -> str:
    runs = report["runs"]
    rows_used = "every row"
    if report["max_eval_rows"]:
        rows_used = f"every row, or a fixed random sample of {report['max_eval_rows']} rows, seed {EVAL_SEED}"
    lines = [
        "# Results: early exit on the real data sets",
        "",
        f"Generated by `{report['command']}` on {report['generated']} "
        f"({report['torch_threads']} torch thread(s)); do not edit by hand. Raw numbers: `results.json`.",
        "",
        f"Measured on the dev split (PneumoniaMNIST: val) of each set in ../shared/data ({rows_used}). Models are "
        "trained on a bounded budget (recipes below and in `docs/training.md`), so absolute scores are below "
        "published ones; the comparison between policies on the same model is the point. Policies run with "
        f"their default parameters: {policy_settings()}. F1 is the task's: macro-F1 (ADE, PneumoniaMNIST), "
        "micro-F1 without the negative class (DDI, GIT), example-F1 (ChemProt multi-label, where accuracy is "
        "exact set match). samples/s: engine time at batch 8, policies taking turns batch by batch. DDI's "
        "training file lists its related pairs first, so the first rows the recipes train on are mostly related "
        "pairs while its dev split is 82 % `None`: DDI accuracy is low, read its micro-F1.",
        "",
        "| backbone | data (dev rows) | F1 | policy | accuracy | F1 | avg exit layer | samples/s (b=8) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines += table_rows(run)
    lines += ["", '## Where EPEE improves on full depth ("overthinking") and where it does not', ""]
    lines += [f"- {note}" for note in summary_notes(runs)]
    lines += [""]
    lines += [f"- **{run['backbone']} / {run['dataset']}**: {overthinking_note(run)}" for run in runs]
    lines += ["", "## Training recipes", ""]
    lines += [
        "| backbone | data | train rows | epochs | train seconds |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['backbone']} | {run['dataset']} | {train_rows(run)} | {run['recipe']['epochs']} | "
            f"{run['train_seconds']} |"
        )
    lines += ["", "Exact commands:", "", "```"]
    lines += [run["command"] for run in runs]
    lines += ["```", ""]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m epee_core.measure.results",
        description="Train and evaluate every backbone × data set on a bounded budget; write docs/results.md.",
    )
    parser.add_argument("--data", default="../shared/data", help="folder holding ade/, ddi/, git/, …")
    parser.add_argument(
        "--models", default="models/results", help="where trained models are kept (resumable)"
    )
    parser.add_argument(
        "--output", default="docs/results.md", help="Markdown report; the JSON goes next to it"
    )
    parser.add_argument(
        "--only", help="comma-separated runs such as minilm/ade,vit-small/pneumoniamnist (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    parser.add_argument(
        "--max-eval-rows",
        type=int,
        default=1000,
        help="evaluate on a fixed random sample of this many dev rows (default 1000; 0 = every row)",
    )
    parser.add_argument(
        "--reevaluate", action="store_true", help="evaluate again even if evaluation.json exists"
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave unusable data rows out (counted per reason) instead of stopping at the first",
    )
    parser.add_argument("--commands", action="store_true", help="print the epee train commands and stop")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return parser


def selected_runs(only: str | None) -> list[tuple[str, str]]:
    if not only:
        return list(RUNS)
    wanted = [tuple(item.strip().split("/", 1)) for item in only.split(",") if item.strip()]
    unknown = [f"{'/'.join(item)}" for item in wanted if item not in RUNS]
    if unknown:
        known = ", ".join(f"{backbone}/{name}" for backbone, name in RUNS)
        raise SystemExit(f"--only: unknown run {unknown[0]} (known: {known})")
    return [run for run in RUNS if run in wanted]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.max_eval_rows = args.max_eval_rows or None
    runs = selected_runs(args.only)
    if args.commands:
        for backbone, name in runs:
            model_dir = Path(args.models) / run_name(backbone, name)
            config = train_config(
                RECIPES[backbone], DATASETS[name], Path(args.data), model_dir, args.skip_invalid
            )
            print(train_command(config))
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    results = [run_one(backbone, name, args) for backbone, name in runs]
    report = {
        "command": shlex.join(["python", "-m", "epee_core.measure.results", *(argv or sys.argv[1:])]),
        "generated": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "max_eval_rows": args.max_eval_rows,
        "policies": {name: make_policy(name).params for name in POLICIES},
        "runs": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_markdown(report), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    log(f"wrote {output} and {output.with_suffix('.json')} in {time.perf_counter() - started:.0f} s")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
