"""`epee loadtest compare`: EPEE against full depth on one real TorchServe, under the identical clinical-day load.

One archive (`epee package` of the model directory and its YAML) is registered twice on a TorchServe started
from config.properties: NAME-epee answers with the YAML's policy; NAME-full answers with every layer because
Locust sends `X-EPEE-Policy: full` with each of its requests (the per-request override of docs/design.md, which the YAML must allow).
With the `continuous` scheduler in `schedulers`, a second archive packaged with `--scheduler continuous` is
registered as NAME-continuous-epee: the YAML's policy on the layer-level scheduler, under the same load.
Same bytes, handler, batch settings and workers: the policy is the only difference. Two registrations rather
than one give each run its own queue and its own server-side counters (average exit layer and batch size, read
from the metrics API). After a short warm-up of each model the two runs go one after the other, each followed
by a cool-down; the server is stopped at the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..engine.spec import ConfigError, ModelSpec, read_yaml
from ..ops.management import ManagementClient
from ..ops.packaging import check_inputs, package_model
from ..ops.torchserve import TorchServe, read_properties
from ..serving.config import ServeConfig
from .loadplot import plot_latency
from .loadtest import (
    DEFAULT_SLO,
    LOCUSTFILE,
    USER_KINDS,
    LoadRun,
    counters_delta,
    default_report_dir,
    model_counters,
    require_local,
    run_locust,
    stats_result,
    stop_on_signals,
)
from .locust_stats import load_slo, read_history

VARIANTS = ("epee", "full")  # the batch-level runs; the layer-level scheduler adds CONTINUOUS
CONTINUOUS = "continuous-epee"
SCHEDULERS = ("batch", "continuous")


@dataclass
class ComparisonJob:
    """What to compare, on which server, under how much load."""

    model_dir: Path
    config: Path  # the model YAML: TorchServe keys + `epee:` section
    ts_config: Path = Path("config.properties")
    name: str | None = None  # archive name; default: MODEL_DIR's name + "-loadtest"
    peak_users: int = 4
    duration: int = 120  # seconds per run
    warmup: int = 15  # seconds of low load per model before the timed runs (0: none)
    cooldown: float = 5.0  # seconds after each run: the queue drains, the metrics arrive
    output_dir: Path | None = None  # default load_tests/reports/<date>
    slo: Path | None = DEFAULT_SLO
    data_dir: str | None = None
    locustfile: Path = LOCUSTFILE
    schedulers: tuple[str, ...] = ("batch",)  # add "continuous" for the layer-level scheduler's run

    @property
    def variants(self) -> tuple[str, ...]:
        """The runs, in order: batch-level EPEE and full depth, then layer-level EPEE when asked."""
        return VARIANTS + ((CONTINUOUS,) if "continuous" in self.schedulers else ())


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def run_comparison(job: ComparisonJob) -> dict:
    """Package, serve, register twice, load both, stop; write comparison.md/.json and latency.png."""
    name = job.name or f"{job.model_dir.name}-loadtest"
    spec, serve = check_inputs(job.model_dir, job.config, name)
    if not serve.allow_request_override:
        raise ConfigError(f"{job.config}: the full-depth run needs allow_request_override: true")
    if job.slo:
        load_slo(job.slo)  # a bad SLO file fails now, not after the runs
    output_dir = Path(job.output_dir or default_report_dir())
    output_dir.mkdir(parents=True, exist_ok=True)
    server = TorchServe(job.ts_config)
    require_local(server.inference_url)
    store = Path(read_properties(job.ts_config).get("model_store", "model_store"))
    archive = package_model(job.model_dir, job.config, name, export_path=store, scheduler="batch")
    archives = {"epee": name, "full": name}
    if CONTINUOUS in job.variants:
        package_model(
            job.model_dir, job.config, f"{name}-continuous", export_path=store, scheduler="continuous"
        )
        archives[CONTINUOUS] = f"{name}-continuous"
    models = {variant: f"{name}-{variant}" for variant in job.variants}
    overrides = {"epee": "", "full": "full", CONTINUOUS: ""}

    def load_run(variant: str, seconds: int, users: int, prefix: Path) -> LoadRun:
        return LoadRun(
            host=server.inference_url,
            models={USER_KINDS[spec.task]: models[variant]},
            peak_users=users,
            duration=seconds,
            prefix=prefix,
            policy_override=overrides[variant],
            inference_key=server.keys.get("inference"),
            data_dir=job.data_dir,
            locustfile=job.locustfile,
        )

    runs: dict[str, dict] = {}
    with stop_on_signals():
        server.start()
        try:
            client = ManagementClient(server.management_url, server.keys.get("management"))
            with ThreadPoolExecutor(len(models)) as pool:  # the workers load at once
                list(pool.map(lambda v: client.register(f"{archives[v]}.mar", name=models[v]), models))
            if job.warmup:
                for variant in job.variants:
                    run_locust(
                        load_run(
                            variant, job.warmup, min(2, job.peak_users), output_dir / f"warmup_{variant}"
                        )
                    )
            for variant in job.variants:
                before = model_counters(server.metrics_url, models[variant])
                load_before = os.getloadavg()[0]
                run_locust(load_run(variant, job.duration, job.peak_users, output_dir / variant))
                load_after = os.getloadavg()[0]
                time.sleep(job.cooldown)
                runs[variant] = {
                    "model": models[variant],
                    "policy_override": overrides[variant] or None,
                    "server": counters_delta(before, model_counters(server.metrics_url, models[variant])),
                    # other processes on a shared machine: 1-minute load average before and after the run
                    "machine_load": [round(load_before, 2), round(load_after, 2)],
                }
        finally:
            server.stop()

    for variant, run in runs.items():
        run.update(stats_result(output_dir / variant, job.slo))
    report = build_report(job, spec, serve, archive["archive"], runs)
    return write_outputs(report, output_dir, job)


def build_report(
    job: ComparisonJob, spec: ModelSpec, serve: ServeConfig, archive: str, runs: dict[str, dict]
) -> dict:
    """The comparison as one JSON-able dict: setup, both runs, EPEE/full ratios, the SLO verdict."""
    epee, full = runs["epee"]["stats"], runs["full"]["stats"]
    continuous = runs.get(CONTINUOUS, {}).get("stats")
    yaml_config = read_yaml(job.config)
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "model": str(job.model_dir),
        "config": str(job.config),
        "archive": archive,
        "task": spec.task,
        "num_layers": spec.num_layers,
        "policy": serve.policy.describe(),
        "server": {
            "ts_config": str(job.ts_config),
            "batch_size": yaml_config.get("batchSize"),
            "max_batch_delay": yaml_config.get("maxBatchDelay"),
            "workers": yaml_config.get("minWorkers"),
            "num_threads": serve.num_threads,
            "cpus": os.cpu_count(),
        },
        "load": {
            "shape": "ClinicalDayShape (load_tests/shape.py)",
            "peak_users": job.peak_users,
            "duration_seconds": job.duration,
            "warmup_seconds": job.warmup,
            "locust_env": {
                key: value
                for key, value in os.environ.items()
                if key.startswith("EPEE_") and "KEY" not in key
            },
        },
        "runs": runs,
        "ratios_epee_over_full": {
            "p50": _ratio(epee["p50_ms"], full["p50_ms"]),
            "p95": _ratio(epee["p95_ms"], full["p95_ms"]),
            "p99": _ratio(epee["p99_ms"], full["p99_ms"]),
            "rps": _ratio(epee["rps"], full["rps"]),
        },
        "schedulers": list(job.schedulers),
        "ratios_continuous": None
        if continuous is None
        else {
            "p50_vs_full": _ratio(continuous["p50_ms"], full["p50_ms"]),
            "p95_vs_full": _ratio(continuous["p95_ms"], full["p95_ms"]),
            "p95_vs_batch_epee": _ratio(continuous["p95_ms"], epee["p95_ms"]),
            "rps_vs_full": _ratio(continuous["rps"], full["rps"]),
        },
        "slo": runs["epee"]["slo"],
        "slo_violations": runs["epee"]["slo_violations"],  # the SLO check is on the served configuration
        "passed": runs["epee"]["passed"],
    }


def write_outputs(report: dict, output_dir: Path, job: ComparisonJob) -> dict:
    """latency.png from both runs' history, then comparison.md and comparison.json; returns the report."""
    histories = {variant: read_history(output_dir / variant) for variant in job.variants}
    plot = plot_latency(
        histories,
        output_dir / "latency.png",
        f"{job.model_dir.name}: EPEE vs full depth, clinical day, peak {job.peak_users} users, {job.duration} s",
    )
    report["files"] = {
        "markdown": str(output_dir / "comparison.md"),
        "json": str(output_dir / "comparison.json"),
        "plot": str(plot),
    }
    Path(report["files"]["markdown"]).write_text(render_comparison(report), encoding="utf-8")
    Path(report["files"]["json"]).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_comparison(report: dict) -> str:
    """comparison.md: the side-by-side table, ratios, server-side evidence and SLO verdicts."""
    epee, full = report["runs"]["epee"], report["runs"]["full"]
    ratios = report["ratios_epee_over_full"]
    server, load = report["server"], report["load"]
    rows = [
        ("requests", "requests", 0, None),
        ("failures", "failures", 0, None),
        ("failure rate", "failure_rate", 4, None),
        ("requests/s", "rps", 2, "rps"),
        ("p50 latency, ms", "p50_ms", 0, "p50"),
        ("p95 latency, ms", "p95_ms", 0, "p95"),
        ("p99 latency, ms", "p99_ms", 0, "p99"),
        ("mean latency, ms", "avg_ms", 0, None),
    ]
    continuous = report["runs"].get(CONTINUOUS)
    columns = [("EPEE", epee), ("full", full)] + ([("EPEE layer-level", continuous)] if continuous else [])
    lines = [
        f"# EPEE vs full depth under a clinical day of load ({report['date']})",
        "",
        f"- model: `{report['model']}` ({report['task']}, {report['num_layers']} layers) with `{report['config']}`, "
        f"packaged as `{report['archive']}` and registered twice: `{epee['model']}` (policy "
        f"`{report['policy']}`) and `{full['model']}` (same archive; every request sends `X-EPEE-Policy: full`)",
        f"- server: TorchServe from `{server['ts_config']}`, batchSize {server['batch_size']}, maxBatchDelay "
        f"{server['max_batch_delay']} ms, {server['workers']} worker(s) per model, "
        f"{server['num_threads'] or 'default'} torch thread(s), {server['cpus']} CPUs",
        f"- load: {load['shape']}, peak {load['peak_users']} users, {load['duration_seconds']} s per run "
        f"(after {load['warmup_seconds']} s warm-up per model); identical for every run, EPEE first",
    ]
    if continuous:
        lines.append(
            f"- layer-level: `{continuous['model']}`, the same model and YAML packaged with `--scheduler "
            "continuous` (TorchServe's continuous batching; requests join at the next layer, leave at their exit)"
        )
    lines += [
        "",
        "| | " + " | ".join(label for label, _ in columns) + " | EPEE / full |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for label, key, digits, ratio_key in rows:
        ratio = _fmt(ratios[ratio_key], 3) if ratio_key else ""
        cells = " | ".join(_fmt(run["stats"][key], digits) for _, run in columns)
        lines.append(f"| {label} | {cells} | {ratio} |")
    for label, key in (
        ("avg exit layer (server)", "avg_exit_layer"),
        ("avg batch size (server)", "avg_batch_size"),
    ):
        cells = " | ".join(_fmt(run["server"][key], 2) for _, run in columns)
        lines.append(f"| {label} | {cells} | |")
    cells = " | ".join(" → ".join(map(str, run["machine_load"])) for _, run in columns)
    lines.append(f"| machine load (1-min avg, before → after) | {cells} | |")
    if report.get("ratios_continuous"):
        layer = report["ratios_continuous"]
        lines += [
            "",
            f"Layer-level EPEE: p50 {_fmt(layer['p50_vs_full'], 3)}× and p95 {_fmt(layer['p95_vs_full'], 3)}× "
            f"batch-level full depth; p95 {_fmt(layer['p95_vs_batch_epee'], 3)}× batch-level EPEE.",
        ]
    lines += [
        "",
        "p95 latency by request type, ms:",
        "",
        "| request | " + " | ".join(label for label, _ in columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for name in sorted({request for _, run in columns for request in run["by_request"]}):
        cells = " | ".join(_fmt(run["by_request"].get(name, {}).get("p95_ms")) for _, run in columns)
        lines.append(f"| {name} | {cells} |")
    slo = report["slo"]
    if slo["file"]:
        lines += [
            "",
            f"SLO (`{slo['file']}`: " + ", ".join(f"{k} {v:g}" for k, v in slo.items() if k != "file") + ")",
        ]
        for variant, run in (("EPEE (checked)", epee), ("full (for reference)", full)):
            verdict = "met" if not run["slo_violations"] else "violated: " + "; ".join(run["slo_violations"])
            lines.append(f"- {variant}: {verdict}")
    lines += [
        "",
        "![latency over time](latency.png)",
        "",
        "Locust reports: " + ", ".join(f"`{run['files']['html']}`" for _, run in columns),
    ]
    return "\n".join(lines) + "\n"
