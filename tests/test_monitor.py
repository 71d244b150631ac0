"""The disagreement monitor (serving/monitor.py): validity under H0 (false alarms at most alpha), predictable
bets, detection after a switch, and a cross-check against the independent `ville` package."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from epee_core.serving.monitor import DisagreementMonitor, ExitDriftDetector, alarm_row

EPSILON = 0.01
ALPHA = 0.05
STREAMS = 200
ROWS = 2000
SWITCH_AT = 1000  # audited rows before a detection stream switches to a higher disagreement rate


def false_alarms(make_monitor, disagreement_rate: float, seed: int = 0) -> int:
    """Alarms over `STREAMS` seeded Bernoulli(`disagreement_rate`) streams of `ROWS` audited rows."""
    rng = np.random.default_rng(seed)
    alarms = 0
    for _ in range(STREAMS):
        monitor = make_monitor()
        for disagree in rng.random(ROWS) < disagreement_rate:
            if monitor.update(bool(disagree)):
                alarms += 1
                break
    return alarms


# Alarms a valid monitor stays under at level alpha, binomial noise included (exceeded with probability 1e-3).
MOST_FALSE_ALARMS = int(stats.binom.ppf(0.999, STREAMS, ALPHA))


class LookAheadMonitor(DisagreementMonitor):
    """A wrong monitor for the tests: it sizes each bet after seeing the row (all in on a disagreement)."""

    def update(self, disagree: bool) -> bool:
        self.cap_now = self.cap / self.epsilon if disagree else 0.0
        return super().update(disagree)

    @property
    def next_bet(self) -> float:
        return getattr(self, "cap_now", 0.0)


@pytest.mark.parametrize("bet", ["agrapa", "plugin"])
@pytest.mark.parametrize("disagreement_rate", [EPSILON, EPSILON / 2])
def test_false_alarms_stay_within_alpha_under_h0(bet, disagreement_rate):
    alarms = false_alarms(lambda: DisagreementMonitor(EPSILON, ALPHA, bet), disagreement_rate)
    assert alarms <= MOST_FALSE_ALARMS


def test_the_false_alarm_check_catches_a_look_ahead_bet():
    alarms = false_alarms(lambda: LookAheadMonitor(EPSILON, ALPHA), EPSILON)
    assert alarms > MOST_FALSE_ALARMS


@pytest.mark.parametrize("bet", ["agrapa", "plugin"])
def test_the_bet_on_a_row_is_fixed_before_the_row_is_seen(bet):
    """Same history, two different next rows: both are bet with the lambda announced before either, and the
    wealth moves by exactly 1 + lambda (D - epsilon). A look-ahead bet fails this (see the next test)."""
    monitor = DisagreementMonitor(EPSILON, ALPHA, bet)
    for disagree in np.random.default_rng(1).random(300) < 0.03:
        monitor.update(bool(disagree))
    announced = monitor.next_bet
    assert announced > 0
    for disagree in (False, True):
        branch = copy.deepcopy(monitor)
        branch.update(disagree)
        assert branch.last_bet == announced
        assert branch.wealth == pytest.approx(monitor.wealth * (1 + announced * (disagree - EPSILON)))


def test_the_predictability_check_catches_a_look_ahead_bet():
    monitor = LookAheadMonitor(EPSILON, ALPHA)
    used = []
    for disagree in (False, True):
        branch = copy.deepcopy(monitor)
        branch.update(disagree)
        used.append(branch.last_bet)
    assert used[0] != used[1]


def test_bets_stay_in_zero_to_cap_over_epsilon():
    monitor = DisagreementMonitor(EPSILON, ALPHA)
    for disagree in [True] * 50 + [False] * 500:
        monitor.update(disagree)
        assert 0.0 <= monitor.last_bet <= monitor.cap / EPSILON


def detection_stream(multiple: float, rng: np.random.Generator, rows_after: int = 20_000) -> np.ndarray:
    """`SWITCH_AT` audited rows at the certified rate (the boundary of H0), then `multiple` times that rate."""
    before = rng.random(SWITCH_AT) < EPSILON
    return np.concatenate([before, rng.random(rows_after) < multiple * EPSILON])


def detection_delays(multiple: float, runs: int, seed: int = 0) -> tuple[int, list[int | None]]:
    """(alarms before the switch, audited rows from the switch to the alarm per run; None: no alarm)."""
    rng = np.random.default_rng(seed)
    early, delays = 0, []
    for _ in range(runs):
        alarm = alarm_row(detection_stream(multiple, rng), EPSILON, ALPHA)
        early += alarm is not None and alarm <= SWITCH_AT
        delays.append(None if alarm is None else alarm - SWITCH_AT)
    return early, delays


def test_a_switch_to_higher_disagreement_alarms_after_it_and_sooner_the_higher_it_is():
    runs, medians = 40, []
    for multiple in (2, 3, 5):
        early, delays = detection_delays(multiple, runs, seed=multiple)
        assert early <= MOST_FALSE_ALARMS * runs / STREAMS
        detected = [delay for delay in delays if delay is not None and delay > 0]
        assert len(detected) >= 0.9 * runs
        medians.append(np.median(detected))
    assert medians[0] > medians[1] > medians[2]


def test_state_is_json_and_restores_the_monitor():
    monitor = DisagreementMonitor(EPSILON, ALPHA)
    for disagree in [False] * 40 + [True] * 3:
        monitor.update(disagree)
    state = json.loads(json.dumps(monitor.state()))
    restored = DisagreementMonitor.from_state(state)
    assert restored.state() == monitor.state()
    assert restored.next_bet == monitor.next_bet
    assert state["audited"] == 43 and state["observed_disagreement"] == pytest.approx(3 / 43)


def test_the_alarm_stays_raised_and_records_its_row():
    monitor = DisagreementMonitor(EPSILON, ALPHA)
    raised = [monitor.update(True) for _ in range(20)]
    first = raised.index(True)
    assert all(raised[first:]) and monitor.alarm_at == first + 1
    assert monitor.update(False)  # still alarmed after an agreeing row


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1])
def test_epsilon_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match="epsilon"):
        DisagreementMonitor(value)


# --- cross-check against the independent `ville` package ------------------------------------------------------


def test_plugin_bet_wealth_equals_villes_betting_test():
    """`ville.BettingTest(m0, alternative="greater")` implements the predictable plug-in bet of Waudby-Smith &
    Ramdas; our `bet="plugin"` must give the same log-wealth row by row (same estimates, same clipping at
    c / m0), hence the same alarm row. Our default, aGRAPA, is a different rule: see the next test."""
    ville = pytest.importorskip("ville")
    disagreements = np.random.default_rng(7).random(3000) < 0.025
    monitor = DisagreementMonitor(EPSILON, ALPHA, bet="plugin")
    ours = []
    for disagree in disagreements:
        monitor.update(bool(disagree))
        ours.append(monitor.log_wealth)
    theirs = ville.BettingTest(EPSILON, alternative="greater", alpha=ALPHA, c=monitor.cap).fit(
        disagreements.astype(float)
    )
    np.testing.assert_allclose(ours, theirs.log_e_values_, rtol=1e-9, atol=1e-9)
    assert monitor.alarm_at == theirs.stopping_time() is not None


def test_agrapa_and_villes_test_reject_a_violating_stream_at_similar_times_and_h0_streams_rarely():
    """aGRAPA (ours) and ville's plug-in bet are different rules: they need not agree row by row. On 3x the
    certified rate both must alarm, within a factor 3 of each other in median; on H0 streams both stay within
    the false-alarm bound."""
    ville = pytest.importorskip("ville")
    rng = np.random.default_rng(11)
    ours, theirs = [], []
    for _ in range(30):
        stream = (rng.random(8000) < 3 * EPSILON).astype(float)
        ours.append(alarm_row(stream, EPSILON, ALPHA))
        theirs.append(
            ville.BettingTest(EPSILON, alternative="greater", alpha=ALPHA).fit(stream).stopping_time()
        )
    assert None not in ours and None not in theirs
    assert 1 / 3 < np.median(ours) / np.median(theirs) < 3
    h0_alarms = sum(
        ville.BettingTest(EPSILON, alternative="greater", alpha=ALPHA)
        .fit((rng.random(ROWS) < EPSILON).astype(float))
        .stopping_time()
        is not None
        for _ in range(STREAMS)
    )
    assert h0_alarms <= MOST_FALSE_ALARMS


# --- the label-free exit-layer drift detector -------------------------------------------------------------------

REFERENCE = [600, 250, 100, 50]  # exit-layer counts of a calibration cache: most rows leave early
DRIFTED = [0.1, 0.2, 0.3, 0.4]  # the traffic moved: most rows now run deep


def exit_layers(probabilities, rows: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(
        np.arange(1, len(probabilities) + 1), size=rows, p=np.asarray(probabilities) / np.sum(probabilities)
    )


def test_drift_warnings_within_m_rows_stay_below_m_over_c_without_drift():
    """Doob's inequality on the e-detector: P(warning within m rows) <= m / c; here m / c = 0.1."""
    rng = np.random.default_rng(3)
    warned = 0
    for _ in range(STREAMS):
        detector = ExitDriftDetector(REFERENCE, mean_rows_between_false_warnings=10_000)
        warned += any(detector.update(int(layer)) for layer in exit_layers(REFERENCE, 1000, rng))
    assert warned <= stats.binom.ppf(0.999, STREAMS, 0.1)


