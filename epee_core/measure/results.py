"""The results report (docs/results.md): every backbone × data set trained on its whole training split with the
backbone's default recipe, given a certified early-exit policy, and measured on rows it has never seen.

    epee report results --data DATA --skip-invalid

Each run (`run_one`):
1. **train**: `epee train` with the recipe defaults on every usable training row (ADE: one epoch of 20,411 rows);
2. **split**: the dev split (PneumoniaMNIST: val) is cut into two label-stratified halves (seed 0), written into
   the model directory's `report/` folder: `calibration.*` and `heldout.*`. Each data set's own test split is
   kept back by its provider, so the held-out half stands in for it;
3. **calibrate**: `epee calibrate` on the calibration half with its default guarantee (accuracy drop vs full
   depth at most 1 point with probability at least 90 %), float32 and int8, and once more without a
   certificate (`--guarantee none`, same budget);
4. **measure** on the held-out half, contestants taking turns batch by batch: the stock Hugging Face forward
   (`hf`), full depth, the certified and the uncertified policy and the oracle, then int8 full depth and int8 +
   its certified policy beside float32 `hf` again. Accuracy and task F1 get 95 % bootstrap intervals, and every
   row its paired difference to full depth.

Resumable: a model directory whose `epee.yaml` records the same recipe on the whole training split is not
retrained; calibration reuses its logit caches; the measurement is read back from `report/measurement.json`
unless its settings changed or `--remeasure`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from ..calibration import CalibrationJob, CalibrationOptions, ServingOptions, run_calibration
from ..data.catalogue import DATASETS, DataSet
from ..data.splits import SPLIT_SEED, halves_paths, write_dev_halves
from ..data.text import label_tensor, read_task_examples
from ..engine.model import SPEC_FILE, EarlyExitModel
from ..engine.policies import Policy, make_policy
from ..engine.quantize import int8_kernel
from ..engine.spec import ConfigError, ModelSpec
from ..evaluation.evaluate import evaluate_policies
from ..evaluation.metrics import bootstrap_intervals, task_f1
from ..serving.config import ServeConfig
from ..training.trainer import RECIPE_FIELDS, TrainConfig, train

REPORT_DIR = "report"  # inside the model directory: a sub-folder, so calibration caches still match the model
MEASUREMENT_FILE = "measurement.json"
# The calibrations of a run: (row key, --quantize, --guarantee). The uncertified one shows what a 1-point budget
# without a certificate would pick where the calibration half is too small to certify anything.
CALIBRATIONS = (
    ("certified", "none", "accuracy"),
    ("int8_certified", "int8", "accuracy"),
    ("uncertified", "none", "none"),
)
MAX_DEV_SAMPLES = 300  # the per-epoch dev report printed while training only
# Rows of the report's table per run, in order: (key, label).
ROWS = (
    ("hf", "hf (stock forward)"),
    ("full", "full depth"),
    ("certified", "certified"),
    ("uncertified", "calibrated, no certificate"),
    ("int8_full", "int8 full depth"),
    ("int8_certified", "int8 + certified"),
    ("oracle", "oracle"),
)


TEXT_SETS = ("ade", "ddi", "git", "chemprot")
RUNS = [(backbone, name) for backbone in ("minilm", "albert-small", "gpt2-small") for name in TEXT_SETS] + [
    ("vit-small", "pneumoniamnist")
]


def run_name(backbone: str, dataset: str) -> str:
    return f"{dataset}-{backbone}"


# --- the commands a run is made of ----------------------------------------------------------------------------


def train_config(
    backbone: str,
    dataset: DataSet,
    data_dir: Path,
    output: Path,
    skip_invalid: bool = False,
    threads: int | None = None,
) -> TrainConfig:
    """`epee train` with the backbone's recipe on the whole training split (only the epochs of a large set and
    the length of the per-epoch dev report are set here)."""
    return TrainConfig(
        task=dataset.task,
        backbone=backbone,
        train_path=str(data_dir / dataset.train),
        dev_path=str(data_dir / dataset.dev),
        output=str(output),
        epochs=dataset.epochs,
        max_dev_samples=MAX_DEV_SAMPLES,
        skip_invalid=skip_invalid,
        threads=threads,
    )


def train_command(config: TrainConfig) -> str:
    """The `epee train` command line that runs the same training as `config`."""
    words = ["epee", "train", "--task", config.task, "--backbone", config.backbone]
    words += ["--train", config.train_path, "--dev", config.dev_path, "--output", config.output]
    if config.epochs is not None:
        words += ["--epochs", str(config.epochs)]
    words += ["--max-dev-samples", str(config.max_dev_samples)]
    if config.threads is not None:
        words += ["--threads", str(config.threads)]
    if config.skip_invalid:
        words += ["--skip-invalid"]
    return shlex.join(words)


def calibration_job(
    model_dir: Path, data_path: Path, quantize: str, guarantee: str, skip_invalid: bool
) -> CalibrationJob:
    """`epee calibrate` on the calibration half, float32 or int8, with its default guarantee (or none); it
    writes into the model's report folder, and the float32 calibrations share one logit cache."""
    stem = "certified" if guarantee != "none" else "uncertified"
    stem += "" if quantize == "none" else f"-{quantize}"
    cache = "logits" if quantize == "none" else f"logits-{quantize}"
    return CalibrationJob(
        model_dir=str(model_dir),
        data_path=str(data_path),
        output=str(model_dir / REPORT_DIR / f"{stem}.yaml"),
        cache_path=str(model_dir / REPORT_DIR / f"{cache}.cache.safetensors"),
        skip_invalid=skip_invalid,
        serving=ServingOptions(quantize=quantize),
        options=CalibrationOptions(
            guarantee=guarantee, held_back_fraction=0.3 if guarantee == "none" else 0.6
        ),
    )


