"""`epee calibrate` end to end: get a fresh logit cache (reuse, or one full-depth pass), time the layers once,
sweep and choose (or certify), then write the model YAML, the JSON report and the Pareto plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..data.rows import json_problem, print_notice
from ..data.text import label_field, read_task_examples
from ..engine.gate import ExitGate
from ..engine.inputs import Example
from ..engine.model import SPEC_FILE, EarlyExitModel
from ..engine.spec import ConfigError, ModelSpec
from ..evaluation.evaluate import prepare_batches
from .cache import LogitCache, StaleCacheError, build_cache, fingerprint, load_fresh
from .model_yaml import ServingOptions, model_yaml, write_model_yaml
from .plot import plot_frontier
from .sweep import CalibrationOptions, CalibrationResult, calibrate, check_metric, describe_guarantee
from .timing import LayerTimes, measure_layer_times, representative_batch


@dataclass
class CalibrationJob:
    """Everything `epee calibrate` was asked to do."""

    model_dir: str
    data_path: str
    output: str  # model YAML to write
    plot: str | None = None
    cache_path: str | None = None
    report_path: str | None = None  # default: the output YAML with suffix `.report.json`
    max_samples: int | None = None
    skip_invalid: bool = False  # leave unusable data rows out instead of stopping at the first
    serving: ServingOptions | None = None
    options: CalibrationOptions | None = None

    @property
    def report_file(self) -> Path:
        return Path(self.report_path) if self.report_path else Path(self.output).with_suffix(".report.json")


def labelled_batches(
    model: EarlyExitModel,
    data_path: str,
    max_samples: int | None,
    batch_size: int,
    skip_invalid: bool = False,
) -> list[tuple[dict, torch.Tensor]]:
    """The dev data as model-ready batches with gold labels (the only task-specific step of calibration): JSONL
    for text tasks; for images a MedMNIST `.npz` (its `test_*` arrays, else `val_*`) or an image folder."""
    data = read_task_examples(
        data_path,
        model.spec.task,
        "eval",
        max_samples,
        skip_invalid=skip_invalid,
        labels=model.spec.labels,
        notify=lambda _: None,  # run_calibration reported the skipped rows
    )
    return prepare_batches(model, data.examples, batch_size)


def read_unlabelled(path: str | Path, task: str, max_samples: int | None) -> list[Example] | None:
    """The examples of a JSONL file none of whose rows has a label field, else None (it is labelled: read it with
    the labelled reader, which also reports rows missing their label)."""
    path, field = Path(path), label_field(task)
    if task == "image-classification" or not path.is_file():
        return None
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number}: {json_problem(error)}") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object")
            if field in record:
                return None
            wanted = ("text", "head", "tail") if task == "relation-extraction" else ("text",)
            for name in wanted:
                if not isinstance(record.get(name), str):
                    raise ConfigError(f"{path}:{number}: field '{name}' must be a string (task {task})")
            examples.append(Example(record["text"], head=record.get("head"), tail=record.get("tail")))
            if max_samples is not None and len(examples) >= max_samples:
                break
    if not examples:
        raise ConfigError(f"{path}: no examples")
    return examples


def dev_batches(
    model: EarlyExitModel,
    data_path: str,
    max_samples: int | None,
    batch_size: int,
    allow_unlabelled: bool = False,
    skip_invalid: bool = False,
) -> tuple[list[tuple[dict, torch.Tensor]], bool]:
    """The dev data as model-ready batches and whether it is labelled. A JSONL file with no label on any row is
    read only when `allow_unlabelled` (its batches carry placeholder labels 0)."""
    task = model.spec.task
    unlabelled = read_unlabelled(data_path, task, max_samples)
    if unlabelled is None:
        return labelled_batches(model, data_path, max_samples, batch_size, skip_invalid), True
    if not allow_unlabelled:
        raise ConfigError(
            f"{data_path}: no row has a '{label_field(task)}' field: calibrating on data without "
            f"labels needs --guarantee consistency"
        )
    width = len(model.spec.labels)
    batches = []
    for start in range(0, len(unlabelled), batch_size):
        chunk = unlabelled[start : start + batch_size]
        placeholder = torch.zeros(len(chunk), width) if model.multi_label else torch.zeros(len(chunk)).long()
        batches.append((model.encode_examples(chunk), placeholder))
    return batches, False


def fresh_cache(
    job: CalibrationJob, batch_size: int, notify: Callable[[str], None] = print_notice
) -> tuple[LogitCache, LayerTimes, str]:
    """A cache that matches the model and data, with layer timing at `batch_size`, and what was done to get it.

    A `--cache` file is reused when its fingerprint matches; a stale one is rebuilt (and the reason printed).
    Without `--cache` the logits live in memory only. Data without labels is cached with full depth's
    predictions as labels, under `--guarantee consistency` only.
    """
    serving = job.serving or ServingOptions()
    quantize, runtime = serving.quantize, serving.runtime
    expected = {**fingerprint(job.model_dir, job.data_path, job.max_samples), "quantize": quantize}
    if runtime != "torch":  # a key only when set, so caches written before runtimes existed stay fresh
        expected["runtime"] = runtime
    cache, status = None, "built (in memory only)"
    if job.cache_path and Path(job.cache_path).exists():
        try:
            cache, status = load_fresh(job.cache_path, expected), "reused"
        except StaleCacheError as error:
            notify(f"{error}; rebuilding it")
            status = f"rebuilt (stale: {error.reason})"
    elif job.cache_path:
        status = "built"
    timing_batch = min(batch_size, cache.num_samples) if cache is not None else batch_size
    timing_ok = cache is not None and (cache.timing or {}).get("batch_size") == timing_batch
    if cache is not None and timing_ok:
        return cache, LayerTimes.from_dict(cache.timing), status

    model = EarlyExitModel.from_pretrained(job.model_dir, quantize=quantize, runtime=runtime)
    allow_unlabelled = job.options is not None and job.options.guarantee == "consistency"
    batches, labelled = dev_batches(
        model, job.data_path, job.max_samples, batch_size, allow_unlabelled, job.skip_invalid
    )
    if cache is None:
        cache = build_cache(model, batches, expected)
        if quantize != "none":  # judged against float32 full depth
            reference = EarlyExitModel.from_pretrained(job.model_dir)
            cache.reference = torch.cat([reference.stock_logits(inputs).float() for inputs, _ in batches])
        if not labelled:
            cache = cache.labelled_by_full_depth(model.multi_label)
    else:
        status = f"{status}, layer timing re-measured at batch size {batch_size}"
    timing = measure_layer_times(model, representative_batch(batches, batch_size))
    cache.timing = timing.as_dict()
    if job.cache_path:
        cache.save(job.cache_path)
    return cache, timing, status


def _summary_lines(job: CalibrationJob, result: CalibrationResult, num_samples: int) -> list[str]:
    metric, chosen, full = result.options.metric, result.chosen, result.full
    lines = [
        f"written by `epee calibrate` at {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"model {job.model_dir}, data {job.data_path} ({num_samples} samples), metric {metric}",
        f"chosen {chosen.policy.describe()}: {result.choice.reason}",
        f"calibration slice: {chosen.calibration.metric:.4f} vs full {full.calibration.metric:.4f}, "
        f"{chosen.calibration.layer_speedup:.2f}x fewer layers",
    ]
    if chosen.held_back is not None and full.held_back is not None:
        lines.append(f"held-back slice: {chosen.held_back.metric:.4f} vs full {full.held_back.metric:.4f}")
    if not result.labelled:
        lines.append(f"data without labels: {metric} is agreement with full depth")
    if result.guarantee is not None:
        certified = bool(result.certificate and result.certificate["certified"])
        lines.append(f"guarantee: {describe_guarantee(result.guarantee, certified)}")
    return lines + [f"warning: {warning}" for warning in result.warnings]


def run_calibration(job: CalibrationJob, notify: Callable[[str], None] = print_notice) -> dict[str, Any]:
    """Calibrate, write the model YAML, the JSON report (and the plot); return the report without its
    per-setting list."""
    serving = job.serving or ServingOptions()
    options = job.options or CalibrationOptions()
    serving.check()
    options.check()
    spec = ModelSpec.load(Path(job.model_dir) / SPEC_FILE)
    check_metric(spec, options.metric)  # before the (slow) full-depth pass
    # Every run checks the data (a reused cache too); unusable rows stop here unless skipped. Data without
    # labels (consistency only) is checked by its own reader when the cache is built.
    unlabelled = read_unlabelled(job.data_path, spec.task, None) is not None
    if unlabelled and options.guarantee != "consistency":
        raise ConfigError(
            f"{job.data_path}: no row has a '{label_field(spec.task)}' field: calibrating on data "
            f"without labels needs --guarantee consistency"
        )
    skipped = {}
    if not unlabelled:
        skipped = read_task_examples(
            job.data_path,
            spec.task,
            "eval",
            skip_invalid=job.skip_invalid,
            labels=spec.labels,
            notify=notify,
        ).skipped_rows
    cache, timing, cache_status = fresh_cache(job, serving.batch_size, notify)
    result = calibrate(cache, spec, options, timing, gate=ExitGate.load(job.model_dir))

    config = model_yaml(spec, result.chosen.policy, serving, result.guarantee)
    write_model_yaml(job.output, config, _summary_lines(job, result, cache.num_samples))
    if job.plot:
        plot_frontier(
            job.plot,
            result.settings,
            result.frontier,
            result.full,
            result.oracle,
            result.chosen,
            options.metric,
            None if options.target_speedup is not None else options.max_accuracy_drop,
            f"{Path(job.model_dir).name} on {Path(job.data_path).name}: {options.metric} vs average exit layer "
            f"({int(result.split.calibration.numel())} calibration samples, {len(result.settings)} settings)",
        )
    header = {
        "model": job.model_dir,
        "data": job.data_path,
        "task": spec.task,
        "num_samples": cache.num_samples,
        "skipped_rows": skipped,
        "num_layers": spec.num_layers,
        "cache": {"path": job.cache_path, "status": cache_status},
        "timing": timing.as_dict(),
        "output": job.output,
        "report": str(job.report_file),
        "plot": job.plot,
        "model_yaml": config,
    }
    report = {**header, **result.report(include_settings=True)}
    job.report_file.parent.mkdir(parents=True, exist_ok=True)
    job.report_file.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    report.pop("settings")
    return report
