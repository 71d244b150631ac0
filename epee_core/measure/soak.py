"""`epee loadtest soak`: a long, steady clinical rate against a real TorchServe; nothing lost, nothing leaked.

The model is packaged and served from config.properties as `epee loadtest compare` does. After a warm-up, an
open-loop sender fires requests at a fixed rate (each on its own thread, so a slow answer never delays the next
request): real sentences, with a share of bad requests mixed in. Every request is counted as sent, then as
answered (an HTTP response arrived) or lost (a timeout or a broken connection). The workers' resident memory
(RSS) is sampled from warm-up end to the last answer. The soak passes when nothing is lost, every good request
gets 200, every bad one gets a 4xx, and worker RSS grew by at most `max_rss_growth_mb`. The server is stopped
at the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil
import requests

from ..data import DEMO_DATA_DIR
from ..data.text import read_examples
from ..engine.inputs import Example
from ..engine.spec import ConfigError, read_yaml
from ..ops.management import ManagementClient
from ..ops.packaging import check_inputs, package_model
from ..ops.torchserve import TorchServe, read_properties
from .loadtest import default_report_dir, require_local, stop_on_signals

EMBEDDED_SENTENCES = DEMO_DATA_DIR / "ade_demo_dev.jsonl"
MAX_RATE = 200.0  # requests per second: a soak is steady load, not a stress test
MAX_DURATION = 24 * 3600.0
SOAK_TASKS = ("text-classification", "multi-label", "relation-extraction")


@dataclass
class SoakJob:
    """What to soak, at which rate, for how long, and the memory bound it must keep."""

    model_dir: Path
    config: Path  # the model YAML: TorchServe keys + `epee:` section
    ts_config: Path = Path("config.properties")
    name: str | None = None  # default: MODEL_DIR's name + "-soak"
    duration: float = 600.0  # seconds of measured load
    rate: float = 4.0  # requests per second
    bad_fraction: float = 0.1  # share of requests that are malformed on purpose
    warmup: float = 10.0  # seconds at the same rate before memory and counts are taken
    max_rss_growth_mb: float = 64.0
    sample_every: float = 5.0  # seconds between RSS samples
    data: Path | None = None  # JSONL of the model's task; default: the embedded ADE dev sentences
    output_dir: Path | None = None  # default load_tests/reports/<date>


def bad_requests(example: Example) -> list[tuple[str, dict]]:
    """Malformed requests the soak mixes in; each must get a 4xx, never a 5xx or a dead worker."""
    return [
        ("empty text", {"json": {"text": "  "}}),
        ("JSON list", {"json": [example.text]}),
        ("non-UTF-8 bytes", {"data": b"\xff\xfe\xfa", "headers": {"Content-Type": "text/plain"}}),
        ("unknown policy", {"json": {"text": example.text, "epee": {"policy": "no-such-policy"}}}),
    ]


def good_request(example: Example, task: str) -> dict:
    body = {"text": example.text}
    if task == "relation-extraction":
        body.update(head=example.head, tail=example.tail)
    return {"json": body}


def worker_rss_mb(client: ManagementClient, name: str) -> float:
    """Resident memory of the model's worker processes, in MB."""
    total = 0
    for worker in client.describe(name)[0]["workers"]:
        try:
            total += psutil.Process(int(worker["pid"])).memory_info().rss
        except (psutil.NoSuchProcess, KeyError, ValueError):
            continue
    return total / 2**20