def calibrate_command(job: CalibrationJob) -> str:
    """The `epee calibrate` command line that runs `job`."""
    words = ["epee", "calibrate", "--model", job.model_dir, "--data", job.data_path, "--output", job.output]
    words += ["--cache", job.cache_path]
    if job.serving.quantize != "none":
        words += ["--quantize", job.serving.quantize]
    elif (
        job.serving.runtime == "torch"
    ):  # the report times torch layers; `epee calibrate` defaults to onnxruntime
        words += ["--runtime", "torch"]
    if job.options.guarantee != "accuracy":
        words += ["--guarantee", job.options.guarantee]
    if job.skip_invalid:
        words += ["--skip-invalid"]
    return shlex.join(words)


def is_trained(model_dir: Path, config: TrainConfig) -> bool:
    """A finished model directory (train() writes epee.yaml last) trained on the whole training split with the
    recipe `config` resolves to."""
    if not (model_dir / SPEC_FILE).is_file():
        return False
    record = ModelSpec.load(model_dir / SPEC_FILE).training
    resolved, _ = config.with_recipe()
    same_recipe = all(record.get(key) == getattr(resolved, key) for key in RECIPE_FIELDS)
    return same_recipe and record.get("max_samples", "absent") is None


# --- certify and measure ----------------------------------------------------------------------------------------


def certified_policy(report: dict) -> Policy:
    """The policy a calibration report's model YAML serves."""
    return ServeConfig.from_section(report["model_yaml"]["epee"]).policy


def certificate_summary(report: dict, seconds: float) -> dict:
    certificate = report.get("certificate") or {}
    guarantee = report["model_yaml"]["epee"].get("guarantee")
    return {
        "policy": certified_policy(report).describe(),
        "certified": bool(certificate.get("certified")),
        "bound": guarantee.get("bound") if guarantee else None,
        "test_rows": guarantee.get("n") if guarantee else None,
        "reason": report["reason"],
        "calibration_rows": report["num_samples"],
        "skipped_rows": report["skipped_rows"],
        "seconds": round(seconds, 1),
    }


def _row(result: dict, key: str) -> dict:
    kept = ("accuracy", key, "avg_exit_layer", "layer_speedup", "samples_per_second", "speedup_vs_hf")
    return {"policy": result["policy"], "params": result["params"], **{name: result[name] for name in kept}}


