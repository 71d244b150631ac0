"""`epee loadtest`: bounded headless Locust runs against a local TorchServe, the SLO check, and the side-by-side
comparison of EPEE and full depth on one real server.

Locust runs as a subprocess (`locust -f load_tests/locustfile.py --headless ...`), so the engine never imports
it; its output goes to a log file. Every run is bounded (peak users, duration, worker processes, hosts, and a kill
of Locust and its workers after a grace period) and only ever targets 127.0.0.1 (checked here and again by the
locustfile).

Distributed runs: `processes` > 0 is Locust's own `--processes N`, a master and N worker processes in one command
(the master binds its port on 127.0.0.1 only); `hosts` spreads the users over several replicas, each user keeping
one host for its life (round robin, offset by the worker's index).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

from .locust_stats import AGGREGATED, RunStats, check_slo, load_slo, read_stats

LOAD_TESTS_DIR = Path(__file__).resolve().parents[2] / "load_tests"  # the repository's, next to epee_core
LOCUSTFILE = LOAD_TESTS_DIR / "locustfile.py"
DEFAULT_SLO = LOAD_TESTS_DIR / "slo.yaml"
LOCAL_HOST = "127.0.0.1"
GRACE_SECONDS = 60  # a Locust run still alive this long after its shape ended is killed
MAX_PROCESSES = 16  # worker processes of one distributed run
MAX_HOSTS = 32  # replicas one run spreads its users over
USER_KINDS = {  # task → the locustfile option naming the model its user class calls
    "text-classification": "--text-model",
    "multi-label": "--text-model",
    "relation-extraction": "--relation-model",
    "image-classification": "--image-model",
}


class LoadTestError(RuntimeError):
    """A load test that could not run (refused host, Locust missing or crashed); the message says why."""


def require_local(url: str) -> None:
    """Refuse any target but http://127.0.0.1:PORT."""
    parsed = urlparse(url)
    if parsed.scheme != "http" or parsed.hostname != LOCAL_HOST:
        raise LoadTestError(f"{url}: load tests only target http://{LOCAL_HOST}:PORT")


def check_distribution(processes: int, hosts: list[str]) -> None:
    """Refuse a distributed run out of bounds or aimed at anything but 127.0.0.1."""
    if not 0 <= processes <= MAX_PROCESSES:
        raise LoadTestError(
            f"--processes must be between 0 (one process) and {MAX_PROCESSES}, got {processes}"
        )
    if len(hosts) > MAX_HOSTS:
        raise LoadTestError(f"at most {MAX_HOSTS} hosts per run, got {len(hosts)}")
    if len(set(hosts)) != len(hosts):
        raise LoadTestError(f"a host is named twice: {', '.join(hosts)}")
    for host in hosts:
        require_local(host)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the Locust master of a distributed run)."""
    with socket.socket() as probe:
        probe.bind((LOCAL_HOST, 0))
        return probe.getsockname()[1]


def locust_executable() -> str:
    """`locust` next to this Python, else from PATH."""
    beside = Path(sys.executable).parent / "locust"
    found = str(beside) if beside.is_file() else shutil.which("locust")
    if not found:
        raise LoadTestError("locust not found: pip install locust")
    return found


@dataclass
class LoadRun:
    """One headless Locust run of the clinical-day shape: `models` maps a locustfile model option
    (`--text-model`, ...) to a model name; the other user classes are switched off."""

    host: str
    models: dict[str, str]
    peak_users: int
    duration: int  # seconds
    prefix: Path  # PREFIX_stats.csv, PREFIX_stats_history.csv, PREFIX.html, PREFIX_locust.log
    policy_override: str = ""
    inference_key: str | None = None
    data_dir: str | None = None  # the locustfile's default: data
    locustfile: Path = LOCUSTFILE
    processes: int = 0  # > 0: Locust's --processes, a master and this many workers
    hosts: list[str] = field(default_factory=list)  # replicas to spread users over (default: `host` alone)
    master_port: int | None = None  # the master's port on 127.0.0.1 (default: a free one)
    platform: str = "torchserve"  # or "kserve": OIP v2 requests to `epee serve` (load_tests/locustfile.py)

    @property
    def log_file(self) -> Path:
        return Path(f"{self.prefix}_locust.log")

    @property
    def html_file(self) -> Path:
        return Path(f"{self.prefix}.html")

    def command(self) -> list[str]:
        models = {option: "" for option in set(USER_KINDS.values())} | self.models
        model_args = [f"{option}={name}" for option, name in sorted(models.items())]
        return [
            locust_executable(),
            "-f", str(self.locustfile),
            "--headless",
            "--host", self.host,
            "--users", str(self.peak_users),
            "--run-time", f"{self.duration}s",
            "--csv", str(self.prefix),
            "--csv-full-history",
            "--html", str(self.html_file),
            "--only-summary",
            f"--policy-override={self.policy_override}",
            f"--platform={self.platform}",
            *([f"--data-dir={self.data_dir}"] if self.data_dir else []),
            *([f"--target-hosts={','.join(self.hosts)}"] if self.hosts else []),
            *self.distribution_args(),
            *model_args,
        ]  # fmt: skip

    def distribution_args(self) -> list[str]:
        """Locust's master + workers in one command; the master listens on 127.0.0.1 only."""
        if not self.processes:
            return []
        port = str(self.master_port or free_port())
        return ["--processes", str(self.processes), "--master-bind-host", LOCAL_HOST, "--master-bind-port", port,
                "--master-host", LOCAL_HOST, "--master-port", port]  # fmt: skip


