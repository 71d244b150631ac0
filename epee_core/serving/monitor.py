"""An anytime-valid alarm on a certified disagreement rate (docs/monitoring.md).

Audited rows give D_t = 1 when the served answer differs from full depth, else 0. Under H0: P(D_t = 1) <= epsilon,
the wealth K_t = prod_{i <= t} (1 + lambda_i (D_i - epsilon)) with bets lambda_i >= 0 chosen from D_1..D_{i-1}
only is a nonnegative supermartingale with K_0 = 1, so by Ville's inequality P(some K_t >= 1/alpha) <= alpha.
The monitor alarms the first time K_t >= 1/alpha, however long it runs.

Plain Python (no torch): the worker, `epee audit` and a study can all feed it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

BETS = ("agrapa", "plugin")
# Bets stay below cap / epsilon, so a row that agrees (D = 0) costs at most a `cap` share of the wealth.
DEFAULT_CAP = 0.5


@dataclass
class _Estimates:
    """Predictable running mean and variance of D (Waudby-Smith & Ramdas 2023, eq. 26), started at 1/2 and
    1/4 as if one pseudo-row had been seen; `mean`/`variance` hold the values after the rows counted so far."""

    rows: int = 0
    total: float = 0.0
    squared_deviations: float = 0.0
    mean: float = 0.5
    variance: float = 0.25

    def add(self, value: float) -> None:
        self.rows += 1
        self.total += value
        self.mean = (0.5 + self.total) / (self.rows + 1)
        self.squared_deviations += (value - self.mean) ** 2
        self.variance = (0.25 + self.squared_deviations) / (self.rows + 1)


class DisagreementMonitor:
    """Sequential test of H0: disagreement rate <= `epsilon`, alarming at level `alpha`.

    `bet` chooses lambda_t from the past rows only:
    - "agrapa" (default): approximate growth-rate adaptive betting, (mean - eps) / (variance + (mean - eps)^2),
      the Kelly bet to second order (Waudby-Smith & Ramdas 2023, section 5.3);
    - "plugin": the predictable plug-in bet sqrt(2 log(2/alpha) / (variance t log(1 + t))) of the same paper,
      exactly as the `ville` package's `BettingTest` computes it (used to cross-check this class).
    Both are clipped to [0, cap / epsilon]; the alarm, once raised, stays (`alarm_at` is the audited row).
    """

    def __init__(self, epsilon: float, alpha: float = 0.05, bet: str = "agrapa", cap: float = DEFAULT_CAP):
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if bet not in BETS:
            raise ValueError(f"bet must be one of {', '.join(BETS)}, got {bet!r}")
        if not 0.0 < cap < 1.0:
            raise ValueError(f"cap must be in (0, 1), got {cap!r}")
        self.epsilon = float(epsilon)
        self.alpha = float(alpha)
        self.bet = bet
        self.cap = float(cap)
        self.log_wealth = 0.0
        self.disagreements = 0
        self.alarm_at: int | None = None
        self.last_bet: float | None = None  # the lambda the latest row was bet with
        self._estimates = _Estimates()

    @property
    def audited(self) -> int:
        return self._estimates.rows

    @property
    def wealth(self) -> float:
        return math.exp(min(self.log_wealth, 700.0))

    @property
    def alarmed(self) -> bool:
        return self.alarm_at is not None

    @property
    def observed_disagreement(self) -> float | None:
        return self.disagreements / self.audited if self.audited else None

    @property
    def next_bet(self) -> float:
        """lambda for the next audited row: a function of the rows seen so far, never of the next one."""
        estimates, epsilon = self._estimates, self.epsilon
        if self.bet == "agrapa":
            excess = estimates.mean - epsilon
            raw = excess / (estimates.variance + excess**2)
        else:
            time = estimates.rows + 1
            raw = math.sqrt(2 * math.log(2 / self.alpha) / (estimates.variance * time * math.log1p(time)))
        return min(max(raw, 0.0), self.cap / epsilon)

    def update(self, disagree: bool) -> bool:
        """Add one audited row (True: the served answer differed from full depth); returns whether the monitor
        has alarmed (now or before)."""
        value = 1.0 if disagree else 0.0
        self.last_bet = self.next_bet  # fixed before `value` is used
        self.log_wealth += math.log1p(self.last_bet * (value - self.epsilon))
        self.disagreements += int(disagree)
        self._estimates.add(value)
        if self.alarm_at is None and self.log_wealth >= math.log(1.0 / self.alpha):
            self.alarm_at = self.audited
        return self.alarmed

    def state(self) -> dict[str, Any]:
        """Everything the monitor knows, as a JSON-able dict (`from_state` restores it)."""
        return {
            "epsilon": self.epsilon,
            "alpha": self.alpha,
            "bet": self.bet,
            "cap": self.cap,
            "audited": self.audited,
            "disagreements": self.disagreements,
            "observed_disagreement": self.observed_disagreement,
            "wealth": self.wealth,
            "log_wealth": self.log_wealth,
            "threshold": 1.0 / self.alpha,
            "alarm_at": self.alarm_at,
            "estimates": asdict(self._estimates),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DisagreementMonitor:
        monitor = cls(state["epsilon"], state["alpha"], state["bet"], state["cap"])
        monitor.log_wealth = float(state["log_wealth"])
        monitor.disagreements = int(state["disagreements"])
        monitor.alarm_at = state["alarm_at"]
        monitor._estimates = _Estimates(**state["estimates"])
        return monitor


def alarm_row(disagreements: Any, epsilon: float, alpha: float = 0.05, bet: str = "agrapa") -> int | None:
    """The audited row (1-based) at which a fresh monitor alarms on the sequence `disagreements`, or None."""
    monitor = DisagreementMonitor(epsilon, alpha, bet)
    for disagree in disagreements:
        if monitor.update(bool(disagree)):
            break
    return monitor.alarm_at


class ExitDriftDetector:
    """Label-free early warning: are the served exit layers still distributed as at calibration?

    H0: exit layers are independent draws from the reference distribution p0 (the calibration cache's exit-layer
    histogram, smoothed by half a row per layer). Each row multiplies by the likelihood ratio q(x) / p0(x), where
    q mixes p0 with the last `window` rows: q is fixed before the row is seen, so the ratio has mean 1 under H0.
    The Shiryaev-Roberts e-detector S_t = (S_{t-1} + 1) q(x_t) / p0(x_t) then has S_t - t a martingale under H0:
    warnings (S_t >= `mean_rows_between_false_warnings`, c) come on average at most once every c rows, and
    within the first m rows with probability at most m / c (Shin, Ramdas & Rinaldo, "E-detectors").
    A warning, not an alarm: a shifted exit profile may still agree with full depth."""

    def __init__(
        self, reference_counts: list[int], mean_rows_between_false_warnings: float = 10_000, window: int = 500
    ):
        if len(reference_counts) < 2 or min(reference_counts) < 0 or sum(reference_counts) <= 0:
            raise ValueError(
                "reference_counts: one non-negative count per layer, at least two layers, not all 0"
            )
        if mean_rows_between_false_warnings <= 1 or window < 1:
            raise ValueError("mean_rows_between_false_warnings must exceed 1 and window be at least 1")
        smoothed = [count + 0.5 for count in reference_counts]
        self.reference = [count / sum(smoothed) for count in smoothed]
        self.threshold = float(mean_rows_between_false_warnings)
        self.window = window
        self.recent: deque[int] = deque(maxlen=window)  # exit layers (1-based) of the last `window` rows
        self.recent_counts = [0] * len(reference_counts)  # how often each layer occurs in `recent`
        self.log_detector = -math.inf  # log S_t, S_0 = 0
        self.rows = 0
        self.first_warning_at: int | None = None

    @property
    def detector(self) -> float:
        """S_t, the value to export as a gauge."""
        return math.exp(min(self.log_detector, 700.0))

    @property
    def warning(self) -> bool:
        return self.log_detector >= math.log(self.threshold)

    def alternative(self, exit_layer: int) -> float:
        """q(exit_layer): p0 mixed with the recent rows, as fixed before the next row (prior weight: 50 rows)."""
        prior_weight = 50.0
        recent = self.recent_counts[exit_layer - 1]
        return (prior_weight * self.reference[exit_layer - 1] + recent) / (prior_weight + len(self.recent))

    def update(self, exit_layer: int) -> bool:
        """Add one served row's exit layer (1-based); returns whether the detector warns now."""
        if not 1 <= exit_layer <= len(self.reference):
            raise ValueError(f"exit_layer must be in 1..{len(self.reference)}, got {exit_layer}")
        ratio = self.alternative(exit_layer) / self.reference[exit_layer - 1]
        self.log_detector = _log_add_one(self.log_detector) + math.log(ratio)
        if len(self.recent) == self.window:
            self.recent_counts[self.recent[0] - 1] -= 1
        self.recent.append(exit_layer)
        self.recent_counts[exit_layer - 1] += 1
        self.rows += 1
        if self.warning and self.first_warning_at is None:
            self.first_warning_at = self.rows
        return self.warning


def _log_add_one(log_value: float) -> float:
    """log(exp(log_value) + 1), stable for large values."""
    return log_value + math.log1p(math.exp(-log_value)) if log_value > 0 else math.log1p(math.exp(log_value))