def measure(
    model_dir: Path,
    dataset: DataSet,
    heldout: Path,
    policies: dict[str, Policy],
    batch_size: int,
    resamples: int,
    skip_invalid: bool,
) -> dict:
    """The report's rows on the held-out half: a float32 run (hf, full, certified, uncertified, oracle) and an int8
    run (full, certified, with float32 hf beside them), each timed side by side; bootstrap intervals over all."""
    model, f1_key = EarlyExitModel.from_pretrained(model_dir), task_f1(dataset.task)
    data = read_task_examples(
        heldout, dataset.task, "eval", skip_invalid=skip_invalid, labels=model.spec.labels, notify=log
    )
    runs = {
        "float32": (
            model,
            {
                "full": make_policy("full"),
                "certified": policies["certified"],
                "uncertified": policies["uncertified"],
                "oracle": make_policy("oracle"),
            },
        ),
        "int8": (
            EarlyExitModel.from_pretrained(model_dir, quantize="int8"),
            {"int8_full": make_policy("full"), "int8_certified": policies["int8_certified"]},
        ),
    }
    rows, predicted = {}, {}
    for name, (engine, contestants) in runs.items():
        log(f"measure {model_dir.name} ({name}) on {len(data.examples)} held-out rows")
        results = evaluate_policies(
            engine, data.examples, list(contestants.values()), batch_size, model, keep_predictions=True
        )
        keys = [*contestants, "hf" if name == "float32" else "int8_hf"]
        for key, result in zip(keys, results):
            predicted[key] = result.pop("predicted")
            rows[key] = _row(result, f1_key)
    del predicted["int8_hf"]  # the same forward as hf
    gold = label_tensor(data.examples, model.spec.labels, dataset.task).numpy()
    metric_keys = ("accuracy", f1_key)
    intervals = bootstrap_intervals(
        dataset.task,
        gold,
        predicted,
        model.spec.labels,
        model.spec.negative_label,
        metric_keys,
        reference="full",
        resamples=resamples,
    )
    for key, bounds in intervals.items():
        rows[key]["intervals"] = bounds
    return {
        "heldout_rows": len(data.examples),
        "skipped_rows": data.skipped_rows,
        "num_layers": model.num_layers,
        "rows": {key: rows[key] for key, _ in ROWS},
        "int8_hf": rows["int8_hf"],
    }


def measurement_settings(args: argparse.Namespace) -> dict:
    """What a stored measurement must have been taken with to be reused (its rows too)."""
    rows = [key for key, _ in ROWS]
    return {"batch_size": args.batch_size, "resamples": args.resamples, "threads": args.threads, "rows": rows}


def run_one(backbone: str, dataset_name: str, args: argparse.Namespace) -> dict | None:
    """Train (unless done), certify and measure (unless measured) one backbone on one data set; None when the
    model is not trained and `--skip-untrained` is set."""
    dataset = DATASETS[dataset_name]
    data_dir, model_dir = Path(args.data), Path(args.models) / run_name(backbone, dataset_name)
    config = train_config(backbone, dataset, data_dir, model_dir, args.skip_invalid, args.threads)
    trained = is_trained(model_dir, config)
    if not trained and args.skip_untrained:
        log(f"skip {run_name(backbone, dataset_name)}: not trained")
        return None
    if not trained:
        log(f"train {run_name(backbone, dataset_name)}: {train_command(config)}")
        train(config)
    measurement_path = model_dir / REPORT_DIR / MEASUREMENT_FILE
    measurement = None
    if measurement_path.is_file() and trained and not args.remeasure:
        measurement = json.loads(measurement_path.read_text(encoding="utf-8"))
        if measurement.get("settings") != measurement_settings(args):
            measurement = None
    if measurement is None:
        measurement = certify_and_measure(model_dir, dataset, data_dir, args)
        measurement_path.write_text(json.dumps(measurement, indent=2), encoding="utf-8")
    calibration, heldout = halves_paths(dataset, model_dir / REPORT_DIR)
    jobs = [
        calibration_job(model_dir, calibration, quantize, guarantee, args.skip_invalid)
        for _, quantize, guarantee in CALIBRATIONS
    ]
    return {
        "backbone": backbone,
        "dataset": dataset_name,
        "task": dataset.task,
        "f1_key": task_f1(dataset.task),
        "commands": [train_command(config), *map(calibrate_command, jobs)],
        **measurement,
        # this run's files, also when its measurement was read back from a model directory copied from elsewhere
        "calibration_data": str(calibration),
        "heldout_data": str(heldout),
        **training_record(model_dir),
    }


