"""The TorchServe model YAML: TorchServe's model-config keys, checked, and the `epee:` section, the policy a model
serves with and the handler's limits (docs/design.md, "Serving configuration")."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.policies import ALL_PARAM_KEYS, POLICIES, SERVABLE_POLICIES, Policy, PolicyError, make_policy
from ..engine.quantize import SCHEMES as QUANTIZE_SCHEMES
from ..engine.spec import RUNTIMES, TASKS, ConfigError, ModelSpec, check_type, read_yaml
from .audit import AUDIT_MODES
from .scheduler import SchedulerLimits

SERVE_KEYS = {
    "task": str,
    "policy": str,
    "max_length": int,
    "allow_request_override": bool,
    "max_body_bytes": int,
    "max_text_chars": int,
    "max_image_pixels": int,
    "num_threads": int,
    "log_inputs": bool,
    "max_rows_per_request": int,
    "dtype": str,
    "quantize": str,
    "runtime": str,
    "slo_p95_ms": int,
    "max_rows_in_flight": int,
    "max_admit_rows": int,
    "max_step_tokens": int,
    "max_cohorts": int,
    "cohort_threads": int,
    "audit_fraction": (int, float),
    "audit_alpha": float,
    "audit_seed": int,
    "audit_mode": str,
    "audit_records": str,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontendKey:
    """A top-level key of the model YAML that TorchServe's frontend reads: its type and its allowed values."""

    kind: type
    minimum: int | None = None  # integers: the smallest value TorchServe keeps as given
    choices: tuple[str, ...] = ()  # strings: the values TorchServe knows (case-insensitive, as it reads them)


# TorchServe 0.12's model-config keys (frontend `archive/model/ModelConfig.java`). TorchServe logs a warning and
# ignores a value of the wrong type, and clamps one out of range (`batchSize: 0` runs as 1); we refuse both.
TORCHSERVE_KEYS = {
    "minWorkers": FrontendKey(int, 1),
    "maxWorkers": FrontendKey(int, 0),
    "batchSize": FrontendKey(int, 1),
    "maxBatchDelay": FrontendKey(int, 0),  # ms
    "responseTimeout": FrontendKey(int, 1),  # s
    "startupTimeout": FrontendKey(int, 1),  # s
    "deviceType": FrontendKey(str, choices=("cpu", "gpu")),
    "deviceIds": FrontendKey(list),
    "parallelType": FrontendKey(str, choices=("pp", "tp", "pptp", "custom")),
    "parallelLevel": FrontendKey(int, 0),
    "torchrun": FrontendKey(dict),
    "maxRetryTimeoutInSec": FrontendKey(int, 0),
    "clientTimeoutInMills": FrontendKey(int, 0),
    "jobQueueSize": FrontendKey(int, 0),
    "useJobTicket": FrontendKey(bool),
    "sequenceMaxIdleMSec": FrontendKey(int, 0),
    "sequenceTimeoutMSec": FrontendKey(int, 0),
    "maxSequenceJobQueueSize": FrontendKey(int, 1),
    "maxNumSequence": FrontendKey(int, 1),
    "continuousBatching": FrontendKey(bool),
    "sequenceBatching": FrontendKey(bool),
    "asyncCommunication": FrontendKey(bool),
    "useVenv": FrontendKey(bool),
}
EPEE_SECTION = "epee"


