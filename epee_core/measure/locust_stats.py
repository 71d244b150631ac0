"""Reading a headless Locust run's CSV files and checking them against service-level objectives (SLO).

Locust writes `PREFIX_stats.csv` (one row per request name and an `Aggregated` row) and, with
`--csv-full-history`, `PREFIX_stats_history.csv` (one row a second; percentiles there are over a recent window).
This module only parses those files: it never imports Locust.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engine.spec import ConfigError, read_yaml

AGGREGATED = "Aggregated"
SLO_KEYS = {
    "p95_ms": "95th percentile latency must stay at or below this many ms",
    "p99_ms": "99th percentile latency must stay at or below this many ms",
    "max_failure_rate": "failed requests / all requests must stay at or below this (0.01 = 1 %)",
    "min_rps": "requests per second over the whole run must reach at least this",
}


@dataclass
class RunStats:
    """The aggregated numbers of one run (latencies in ms)."""

    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    max_ms: float

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "failure_rate": round(self.failure_rate, 6)}


def _number(value: str) -> float:
    return float("nan") if value in ("", "N/A") else float(value)


def _window_latency(value: str) -> float:
    """A history percentile; Locust writes 0 (or N/A) while its rolling window holds no response yet."""
    latency = _number(value)
    return float("nan") if latency == 0 else latency


def read_stats(prefix: str | Path) -> dict[str, RunStats]:
    """Every row of `PREFIX_stats.csv` by request name (the totals are under 'Aggregated')."""
    path = Path(f"{prefix}_stats.csv")
    if not path.is_file():
        raise ConfigError(f"{path}: Locust stats not found (run Locust with --csv {prefix})")
    rows = {}
    with path.open(newline="", encoding="utf-8") as stats:
        for row in csv.DictReader(stats):
            rows[row["Name"]] = RunStats(
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                rps=_number(row["Requests/s"]),
                p50_ms=_number(row["50%"]),
                p95_ms=_number(row["95%"]),
                p99_ms=_number(row["99%"]),
                avg_ms=_number(row["Average Response Time"]),
                max_ms=_number(row["Max Response Time"]),
            )
    if AGGREGATED not in rows:
        raise ConfigError(f"{path}: no '{AGGREGATED}' row: not a Locust stats file")
    return rows


def read_history(prefix: str | Path) -> dict[str, list[float]]:
    """The per-second `Aggregated` rows of `PREFIX_stats_history.csv` as columns: seconds since the first row,
    users, rps, p50_ms, p95_ms, failures (cumulative). Seconds whose window has no response yet hold NaN."""
    path = Path(f"{prefix}_stats_history.csv")
    if not path.is_file():
        raise ConfigError(f"{path}: Locust history not found (run Locust with --csv-full-history)")
    columns: dict[str, list[float]] = {
        key: [] for key in ("seconds", "users", "rps", "p50_ms", "p95_ms", "failures")
    }
    with path.open(newline="", encoding="utf-8") as history:
        rows = [row for row in csv.DictReader(history) if row["Name"] == AGGREGATED]
    if not rows:
        return columns
    start = int(rows[0]["Timestamp"])
    for row in rows:
        columns["seconds"].append(float(int(row["Timestamp"]) - start))
        columns["users"].append(float(row["User Count"]))
        columns["rps"].append(_number(row["Requests/s"]))
        columns["p50_ms"].append(_window_latency(row["50%"]))
        columns["p95_ms"].append(_window_latency(row["95%"]))
        columns["failures"].append(float(row["Total Failure Count"]))
    return columns


def load_slo(path: str | Path) -> dict[str, float]:
    """An SLO file: any of p95_ms, p99_ms, max_failure_rate, min_rps, each a non-negative number."""
    data = read_yaml(path)
    slo = {}
    for key, value in data.items():
        if key not in SLO_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}' (expected: {', '.join(SLO_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{path}: '{key}' must be a non-negative number, got {value!r}")
        slo[key] = float(value)
    return slo


def check_slo(stats: RunStats, slo: dict[str, float]) -> list[str]:
    """The objectives `stats` violates, one sentence each; [] when all hold. A run without requests fails."""
    if stats.requests == 0:
        return ["no request was made"]
    violations = []
    if "p95_ms" in slo and not stats.p95_ms <= slo["p95_ms"]:
        violations.append(f"p95 latency {stats.p95_ms:.0f} ms > {slo['p95_ms']:.0f} ms")
    if "p99_ms" in slo and not stats.p99_ms <= slo["p99_ms"]:
        violations.append(f"p99 latency {stats.p99_ms:.0f} ms > {slo['p99_ms']:.0f} ms")
    if "max_failure_rate" in slo and stats.failure_rate > slo["max_failure_rate"]:
        violations.append(
            f"failure rate {stats.failure_rate:.2%} ({stats.failures} of {stats.requests}) "
            f"> {slo['max_failure_rate']:.2%}"
        )
    if "min_rps" in slo and not stats.rps >= slo["min_rps"]:
        violations.append(f"throughput {stats.rps:.2f} requests/s < {slo['min_rps']:.2f}")
    return violations