def certify_and_measure(model_dir: Path, dataset: DataSet, data_dir: Path, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    (model_dir / REPORT_DIR).mkdir(exist_ok=True)
    calibration, heldout = write_dev_halves(dataset, data_dir, model_dir / REPORT_DIR)
    certificates, policies = {}, {}
    for key, quantize, guarantee in CALIBRATIONS:
        job = calibration_job(model_dir, calibration, quantize, guarantee, args.skip_invalid)
        log(f"certify {model_dir.name}: {calibrate_command(job)}")
        step = time.perf_counter()
        report = run_calibration(job, notify=log)
        certificates[key] = certificate_summary(report, time.perf_counter() - step)
        policies[key] = certified_policy(report)
    measured = measure(
        model_dir, dataset, heldout, policies, args.batch_size, args.resamples, args.skip_invalid
    )
    return {
        "settings": measurement_settings(args),
        "certificates": certificates,
        **measured,
        "measure_seconds": round(time.perf_counter() - started, 1),
        "measured": time.strftime("%Y-%m-%d"),
        "machine": machine(),
    }


def machine() -> str:
    """The CPU a measurement ran on, as the report names it: model name and the int8 kernel it gets
    (`fbgemm` means no VNNI, where int8 gains least; docs/int8.md)."""
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
            if line.startswith("model name")
        ]
    except OSError:
        names = []
    return f"{names[0] if names else 'unknown CPU'} ({len(names) or '?'} cores), int8 kernel {int8_kernel()}"


def training_record(model_dir: Path) -> dict:
    """What `epee.yaml` says about the training run: rows used, rows skipped, epochs, seconds."""
    record = ModelSpec.load(model_dir / SPEC_FILE).training
    skipped = record.get("skipped_rows", {}).get("train", {})
    return {
        "train_samples": record.get("train_samples"),
        "skipped_train_rows": skipped,
        "epochs": record.get("epochs"),
        "train_seconds": record.get("train_seconds"),
        "train_samples_per_second": record.get("train_samples_per_second"),
    }


# --- notes derived from the numbers ----------------------------------------------------------------------------


def interval_text(bounds: list[float], scale: float = 1.0, signed: bool = False) -> str:
    low, high = (value * scale for value in bounds)
    sign = "+" if signed else ""
    return f"[{low:{sign}.3f}, {high:{sign}.3f}]" if scale == 1 else f"[{low:{sign}.1f}, {high:{sign}.1f}]"


def accuracy_delta(run: dict, key: str) -> float:
    """Accuracy of a row minus full depth's, on the held-out half (negative: a drop)."""
    rows = run["rows"]
    return rows[key]["accuracy"] - rows["full"]["accuracy"]


# With no loss on any test row, a drop ≤ ε is certified at risk δ once (1 − ε)^n ≤ δ.
MIN_TEST_ROWS = math.ceil(math.log(0.1) / math.log(1 - 0.01))


def held_out_note(runs: list[dict], key: str, what: str) -> str:
    """How often the `key` row stayed within 1 point of full depth on the held-out half, and how deep it ran."""
    within = [run for run in runs if accuracy_delta(run, key) >= -0.01]
    beyond = [
        f"{run['backbone']}/{run['dataset']} ({accuracy_delta(run, key) * 100:+.1f} pt)"
        for run in runs
        if accuracy_delta(run, key) < -0.01
    ]
    fewer = [
        f"{run['backbone']}/{run['dataset']} ({run['rows'][key]['layer_speedup']:.2f}×)"
        for run in runs
        if run["rows"][key]["layer_speedup"] >= 1.3
    ]
    return (
        f"{what}: within 1 point of full-depth accuracy on the held-out half for {len(within)} of {len(runs)} "
        f"runs, beyond it for {', '.join(beyond) or 'none'}; at least 1.3× fewer layers than full depth: "
        f"{', '.join(fewer) or 'none'}."
    )