def run_locust(run: LoadRun) -> int:
    """Run Locust to the end of its shape (output in `run.log_file`) and return its exit code (1 = some
    requests failed). Killed after the grace period, and on Ctrl-C / any error here, with the workers of a
    distributed run."""
    require_local(run.host)
    check_distribution(run.processes, run.hosts)
    if not run.locustfile.is_file():
        raise LoadTestError(f"{run.locustfile}: locustfile not found (pass --locustfile)")
    run.prefix.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if run.inference_key:
        env["EPEE_INFERENCE_KEY"] = run.inference_key
    with run.log_file.open("wb") as log:
        process = subprocess.Popen(
            run.command(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C handling stops it, in order
        )
        try:
            code = process.wait(timeout=run.duration + GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            raise LoadTestError(
                f"Locust overran {run.duration} s + {GRACE_SECONDS} s; see {run.log_file}"
            ) from None
        finally:
            _stop_group(process)
    if code not in (0, 1) or not Path(f"{run.prefix}_stats.csv").is_file():
        tail = "\n".join(run.log_file.read_text(errors="replace").splitlines()[-8:])
        raise LoadTestError(f"Locust stopped with exit code {code}; see {run.log_file}:\n{tail}")
    return code


def _stop_group(process: subprocess.Popen) -> None:
    """Stop a Locust we started that is still running, and the worker processes it forked (a master that exits
    by itself has already waited for its workers)."""
    if process.poll() is not None:
        return
    try:
        workers = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for worker in workers:  # psutil checks each is still the process we saw, not a reused pid
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass


def default_report_dir() -> Path:
    """load_tests/reports/<date>/ (git-ignored): bench, load-test and comparison reports of one day together."""
    return Path("load_tests") / "reports" / datetime.now().strftime("%Y-%m-%d")


def stats_result(prefix: str | Path, slo_path: str | Path | None) -> dict:
    """A finished run's aggregated and per-request stats, checked against the SLO file (None: no objectives)."""
    slo = load_slo(slo_path) if slo_path else {}
    stats = read_stats(prefix)
    violations = check_slo(stats[AGGREGATED], slo) if slo_path else []
    return {
        "stats": stats[AGGREGATED].as_dict(),
        "by_request": {name: row.as_dict() for name, row in stats.items() if name != AGGREGATED},
        "slo": {"file": str(slo_path) if slo_path else None, **slo},
        "slo_violations": violations,
        "passed": not violations,
        "files": {
            "stats_csv": f"{prefix}_stats.csv",
            "history_csv": f"{prefix}_stats_history.csv",
            "html": f"{prefix}.html",
            "log": f"{prefix}_locust.log",
        },
    }


def run_slo_check(run: LoadRun, slo_path: str | Path | None) -> dict:
    """Run Locust, then check the run against the SLO file (read first, so a bad file fails before the run)."""
    if slo_path:
        load_slo(slo_path)
    run_locust(run)
    return {
        "host": run.host,
        "hosts": run.hosts or [run.host],
        "processes": run.processes,
        "models": run.models,
        "policy_override": run.policy_override or None,
        "platform": run.platform,
        "peak_users": run.peak_users,
        "duration_seconds": run.duration,
        **stats_result(run.prefix, slo_path),
    }


def render_slo_check(result: dict) -> str:
    stats = RunStats(**{k: v for k, v in result["stats"].items() if k != "failure_rate"})
    lines = [
        f"{stats.requests} requests, {stats.failures} failed ({stats.failure_rate:.2%}), {stats.rps:.2f} req/s; "
        f"latency p50 {stats.p50_ms:.0f} ms, p95 {stats.p95_ms:.0f} ms, p99 {stats.p99_ms:.0f} ms",
    ]
    if result["slo"]["file"]:
        verdict = "met" if result["passed"] else "VIOLATED: " + "; ".join(result["slo_violations"])
        lines.append(f"SLO ({result['slo']['file']}): {verdict}")
    lines.append("report: " + ", ".join(result["files"].values()))
    return "\n".join(lines)


# --- server-side evidence: the EPEE counters on the metrics endpoint --------------------------------------------

_METRIC_LINE = re.compile(r"^(\w+)\{(.*)\}\s+([0-9.eE+-]+)$")


def model_counters(metrics_url: str, model: str) -> dict:
    """The EPEE counters of one model on TorchServe's Prometheus endpoint: requests answered, layers run, and
    batches by size (what TorchServe's dynamic batching formed)."""
    try:
        text = requests.get(f"{metrics_url}/metrics", timeout=10).text
    except requests.RequestException as error:
        raise LoadTestError(f"cannot read TorchServe's metrics at {metrics_url}: {error}") from None
    counters = {"requests": 0.0, "layers_run": 0.0, "batches": {}}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if not match:
            continue
        name, value = match.group(1), float(match.group(3))
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if labels.get("ModelName") != model:
            continue
        if name == "EpeeExitLayerRequests":
            counters["requests"] += value
        elif name == "EpeeLayersRun":
            counters["layers_run"] += value
        elif name == "EpeeBatches":
            size = int(labels["BatchSize"])
            counters["batches"][size] = counters["batches"].get(size, 0.0) + value
    return counters


def counters_delta(before: dict, after: dict) -> dict:
    """What one run added: requests, average exit layer and average batch size seen by the handler."""
    requests_run = after["requests"] - before["requests"]
    batches = {size: after["batches"][size] - before["batches"].get(size, 0.0) for size in after["batches"]}
    num_batches = sum(batches.values())
    return {
        "server_requests": int(requests_run),
        "avg_exit_layer": round((after["layers_run"] - before["layers_run"]) / requests_run, 3)
        if requests_run
        else None,
        "avg_batch_size": round(sum(size * count for size, count in batches.items()) / num_batches, 2)
        if num_batches
        else None,
    }


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (as Ctrl-C already is), so `finally` blocks stop the server."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
