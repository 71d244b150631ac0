"""Latency over time of load-test runs side by side (matplotlib, written as PNG)."""

from __future__ import annotations

import math
from pathlib import Path

COLORS = {"epee": "tab:green", "full": "tab:red", "continuous-epee": "tab:blue"}


def _points(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Drop the seconds that have no value yet (NaN before the first answer)."""
    kept = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def plot_latency(histories: dict[str, dict[str, list[float]]], path: str | Path, title: str) -> Path:
    """Two panels over seconds since each run's start: p50/p95 latency (rolling window), then requests/s with
    the number of users (the load shape). `histories` maps a run label to `locust_stats.read_history`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency_axis, rate_axis) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(3, 2))
    users_axis = rate_axis.twinx()
    for label, history in histories.items():
        color = COLORS.get(label)
        seconds = history["seconds"]
        latency_axis.plot(*_points(seconds, history["p95_ms"]), color=color, label=f"{label} p95")
        latency_axis.plot(
            *_points(seconds, history["p50_ms"]), color=color, linestyle=":", label=f"{label} p50"
        )
        rate_axis.plot(*_points(seconds, history["rps"]), color=color, label=f"{label} requests/s")
        users_axis.plot(
            seconds, history["users"], color=color, linestyle="--", alpha=0.4, label=f"{label} users"
        )
    latency_axis.set_ylabel("latency, ms (Locust's rolling window)")
    latency_axis.set_ylim(bottom=0)
    latency_axis.grid(alpha=0.3)
    latency_axis.legend(loc="upper left", fontsize="small")
    latency_axis.set_title(title, fontsize="medium")
    rate_axis.set_ylabel("requests/s")
    rate_axis.set_ylim(bottom=0)
    rate_axis.set_xlabel("seconds since the run started")
    rate_axis.grid(alpha=0.3)
    users_axis.set_ylabel("users (dashed)")
    users_axis.set_ylim(bottom=0)
    handles = rate_axis.get_legend_handles_labels()[0] + users_axis.get_legend_handles_labels()[0]
    rate_axis.legend(handles=handles, loc="upper left", fontsize="small")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