class OpenLoop:
    """Fires one request every 1/rate seconds on a thread pool and records each outcome."""

    def __init__(self, url: str, headers: dict, timeout: float, rate: float):
        self.url, self.headers, self.timeout = url, headers, timeout
        self.period = 1.0 / rate
        self.pool = ThreadPoolExecutor(max_workers=min(256, max(8, int(rate * timeout) + 1)))
        self.records: list[dict] = []
        self.lock = threading.Lock()

    def _send(self, kind: str, good: bool, call: dict) -> None:
        started = time.perf_counter()
        record = {"kind": kind, "good": good, "status": None, "error": None}
        try:
            headers = {**self.headers, **call.get("headers", {})}
            response = requests.post(self.url, timeout=self.timeout, **{**call, "headers": headers})
            record["status"] = response.status_code
        except requests.RequestException as error:
            record["error"] = type(error).__name__
        record["latency_ms"] = (time.perf_counter() - started) * 1000
        with self.lock:
            self.records.append(record)

    def run(self, calls, seconds: float, on_tick=None) -> int:
        """Submit calls (an iterator of (kind, good, call)) at the rate for `seconds`; returns how many."""
        start, sent = time.monotonic(), 0
        while (now := time.monotonic()) < start + seconds:
            if now >= start + sent * self.period:
                self.pool.submit(self._send, *next(calls))
                sent += 1
                if on_tick:
                    on_tick()
            else:
                time.sleep(min(self.period / 4, start + sent * self.period - now))
        return sent

    def finish(self) -> None:
        """Wait for every request in flight (each is bounded by the client timeout)."""
        self.pool.shutdown(wait=True)


def request_stream(examples: list[Example], task: str, bad_fraction: float, seed: int = 0):
    """Endless (kind, good, call) tuples: real examples in turn, a seeded share of bad requests."""
    rng = np.random.default_rng(seed)
    index = 0
    while True:
        example = examples[index % len(examples)]
        index += 1
        if rng.random() < bad_fraction:
            kinds = bad_requests(example)
            kind, call = kinds[int(rng.integers(0, len(kinds)))]
            yield kind, False, call
        else:
            yield "good", True, good_request(example, task)


def summarise(records: list[dict], sent: int) -> dict:
    """Counts by outcome: sent, answered, lost, good answered 200, good 5xx, bad 4xx, and latency of good ones."""
    good = [record for record in records if record["good"]]
    bad = [record for record in records if not record["good"]]
    latencies = [record["latency_ms"] for record in good if record["status"] == 200]
    by_kind: dict[str, dict[str, int]] = {}
    for record in records:
        outcome = str(record["status"] or record["error"])
        by_kind.setdefault(record["kind"], {}).setdefault(outcome, 0)
        by_kind[record["kind"]][outcome] += 1
    answered = sum(record["status"] is not None for record in records)
    return {
        "sent": sent,
        "answered": answered,
        "lost": sent - answered,
        "good": len(good),
        "good_200": sum(record["status"] == 200 for record in good),
        "good_5xx": sum((record["status"] or 0) >= 500 for record in good),
        "bad": len(bad),
        "bad_4xx": sum(400 <= (record["status"] or 0) < 500 for record in bad),
        "by_kind": by_kind,
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
    }


