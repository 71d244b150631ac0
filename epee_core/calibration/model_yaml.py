"""The per-model TorchServe YAML that calibration writes (docs/design.md, "Model directory"): TorchServe keys + the `epee:` section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..engine.policies import Policy
from ..engine.spec import TEXT_TASKS, ConfigError, ModelSpec
from ..serving.config import SCHEDULERS, ServeConfig, scheduler_keys

# What the benchmarks found best for the certified MiniLM on unseen ADE sentences (docs/latency.md). In process
# (`epee bench --arrival-rate`) the layer-level scheduler tied with batch-level EPEE at no delay; on a real
# TorchServe under the clinical-day Locust shape batch-level EPEE had the lower p95 (500 ms against 610 ms: the
# layer-level scheduler pays a frontend-worker round trip per layer). The best delay was 0 ms, and TorchServe
# replaces an archive's 0 by its default of 100 ms, so 1 ms is the closest a YAML can ask for.
DEFAULT_SCHEDULER = "batch"
DEFAULT_MAX_BATCH_DELAY = 1


@dataclass
class ServingOptions:
    """The TorchServe keys of the model YAML; `batch_size` is also the batch the cost model was timed at."""

    batch_size: int = 8
    max_batch_delay: int = DEFAULT_MAX_BATCH_DELAY  # ms TorchServe waits to fill a batch (batch scheduler)
    min_workers: int = 1
    max_workers: int = 1
    response_timeout: int = 120  # s
    num_threads: int | None = None  # torch threads per worker (`epee:` section); None: torch's default
    quantize: str = "none"  # "int8": the worker quantizes at load, and calibration ran on the int8 model
    runtime: str = "torch"  # "onnxruntime": the worker runs the layers there, and calibration ran on them
    scheduler: str = (
        DEFAULT_SCHEDULER  # "continuous": the layer-level scheduler; "batch": TorchServe's batching
    )

    def check(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for name, value in vars(self).items():
            if value is None or isinstance(value, str):
                continue
            minimum = 0 if name == "max_batch_delay" else 1
            if value < minimum:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def policy_entries(policy: Policy) -> dict[str, Any]:
    """A policy's parameters as `epee:` section keys (`min_layer: 1`, the default, left out)."""
    return {key: value for key, value in policy.params.items() if key != "min_layer" or value != 1}


def model_yaml(
    spec: ModelSpec, policy: Policy, serving: ServingOptions, guarantee: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A complete model YAML for `epee package --config`, checked as `epee package` checks it; a certified
    `guarantee` (kind, epsilon, delta, bound, n, method) goes into the `epee:` section for the handler to send."""
    section: dict[str, Any] = {"task": spec.task, "policy": policy.name, **policy_entries(policy)}
    if spec.task in TEXT_TASKS:
        section["max_length"] = spec.max_length
    section["allow_request_override"] = True
    if serving.num_threads is not None:
        section["num_threads"] = serving.num_threads
    if serving.quantize != "none":
        section["quantize"] = serving.quantize
    if serving.runtime != "torch":
        section["runtime"] = serving.runtime
    if guarantee is not None:
        section["guarantee"] = dict(guarantee)
    config = {
        "minWorkers": serving.min_workers,
        "maxWorkers": serving.max_workers,
        "batchSize": serving.batch_size,
        "maxBatchDelay": serving.max_batch_delay,
        "responseTimeout": serving.response_timeout,
        "epee": section,
    }
    config = scheduler_keys(config, serving.scheduler)
    ServeConfig.from_model_yaml(config, source="calibrated model YAML")
    return config


def write_model_yaml(path: str | Path, config: dict[str, Any], comment_lines: list[str]) -> None:
    """Write the YAML with a provenance comment on top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in comment_lines)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