def unknown_key_error(key: str, known: list[str] | set[str] | frozenset[str], source: str) -> ConfigError:
    """`SOURCE: unknown key 'batchsize' (did you mean 'batchSize'?)`, else the keys it may be."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:  # a different case is the usual slip (`batchsize`), and difflib scores case differences low
        close = [name for name in known if name.lower() == key.lower()]
    hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(sorted(known))}"
    return ConfigError(f"{source}: unknown key '{key}' ({hint})")


def check_torchserve_keys(data: Mapping[str, Any], source: str) -> None:
    """ConfigError unless every top-level key of a model YAML is `epee` or one of TorchServe's model-config keys,
    with a value of its type and range."""
    for key, value in data.items():
        if key == EPEE_SECTION:
            continue
        if key not in TORCHSERVE_KEYS:
            raise unknown_key_error(str(key), [*TORCHSERVE_KEYS, EPEE_SECTION], source)
        rule = TORCHSERVE_KEYS[key]
        check_type(value, key, rule.kind, source)
        if rule.minimum is not None and value < rule.minimum:
            raise ConfigError(f"{source}: '{key}' must be an integer >= {rule.minimum}, got {value!r}")
        if rule.choices and value.lower() not in rule.choices:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(rule.choices)}, got {value!r}")
        if key == "deviceIds" and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
        ):
            raise ConfigError(
                f"{source}: 'deviceIds' must be a list of GPU numbers (integers >= 0), got {value!r}"
            )
    workers = data.get("minWorkers"), data.get("maxWorkers")
    if None not in workers and workers[1] < workers[0]:
        raise ConfigError(f"{source}: 'maxWorkers' {workers[1]} is below 'minWorkers' {workers[0]}")


# The `guarantee:` mapping `epee calibrate` writes when it certified the policy (docs/calibration.md).
GUARANTEE_KEYS = ("epsilon", "delta", "bound", "n", "method")
GUARANTEE_KINDS = {"accuracy": "accuracy-drop", "consistency": "disagreement"}


def _number(value: Any, key: str, source: str, low: float, high: float) -> float:
    check_type(value, f"guarantee.{key}", (int, float), source)
    if not low <= value <= high:
        raise ConfigError(f"{source}: 'guarantee.{key}' must be in [{low}, {high}], got {value!r}")
    return value


def check_guarantee(value: Any, source: str) -> dict[str, Any]:
    """The `guarantee:` mapping: `epsilon` (the budget), `delta` (the risk), `bound` (the upper confidence bound,
    at most `epsilon`), `n` (test rows), `method`, and optionally `kind` (accuracy or consistency) and
    `consistency_bound` (an accuracy certificate's bound on disagreement with full depth, docs/monitoring.md) and
    `exit_counts` (how many dev rows exited at each layer: the drift detector's reference)."""
    check_type(value, "guarantee", dict, source)
    allowed = (*GUARANTEE_KEYS, "kind", "consistency_bound", "exit_counts")
    unknown = sorted(set(value) - set(allowed))
    missing = [key for key in GUARANTEE_KEYS if key not in value]
    if unknown or missing:
        problem = f"unknown key '{unknown[0]}'" if unknown else f"missing key '{missing[0]}'"
        raise ConfigError(f"{source}: 'guarantee': {problem} (expected: {', '.join(allowed)})")
    if value.get("kind", "accuracy") not in GUARANTEE_KINDS:
        raise ConfigError(
            f"{source}: 'guarantee.kind' must be one of {', '.join(GUARANTEE_KINDS)}, got {value['kind']!r}"
        )
    epsilon = _number(value["epsilon"], "epsilon", source, 0.0, 1.0)
    _number(value["delta"], "delta", source, 0.0, 1.0)
    if _number(value["bound"], "bound", source, -1.0, 1.0) > epsilon:
        raise ConfigError(
            f"{source}: 'guarantee.bound' {value['bound']} exceeds 'guarantee.epsilon' {epsilon}: not a "
            f"certified guarantee"
        )
    if "consistency_bound" in value:
        _number(value["consistency_bound"], "consistency_bound", source, 0.0, 1.0)
    counts = value.get("exit_counts", [0, 1])
    if not (isinstance(counts, list) and len(counts) >= 2 and sum(counts) > 0 and all(
        isinstance(count, int) and not isinstance(count, bool) and count >= 0 for count in counts
    )):  # fmt: skip
        raise ConfigError(
            f"{source}: 'guarantee.exit_counts' must list a count >= 0 per layer (not all 0), got {counts!r}"
        )
    if check_type(value["n"], "guarantee.n", int, source) < 1:
        raise ConfigError(f"{source}: 'guarantee.n' must be a positive integer, got {value['n']!r}")
    if not check_type(value["method"], "guarantee.method", str, source).strip():
        raise ConfigError(f"{source}: 'guarantee.method' must not be empty")
    return dict(value)


def monitored_rate(guarantee: Mapping[str, Any]) -> tuple[float, str]:
    """The disagreement rate a production monitor tests (H0: rate <= it) and the key it comes from: a
    consistency certificate's epsilon; an accuracy certificate's consistency_bound, else its epsilon (looser)."""
    if guarantee.get("kind", "accuracy") == "accuracy" and "consistency_bound" in guarantee:
        return float(guarantee["consistency_bound"]), "guarantee.consistency_bound"
    return float(guarantee["epsilon"]), "guarantee.epsilon"


def guarantee_header(guarantee: Mapping[str, Any]) -> str:
    """The `X-EPEE-Guarantee` value: one line of ASCII, e.g.
    `accuracy-drop<=0.01; risk=0.1; bound=0.0082; n=1200; method=...`."""
    kind = GUARANTEE_KINDS.get(guarantee.get("kind", "accuracy"), "risk")
    text = (
        f"{kind}<={guarantee['epsilon']:g}; risk={guarantee['delta']:g}; bound={guarantee['bound']:.4g}; "
        f"n={guarantee['n']}; method={guarantee['method']}"
    )
    return " ".join(text.encode("ascii", "backslashreplace").decode("ascii").split())


@dataclass
class ServeConfig:
    """The `epee:` section of a model YAML: which policy to run and the limits of the serving handler.

    Parameters of several policies may sit side by side (so a request may switch policy); the default policy
    takes the ones it uses.
    """

    task: str | None = None
    policy: Policy = field(default_factory=lambda: make_policy("epee"))
    policy_params: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None
    allow_request_override: bool = True
    max_body_bytes: int = 1_000_000
    max_text_chars: int = 20_000
    max_image_pixels: int = 4096 * 4096  # image-classification: width × height, checked before decoding
    num_threads: int | None = None
    log_inputs: bool = False  # debugging on synthetic data only: writes request bodies to the logs (PHI!)
    max_rows_per_request: int = 64  # rows of one Open Inference Protocol request
    dtype: str | None = None  # weights on a GPU: float16, bfloat16 or float32 (CPU always runs float32)
    quantize: str = "none"  # "int8": the worker quantizes the backbone at load (CPU; engine/quantize.py)
    runtime: str = "torch"  # "onnxruntime": float32 layers in ONNX Runtime (CPU; engine/onnx_layers.py)
    guarantee: dict[str, Any] | None = None  # what calibration certified for `policy` (see `check_guarantee`)
    slo_p95_ms: int = 1000  # the latency objective `epee bench --arrival-rate` measures capacity against
    # the layer-level scheduler's bounds (`continuousBatching: true`; serving/scheduler.py, SchedulerLimits)
    max_rows_in_flight: int = 64
    max_admit_rows: int = 32
    max_step_tokens: int = 16384
    max_cohorts: int = 2
    cohort_threads: int | None = None  # None: the worker's torch threads (`num_threads`, else torch's)
    # the shadow audit (serving/audit.py, docs/monitoring.md): a seeded share of rows also runs to full depth
    audit_fraction: float = 0.0  # 0: off
    audit_alpha: float = 0.05  # the monitor's false-alarm level
    audit_seed: int = 0
    audit_mode: str = "background"
    audit_records: str | None = None  # JSONL file the worker appends audited rows' exit logits to (no text)

    @property
    def scheduler_limits(self) -> SchedulerLimits:
        """The scheduler's bounds; read where the worker has set its torch threads (a step's cohorts then run
        side by side on as many threads as the worker has: docs/latency.md, "Cohort threads")."""
        cohort_threads = self.cohort_threads or self.num_threads or torch.get_num_threads()
        return SchedulerLimits(
            self.max_rows_in_flight,
            self.max_admit_rows,
            self.max_step_tokens,
            self.max_cohorts,
            cohort_threads,
        )

    @property
    def monitored_rate(self) -> float | None:
        """The disagreement rate the audit monitor tests (`monitored_rate`), None without a guarantee."""
        return monitored_rate(self.guarantee)[0] if self.guarantee else None

    @property
    def guarantee_header(self) -> str | None:
        """The `X-EPEE-Guarantee` response header value, or None without a guarantee."""
        return guarantee_header(self.guarantee) if self.guarantee else None

    @classmethod
    def from_section(
        cls, section: Mapping[str, Any] | None, source: str = "model YAML 'epee:'"
    ) -> ServeConfig:
        section = dict(section or {})
        settings: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for key, value in section.items():
            if key in SERVE_KEYS:
                settings[key] = check_type(value, key, SERVE_KEYS[key], source)
            elif key == "guarantee":
                settings[key] = check_guarantee(value, source)
            elif key in ALL_PARAM_KEYS:
                params[key] = value
            else:
                raise unknown_key_error(str(key), {*SERVE_KEYS, "guarantee"} | ALL_PARAM_KEYS, source)
        task = settings.get("task")
        if task is not None and task not in TASKS:
            raise ConfigError(f"{source}: 'task' must be one of {', '.join(TASKS)}, got {task!r}")
        dtype = settings.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"{source}: 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if settings.get("quantize", "none") not in QUANTIZE_SCHEMES:
            raise ConfigError(
                f"{source}: 'quantize' must be one of {', '.join(QUANTIZE_SCHEMES)}, got {settings['quantize']!r}"
            )
        if settings.get("runtime", "torch") not in RUNTIMES:
            raise ConfigError(
                f"{source}: 'runtime' must be one of {', '.join(RUNTIMES)}, got {settings['runtime']!r}"
            )
        if settings.get("runtime") == "onnxruntime" and settings.get("quantize", "none") != "none":
            raise ConfigError(
                f"{source}: 'runtime: onnxruntime' runs float32 layers; it does not combine with quantize"
            )
        positive = ("max_length", "max_body_bytes", "max_text_chars", "max_image_pixels", "num_threads",
                    "max_rows_per_request", "slo_p95_ms", "max_rows_in_flight", "max_admit_rows",
                    "max_step_tokens", "max_cohorts", "cohort_threads")  # fmt: skip
        for key in positive:
            if key in settings and settings[key] < 1:
                raise ConfigError(f"{source}: '{key}' must be a positive integer, got {settings[key]!r}")
        _check_audit(settings, source)
        try:
            policy = make_policy(settings.pop("policy", "epee"), params, strict=False)
            for name in SERVABLE_POLICIES:  # a request may switch to any of them: check every value now
                make_policy(name, params, strict=False)
        except PolicyError as error:
            raise ConfigError(f"{source}: {error}") from None
        return cls(policy=policy, policy_params=params, **settings)

    @classmethod
    def from_model_yaml(cls, data: Mapping[str, Any], source: str) -> ServeConfig:
        """The whole model YAML checked (TorchServe's keys and the `epee:` section); its `epee:` section read."""
        check_torchserve_keys(data, source)
        return cls.from_section(data.get(EPEE_SECTION), source=f"{source} '{EPEE_SECTION}:'")

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        """Read and check a model YAML file; it must have an `epee:` section."""
        data = read_yaml(path)
        if EPEE_SECTION not in data:
            raise ConfigError(f"{path}: no '{EPEE_SECTION}:' section")
        return cls.from_model_yaml(data, str(path))

    def check_model(self, spec: ModelSpec, source: str, model: str = "the model") -> None:
        """ConfigError unless this section can serve `spec`: the same task, a policy within its layers."""
        if self.task is not None and self.task != spec.task:
            raise ConfigError(
                f"{source}: 'task' is {self.task} but {model} is a {spec.task} model "
                f"(a YAML for task '{self.task}' cannot serve it)"
            )
        try:
            self.policy.check_layers(spec.num_layers)
        except PolicyError as error:
            raise ConfigError(f"{source}: {error}") from None
        counts = (self.guarantee or {}).get("exit_counts")
        if counts is not None and len(counts) != spec.num_layers:
            raise ConfigError(
                f"{source}: 'guarantee.exit_counts' has {len(counts)} layers, {model} has {spec.num_layers}"
            )

    def placement(self, gpu_id: Any, cuda_available: bool | None = None) -> tuple[torch.device, torch.dtype]:
        """Where a worker puts the model and in which dtype.

        `cuda:{gpu_id}` when TorchServe assigned the worker a GPU (`gpu_id` in its system properties) and CUDA is
        available, else the CPU. `dtype` applies on a GPU; on the CPU a half precision (`float16`, `bfloat16`)
        is ignored with a warning and the model runs in float32, so one archive serves CPU and GPU replicas.
        """
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        device = torch.device("cpu")
        if gpu_id is not None and cuda_available:
            device = torch.device("cuda", int(gpu_id))
        dtype = DTYPES[self.dtype or "float32"]
        if self.quantize != "none" and device.type != "cpu":
            logger.warning("epee: quantize %s runs on the CPU; this worker ignores its GPU", self.quantize)
            device, dtype = torch.device("cpu"), torch.float32
        if device.type == "cpu" and dtype != torch.float32:
            logger.warning("epee: dtype %s needs a GPU; this worker runs on the CPU in float32", self.dtype)
            dtype = torch.float32
        return device, dtype

    def runtime_on(self, device: torch.device) -> str:
        """The runtime a worker on `device` runs its layers in: `runtime`, except that ONNX Runtime layers run on
        the CPU only, so a GPU worker keeps torch (with a warning) and one archive serves CPU and GPU replicas."""
        if self.runtime != "torch" and device.type != "cpu":
            logger.warning(
                "epee: runtime %s runs on the CPU; this %s worker runs torch", self.runtime, device
            )
            return "torch"
        return self.runtime

    def policy_for(self, override: Mapping[str, Any] | None) -> Policy:
        """The policy a request asks for (`{"policy": name, ...params}`), else the configured one."""
        if not override:
            return self.policy
        override = dict(override)
        name = override.pop("policy", self.policy.name)
        if not isinstance(name, str):
            raise PolicyError(f"'policy' must be a string, got {name!r}")
        if name in POLICIES and not POLICIES[name].servable:
            raise PolicyError(f"policy '{name}' needs gold labels and cannot be served")
        base = make_policy(name, self.policy_params, strict=False).params
        return make_policy(name, {**base, **override}, strict=True) if override else make_policy(name, base)


def _check_audit(settings: dict[str, Any], source: str) -> None:
    """ConfigError unless the audit keys are in range; an audit needs a guarantee whose rate is in (0, 1)."""
    fraction = settings.get("audit_fraction", 0.0)
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"{source}: 'audit_fraction' must be in [0, 1], got {fraction!r}")
    if not 0.0 < settings.get("audit_alpha", 0.05) < 1.0:
        raise ConfigError(f"{source}: 'audit_alpha' must be in (0, 1), got {settings['audit_alpha']!r}")
    if settings.get("audit_seed", 0) < 0:
        raise ConfigError(f"{source}: 'audit_seed' must be an integer >= 0, got {settings['audit_seed']!r}")
    if settings.get("audit_mode", AUDIT_MODES[0]) not in AUDIT_MODES:
        raise ConfigError(
            f"{source}: 'audit_mode' must be one of {', '.join(AUDIT_MODES)}, got {settings['audit_mode']!r}"
        )
    if fraction > 0:
        rate = ServeConfig(guarantee=settings.get("guarantee")).monitored_rate
        if rate is None or not 0.0 < rate < 1.0:
            raise ConfigError(
                f"{source}: 'audit_fraction' needs a 'guarantee' whose disagreement rate (epsilon, or "
                f"consistency_bound) is in (0, 1): the monitor tests served rows against it, got {rate!r}"
            )


SCHEDULERS = ("batch", "continuous")


def scheduler_keys(config: dict, scheduler: str) -> dict:
    """The TorchServe keys of a model YAML for `scheduler`.

    `continuous` turns on TorchServe's continuous batching, where one handler call is one step of the layer-level
    scheduler: `batchSize` becomes the requests TorchServe keeps in flight (the `epee:` section's
    `max_rows_in_flight`, default 64) and `maxBatchDelay` 1 ms, since an idle worker waits that long for company
    (TorchServe 0.12 replaces an archive's 0 by its default of 100 ms: `ModelManager.java`, "marMaxBatchDelay >
    0"). `batch` is TorchServe's dynamic batching, with the YAML's own batch size and delay."""
    config = dict(config)
    if scheduler == "continuous":
        limits = ServeConfig.from_section(config.get("epee")).scheduler_limits
        config.update(continuousBatching=True, batchSize=limits.max_rows_in_flight, maxBatchDelay=1)
    else:
        config.pop("continuousBatching", None)
    return config