def run_soak(job: SoakJob) -> dict:
    """Package, serve, warm up, soak, stop; write soak.json and soak.md; the report says whether it passed."""
    if not 0 < job.rate <= MAX_RATE:
        raise ConfigError(f"--rate must be in (0, {MAX_RATE:g}] requests/s, got {job.rate}")
    if not 0 < job.duration <= MAX_DURATION:
        raise ConfigError(f"--duration must be in (0, {MAX_DURATION:g}] s, got {job.duration}")
    if not 0 <= job.bad_fraction < 1:
        raise ConfigError(f"--bad-fraction must be in [0, 1), got {job.bad_fraction}")
    name = job.name or f"{job.model_dir.name}-soak"
    spec, _ = check_inputs(job.model_dir, job.config, name)
    if spec.task not in SOAK_TASKS:
        raise ConfigError(f"the soak sends text requests; {job.model_dir} is a {spec.task} model")
    examples = read_examples(job.data or EMBEDDED_SENTENCES, spec.task)
    timeout = float(read_yaml(job.config).get("responseTimeout", 120)) + 10
    output_dir = Path(job.output_dir or default_report_dir())
    output_dir.mkdir(parents=True, exist_ok=True)
    server = TorchServe(job.ts_config)
    require_local(server.inference_url)
    store = Path(read_properties(job.ts_config).get("model_store", "model_store"))
    package_model(job.model_dir, job.config, name, export_path=store)

    with stop_on_signals():
        server.start()
        try:
            client = ManagementClient(server.management_url, server.keys.get("management"))
            client.register(f"{name}.mar", name=name)
            url = f"{server.inference_url}/predictions/{name}"
            calls = request_stream(examples, spec.task, job.bad_fraction)
            if job.warmup:
                warmup = OpenLoop(url, server.auth(), timeout, job.rate)
                warmup.run(calls, job.warmup)
                warmup.finish()
            rss = [(0.0, worker_rss_mb(client, name))]
            started = time.monotonic()

            def sample() -> None:
                elapsed = time.monotonic() - started
                if elapsed - rss[-1][0] >= job.sample_every:
                    rss.append((elapsed, worker_rss_mb(client, name)))

            soak = OpenLoop(url, server.auth(), timeout, job.rate)
            sent = soak.run(calls, job.duration, on_tick=sample)
            soak.finish()
            rss.append((time.monotonic() - started, worker_rss_mb(client, name)))
            workers_alive = all(w["status"] == "READY" for w in client.describe(name)[0]["workers"])
        finally:
            server.stop()

    counts = summarise(soak.records, sent)
    growth = rss[-1][1] - rss[0][1]
    checks = {
        "nothing lost": counts["lost"] == 0,
        "every good request answered 200": counts["good_200"] == counts["good"],
        "every bad request answered 4xx": counts["bad_4xx"] == counts["bad"],
        f"worker RSS grew at most {job.max_rss_growth_mb:g} MB": growth <= job.max_rss_growth_mb,
        "workers READY at the end": workers_alive,
    }
    report = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "job": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(job).items()},
        "model": name,
        "task": spec.task,
        "client_timeout_s": timeout,
        "counts": counts,
        "achieved_rate": round(sent / job.duration, 2),
        "rss_mb": {
            "before": round(rss[0][1], 1),
            "after": round(rss[-1][1], 1),
            "growth": round(growth, 1),
            "max": round(max(value for _, value in rss), 1),
            "samples": [[round(t, 1), round(v, 1)] for t, v in rss],
        },  # fmt: skip
        "checks": checks,
        "passed": all(checks.values()),
        "files": {"json": str(output_dir / "soak.json"), "markdown": str(output_dir / "soak.md")},
    }
    Path(report["files"]["json"]).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    Path(report["files"]["markdown"]).write_text(render_soak(report), encoding="utf-8")
    return report


def render_soak(report: dict) -> str:
    """soak.md: what ran, the counts, memory, and each check's verdict."""
    job, counts, rss = report["job"], report["counts"], report["rss_mb"]
    lines = [
        f"# Soak of {report['model']} ({report['date']})",
        "",
        f"- {job['duration']:g} s at {job['rate']:g} requests/s (achieved {report['achieved_rate']:g}), after "
        f"{job['warmup']:g} s warm-up; {job['bad_fraction']:.0%} bad requests mixed in; client timeout "
        f"{report['client_timeout_s']:g} s",
        f"- sent {counts['sent']}, answered {counts['answered']}, lost {counts['lost']}",
        f"- good requests {counts['good']}: {counts['good_200']} answered 200, {counts['good_5xx']} 5xx; "
        f"p50 {counts['p50_ms']} ms, p95 {counts['p95_ms']} ms",
        f"- bad requests {counts['bad']}: {counts['bad_4xx']} answered 4xx",
        f"- worker RSS {rss['before']} MB → {rss['after']} MB (growth {rss['growth']} MB, max {rss['max']} MB)",
        "",
        "| request kind | outcomes |",
        "|---|---|",
    ]
    for kind, outcomes in sorted(counts["by_kind"].items()):
        lines.append(
            f"| {kind} | " + ", ".join(f"{status}: {n}" for status, n in sorted(outcomes.items())) + " |"
        )
    lines += ["", *(f"- {'PASS' if ok else 'FAIL'}: {check}" for check, ok in report["checks"].items())]
    return "\n".join(lines) + "\n"