def f1_note(runs: list[dict]) -> str:
    """Where the certified policy's task F1 fell by more than a point on the held-out half (with the paired
    interval of that change)."""
    fell, skewed = [], False
    for run in runs:
        rows, key = run["rows"], run["f1_key"]
        drop = rows["certified"][key] - rows["full"][key]
        if drop < -0.01:
            bounds = interval_text(rows["certified"]["intervals"][f"delta_{key}"], 100, True)
            fell.append(f"{run['backbone']}/{run['dataset']} ({key} {drop * 100:+.1f} pt {bounds})")
            skewed = skewed or run["dataset"] == "ddi"
    note = (
        "The certificate bounds the accuracy drop, not F1 (F1 is not a mean over rows, so no row-wise test "
        f"bounds it). Certified policies whose task F1 fell by more than 1 point: {', '.join(fell) or 'none'}."
    )
    if skewed:
        note += (
            " DDI's micro-F1 counts only its related pairs, 18 % of the rows, so it moves more than accuracy when "
            "an early exit changes a few of them."
        )
    return note


def names(runs: list[dict]) -> list[str]:
    return [f"{run['backbone']}/{run['dataset']}" for run in runs]


def summary_notes(runs: list[dict]) -> list[str]:
    """Counts across runs: certificates issued, the budget kept on held-out rows, the depth saved."""
    uncertified = [run for run in runs if not run["certificates"]["certified"]["certified"]]
    too_few = [
        run
        for run in uncertified
        if run["certificates"]["certified"]["calibration_rows"] * 0.6 < MIN_TEST_ROWS
    ]
    return [
        f"A policy other than full depth was certified (1-point accuracy budget, risk 0.1) for "
        f"{len(runs) - len(uncertified)} of {len(runs)} runs; where nothing could be certified the model "
        f"serves full depth: {', '.join(names(uncertified)) or 'none'}.",
        f"Even with no error at all, certifying a 1-point drop at risk 0.1 takes {MIN_TEST_ROWS} test rows, i.e. "
        f"a calibration half of {math.ceil(MIN_TEST_ROWS / 0.6)} rows (60 % of it tests): too small here: "
        f"{', '.join(names(too_few)) or 'none'}. Calibrate those on more labelled rows, or accept the uncertified row.",
        held_out_note(runs, "certified", "Certified policy (float32)")
        + " The guarantee allows a larger drop for 10 % of calibration draws, and a point estimate on a few "
        "hundred rows carries its own sampling error (see the intervals).",
        f1_note(runs),
        held_out_note(runs, "int8_certified", "int8 + certified policy"),
        held_out_note(runs, "uncertified", "Calibrated without a certificate (same 1-point budget)"),
    ]


# --- rendering -------------------------------------------------------------------------------------------------


