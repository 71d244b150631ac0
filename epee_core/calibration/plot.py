"""The Pareto plot: metric vs average exit layer for every setting, frontier highlighted, choice marked."""

from __future__ import annotations

from pathlib import Path

from ..engine.policies import POLICIES
from .search import Setting


def plot_frontier(
    path: str | Path,
    settings: list[Setting],
    frontier: list[Setting],
    full: Setting,
    oracle: Setting,
    chosen: Setting,
    metric: str,
    max_drop: float | None,
    title: str,
) -> None:
    """Write a PNG of the calibration-slice sweep; the chosen setting's held-back score is drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 5.5), dpi=120)
    for name, rule in POLICIES.items():
        points = [s.calibration for s in settings if s.policy.name == name]
        if points:
            axes.scatter(
                [p.avg_exit_layer for p in points],
                [p.metric for p in points],
                s=16,
                alpha=0.6,
                color=rule.style.colour,
                marker=rule.style.marker,
                zorder=3,
                label=f"{name} ({len(points)})",
            )
    axes.plot(
        [s.calibration.avg_exit_layer for s in frontier],
        [s.calibration.metric for s in frontier],
        "-o",
        color="black",
        markerfacecolor="none",
        markersize=8,
        linewidth=2,
        alpha=0.7,
        zorder=2,
        label=f"Pareto frontier ({len(frontier)})",
    )
    if max_drop is not None:
        axes.axhline(
            full.calibration.metric - max_drop,
            color="tab:red",
            linestyle=":",
            linewidth=1,
            label=f"budget (full − {max_drop})",
        )
    for setting in (full, oracle):
        point, name = setting.calibration, setting.policy.name
        axes.scatter(
            point.avg_exit_layer,
            point.metric,
            marker=POLICIES[name].style.marker,
            s=70,
            color=POLICIES[name].style.colour,
            edgecolor="black",
            zorder=5,
            label=f"{name} ({point.metric:.3f} @ {point.avg_exit_layer:.2f})",
        )

    def star(point, label: str, **style) -> None:
        axes.scatter(
            point.avg_exit_layer, point.metric, marker="*", edgecolor="black", zorder=6, label=label, **style
        )

    star(chosen.calibration, f"chosen: {chosen.policy.describe()}", s=260, color="gold")
    if chosen.held_back is not None:
        held = chosen.held_back
        star(held, f"chosen on held-back slice ({held.metric:.3f})", s=200, facecolor="none")
    axes.set_xlabel("average exit layer (lower is faster)")
    axes.set_ylabel(f"{metric} (calibration slice)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    # Settings far below full and oracle (e.g. `static` at layer 1 of a weak model) would squash the frontier.
    crop = min(oracle.calibration.metric, full.calibration.metric) - 0.15
    bottom = max(crop, min(s.calibration.metric for s in [*settings, full]))
    if max_drop is not None:
        bottom = min(bottom, full.calibration.metric - max_drop)
    axes.set_ylim(bottom=bottom - 0.01)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
