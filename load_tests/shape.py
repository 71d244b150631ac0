"""The clinical day as a load curve: users over time for a given peak and total duration (no Locust import).

A day in a hospital, compressed into `duration` seconds: a morning ramp as clinics open, steady clinic hours,
a burst at full peak (the ward round / a batch of discharge letters), back to clinic level, then an evening tail.
The curve is piecewise linear between the points below (time and users as fractions of the duration and peak),
so the same shape runs with 4 users for 2 minutes on a laptop and with 400 users for an hour elsewhere.
"""

from __future__ import annotations

# (fraction of the duration, fraction of the peak users, name of the phase that ends there)
CLINICAL_DAY = (
    (0.00, 0.10, "start"),
    (0.20, 0.60, "morning ramp"),
    (0.50, 0.60, "clinic hours"),
    (0.55, 1.00, "ward-round burst"),
    (0.70, 1.00, "ward-round burst"),
    (0.75, 0.60, "afternoon clinic"),
    (0.85, 0.60, "afternoon clinic"),
    (1.00, 0.10, "evening tail"),
)
MAX_PEAK_USERS = 2000  # hard bounds: a run never grows past these, whatever it is asked
MAX_DURATION_SECONDS = 3 * 3600


def check_bounds(peak_users: int, duration: float) -> None:
    """Refuse a run that is not bounded in users and time."""
    if not 1 <= peak_users <= MAX_PEAK_USERS:
        raise ValueError(f"peak users must be between 1 and {MAX_PEAK_USERS}, got {peak_users}")
    if not 0 < duration <= MAX_DURATION_SECONDS:
        raise ValueError(f"duration must be between 1 and {MAX_DURATION_SECONDS} s, got {duration}")


def users_at(elapsed: float, peak_users: int, duration: float) -> int | None:
    """Users wanted `elapsed` seconds into the run (at least 1), or None once the run is over."""
    if elapsed >= duration:
        return None
    position = max(elapsed, 0.0) / duration
    for (start, start_users, _), (end, end_users, _) in zip(CLINICAL_DAY, CLINICAL_DAY[1:]):
        if position <= end:
            fraction = start_users + (end_users - start_users) * (position - start) / (end - start)
            return max(1, round(fraction * peak_users))
    return max(1, round(CLINICAL_DAY[-1][1] * peak_users))


def phase_at(elapsed: float, duration: float) -> str:
    """The name of the phase `elapsed` seconds into the run (for plots and logs)."""
    position = elapsed / duration
    return next((name for end, _, name in CLINICAL_DAY[1:] if position <= end), CLINICAL_DAY[-1][2])