def test_drift_in_the_exit_layers_warns_soon_after_it_starts():
    rng = np.random.default_rng(4)
    detector = ExitDriftDetector(REFERENCE, mean_rows_between_false_warnings=10_000)
    for layer in exit_layers(REFERENCE, 1000, rng):
        detector.update(int(layer))
    assert detector.first_warning_at is None
    for layer in exit_layers(DRIFTED, 1000, rng):
        detector.update(int(layer))
    assert detector.first_warning_at is not None and 1000 < detector.first_warning_at < 1300


def test_the_drift_ratio_for_a_row_is_fixed_before_the_row():
    """The likelihood ratio used on a row comes from the rows before it: S_t = (S_{t-1} + 1) q(x) / p0(x) with
    q announced before x, whatever x is."""
    detector = ExitDriftDetector(REFERENCE, window=50)
    for layer in exit_layers(DRIFTED, 80, np.random.default_rng(5)):
        detector.update(int(layer))
    for layer in (1, 4):
        announced = detector.alternative(layer) / detector.reference[layer - 1]
        branch = copy.deepcopy(detector)
        branch.update(layer)
        assert branch.detector == pytest.approx((detector.detector + 1) * announced)


# --- streams resampled from a real exit cache ----------------------------------------------------------------------

REAL_CACHE = Path(__file__).parent / "fixtures" / "monitor" / "ade_minilm_dev.json"


def resampled_false_alarms(make_monitor, rows: int = ROWS, seed: int = 0) -> int:
    """Alarms over `STREAMS` streams of audited rows drawn with replacement from the real cache's per-row
    disagreements: in-distribution traffic for the policy certified on that cache."""
    cache = json.loads(REAL_CACHE.read_text())
    disagree = np.array(cache["disagree"], dtype=bool)
    rng = np.random.default_rng(seed)
    alarms = 0
    for _ in range(STREAMS):
        monitor = make_monitor(cache["epsilon"])
        for value in rng.choice(disagree, rows):
            if monitor.update(bool(value)):
                alarms += 1
                break
    return alarms


def test_resampled_real_streams_alarm_in_at_most_alpha_of_them():
    assert resampled_false_alarms(lambda epsilon: DisagreementMonitor(epsilon, ALPHA)) <= MOST_FALSE_ALARMS


def test_on_resampled_real_streams_a_look_ahead_bet_fails_the_false_alarm_check():
    assert resampled_false_alarms(lambda epsilon: LookAheadMonitor(epsilon, ALPHA)) > MOST_FALSE_ALARMS