def table_rows(run: dict) -> list[str]:
    key, layers, rows = run["f1_key"], run["num_layers"], run["rows"]
    lines = []
    for index, (name, label) in enumerate(ROWS):
        row = rows[name]
        bounds = row["intervals"]
        setting = label
        if name in ("certified", "uncertified", "int8_certified"):
            setting = f"{label}: {make_policy(row['policy'], row['params']).describe()}"
        delta = bounds.get("delta_accuracy")
        cells = [
            run["backbone"] if index == 0 else "",
            f"{run['dataset']} ({run['heldout_rows']})" if index == 0 else "",
            setting,
            f"{row['accuracy']:.3f} {interval_text(bounds['accuracy'])}",
            f"{row[key]:.3f} {interval_text(bounds[key])}",
            "–"
            if name == "full" or delta is None
            else f"{(row['accuracy'] - rows['full']['accuracy']) * 100:+.1f} {interval_text(delta, 100, True)}",
            f"{row['avg_exit_layer']:.2f} / {layers}",
            f"{row['samples_per_second']:.1f}",
            "–" if name == "oracle" else f"{row['speedup_vs_hf']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def certificate_line(run: dict) -> str:
    parts = []
    for key, label in (("certified", "float32"), ("int8_certified", "int8")):
        entry = run["certificates"][key]
        if entry["certified"]:
            parts.append(
                f"{label}: {entry['policy']}, drop ≤ 0.01 certified (upper bound {entry['bound']:.4f} on "
                f"{entry['test_rows']} test rows)"
            )
        else:
            parts.append(f"{label}: nothing certified, serves {entry['policy']} ({entry['reason']})")
    return (
        f"- **{run['backbone']} / {run['dataset']}** ({run['certificates']['certified']['calibration_rows']} "
        f"calibration rows): " + "; ".join(parts) + "."
    )


def published_rows(runs: list[dict]) -> list[str]:
    lines = [
        "| data | published model | metric | published | split | source | ours: best full depth, held-out half "
        "[95 % CI] | ours − published |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, dataset in DATASETS.items():
        ours = [run for run in runs if run["dataset"] == name]
        for entry in dataset.published:
            best = max(ours, key=lambda run: run["rows"]["full"][entry.metric], default=None)
            mine, gap = "not measured", "–"
            if best is not None:
                full = best["rows"]["full"]
                mine = f"{full[entry.metric]:.3f} {interval_text(full['intervals'][entry.metric])} ({best['backbone']})"
                gap = f"{(full[entry.metric] - entry.value) * 100:+.1f} pt"
            lines.append(
                f"| {name} | {entry.model} | {entry.metric} | {entry.value:.3f} | {entry.split} | {entry.source} | "
                f"{mine} | {gap} |"
            )
    return lines


def skipped_text(skipped: dict) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in skipped.items()) or "–"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def provenance_lines(report: dict) -> list[str]:
    """When the runs were measured on different days or machines (`--update`), which were measured where: × hf
    compares contestants within one run, never across runs."""
    groups: dict[tuple[str, str], list[str]] = {}
    for run in report["runs"]:
        when = (run.get("measured", report["generated"]), run.get("machine", "machine not recorded"))
        groups.setdefault(when, []).append(f"{run['backbone']}/{run['dataset']}")
    if len(groups) < 2:
        return []
    lines = ["**Measured on different days or machines** (compare × hf within a run, not across runs):", ""]
    lines += [f"- {date}, {where}: {', '.join(names)}" for (date, where), names in sorted(groups.items())]
    return lines + [""]


def render_markdown(report: dict) -> str:
    runs = report["runs"]
    train_seconds = sum(run["train_seconds"] or 0 for run in runs)
    measure_seconds = sum(run["measure_seconds"] for run in runs)
    lines = [
        "# Results: early exit on the real data sets",
        "",
        f"Generated by `{report['command']}` on {report['generated']} ({report['torch_threads']} torch thread(s)); "
        "do not edit by hand. Raw numbers: `results.json`.",
        "",
        "Every model is trained by `epee train` with its backbone's **default recipe** (docs/training.md) on the "
        "**whole training split** of its set in `data/` (ADE: one epoch of 20,411 rows). Each set's own "
        f"test split is kept back by its provider, so the dev split (PneumoniaMNIST: val) is cut into two "
        f"label-stratified halves (seed {SPLIT_SEED}): `epee calibrate` certifies a policy on the first "
        "(accuracy drop vs full depth ≤ 1 point with probability ≥ 90 %, Learn-then-Test; docs/calibration.md), "
        "float32 and int8, and every number below is measured on the second, which neither training nor "
        "calibration saw.",
        "",
        f"Intervals are 95 % percentile bootstrap intervals ({report['resamples']} resamples of the held-out rows); "
        "Δ acc is the paired difference to full depth in accuracy points. F1 is the task's: macro-F1 (ADE, "
        "PneumoniaMNIST), micro-F1 without the negative class (DDI, GIT; GIT has none, so it equals accuracy), "
        "example-F1 (ChemProt multi-label, where accuracy is exact set match). samples/s: engine time at batch "
        f"{report['batch_size']}, contestants taking turns batch by batch; × hf: against the stock Hugging Face "
        "forward over the padded batch (what a stock TorchServe handler runs, float32) timed in the same run.",
        "",
    ]
    lines += provenance_lines(report)
    if report["missing"]:
        lines += [
            "**Not in this report** (not trained when it was generated; the next run trains them): "
            + ", ".join(report["missing"])
            + ".",
            "",
        ]
    lines += [
        "| backbone | data (held-out rows) | setting | accuracy [95 % CI] | F1 [95 % CI] | Δ acc, pt [95 % CI] | "
        "avg exit layer | samples/s | × hf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines += table_rows(run)
    lines += ["", "## What the numbers say", ""]
    lines += [f"- {note}" for note in summary_notes(runs)]
    lines += ["", "## Certificates", ""]
    lines += [certificate_line(run) for run in runs]
    lines += ["", "## Published numbers on the same data sets", ""]
    lines += published_rows(runs)
    lines += [""]
    lines += [
        f"- {name}: not compared: {dataset.not_compared}."
        for name, dataset in DATASETS.items()
        if dataset.not_compared
    ]
    lines += [
        "- Not the same rows: the published scores are on each set's official test split, ours on half of the "
        "dev split (PneumoniaMNIST's test split is 62.5 % pneumonia, val 74 %). BLURB's DDI has 25,296 training "
        "pairs, ours 5,154. Where we are below: the published models are 110 M-parameter domain-pretrained "
        "BERTs (DDI) or CNNs (PneumoniaMNIST); ours are MiniLM (22 M, general-domain, pretrained) or 6-layer "
        "models trained from scratch, on a CPU, in minutes.",
        "",
        "## Training",
        "",
        "| backbone | data | train rows | skipped rows | epochs | train time | train samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        speed = run["train_samples_per_second"]
        lines.append(
            f"| {run['backbone']} | {run['dataset']} | {run['train_samples']} | "
            f"{skipped_text(run['skipped_train_rows'])} | {run['epochs']} | {hours(run['train_seconds'] or 0)} | "
            f"{speed if speed is not None else '–'} |"
        )
    lines += [
        "",
        f"**Regeneration time** on this machine (2 cores, 1 torch thread per job, other jobs running): training "
        f"{hours(train_seconds)} and certification + measurement {hours(measure_seconds)} in all, "
        f"{hours(train_seconds + measure_seconds)} of one core; two `--only` jobs side by side halve the wall "
        "time. The generator is resumable: a rerun reuses trained models, calibration caches and measurements.",
        "",
        "Exact commands (the generator calls the same functions):",
        "",
        "```",
    ]
    for run in runs:
        lines += run["commands"]
    lines += ["```", ""]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def selected_runs(only: str | None) -> list[tuple[str, str]]:
    """The runs `--only` names (`backbone/data set`, comma-separated), in report order; all when None."""
    if not only:
        return list(RUNS)
    wanted = [tuple(item.strip().split("/", 1)) for item in only.split(",") if item.strip()]
    unknown = [f"{'/'.join(item)}" for item in wanted if item not in RUNS]
    if unknown:
        known = ", ".join(f"{backbone}/{name}" for backbone, name in RUNS)
        raise ConfigError(f"--only: unknown run {unknown[0]} (known: {known})")
    return [run for run in RUNS if run in wanted]


def merge_runs(
    kept: dict, measured: dict[tuple[str, str], dict | None]
) -> dict[tuple[str, str], dict | None]:
    """`--update`: the runs of an earlier report `kept`, each replaced by its new measurement where there is one,
    in report order. A kept run without a measurement date gets the earlier report's (`generated`)."""
    merged: dict[tuple[str, str], dict | None] = {}
    for run in kept["runs"]:
        merged[(run["backbone"], run["dataset"])] = {"measured": kept["generated"], **run}
    for key, run in measured.items():
        if run is not None or key not in merged:
            merged[key] = run
    return {key: merged[key] for key in RUNS if key in merged}


def train_commands(args: argparse.Namespace) -> list[str]:
    """The `epee train` command of every selected run."""
    commands = []
    for backbone, name in selected_runs(args.only):
        model_dir = Path(args.models) / run_name(backbone, name)
        config = train_config(
            backbone, DATASETS[name], Path(args.data), model_dir, args.skip_invalid, args.threads
        )
        commands.append(train_command(config))
    return commands


def write_report(args: argparse.Namespace, command: str) -> dict:
    """Train, certify and measure every selected run (resuming what is done), write the Markdown report and the
    JSON next to it; return the report. `command` is the command line the report says generated it."""
    runs = selected_runs(args.only)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    measured = {(backbone, name): run_one(backbone, name, args) for backbone, name in runs}
    output = Path(args.output)
    if args.update and output.with_suffix(".json").is_file():
        kept = json.loads(output.with_suffix(".json").read_text(encoding="utf-8"))
        measured = merge_runs(kept, measured)
    report = {
        "command": command,
        "generated": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "resamples": args.resamples,
        "missing": [f"{backbone}/{name}" for (backbone, name), run in measured.items() if run is None],
        "runs": [run for run in measured.values() if run is not None],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_markdown(report), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    log(f"wrote {output} and {output.with_suffix('.json')} in {time.perf_counter() - started:.0f} s")
    return report
