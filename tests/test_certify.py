"""Certified selection (calibration/certify.py): the bounds against scipy and by simulation, the monotone
coupling the exact test rests on, Learn-then-Test's fixed sequence and fallback, and the guarantee itself on
synthetic exit caches with a known population risk per setting, where the uncertified choice (fastest setting
within ε on the calibration rows) is shown to break it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from epee_core.calibration.certify import (
    _statistic_cdf,
    binomial_lower,
    binomial_pvalue,
    binomial_upper,
    certify,
    exact_pvalue,
    exact_upper,
    min_test_rows,
    paired_losses,
    risk_path,
    risk_pvalue,
    risk_upper,
    selection_from_cache,
    split_rows,
    union_pvalue,
    union_upper,
)

# --- bounds ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n, delta", [(0, 50, 0.1), (3, 100, 0.05), (17, 400, 0.1), (99, 100, 0.2)])
def test_clopper_pearson_matches_scipy(k, n, delta):
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * delta, method="exact")
    assert binomial_upper(k, n, delta) == pytest.approx(interval.high, abs=1e-9)
    assert binomial_lower(k, n, delta) == pytest.approx(interval.low, abs=1e-9)
    assert binomial_upper(0, n, delta) == pytest.approx(1 - delta ** (1 / n))
    for epsilon in (0.01, 0.05, 0.2):
        expected = stats.binomtest(k, n, epsilon, alternative="less").pvalue
        assert binomial_pvalue(k, n, epsilon) == pytest.approx(expected, rel=1e-9)
        # the p-value is the dual of the bound
        assert (binomial_pvalue(k, n, epsilon) <= delta) == (binomial_upper(k, n, delta) <= epsilon)


def test_bounds_are_monotone():
    assert all(binomial_upper(k, 300, 0.1) < binomial_upper(k + 1, 300, 0.1) for k in range(20))
    assert binomial_upper(5, 300, 0.05) > binomial_upper(5, 300, 0.1) > binomial_upper(5, 300, 0.2)
    exact = [exact_upper(n_plus, 8, 500, 0.1, center=0.02) for n_plus in (8, 12, 16, 20)]
    assert exact == sorted(exact) and len(set(exact)) == 4
    exact = [exact_upper(20, n_minus, 500, 0.1, center=0.02) for n_minus in (0, 4, 8, 12)]
    assert exact == sorted(exact, reverse=True) and len(set(exact)) == 4
    union = [union_upper(20, n_minus, 500, 0.1) for n_minus in (0, 4, 8, 12)]
    assert union == sorted(union, reverse=True)
    # with the statistic's centre fixed, the p-value falls as the tested ε grows (nested nulls)
    pvalues = [exact_pvalue(15, 6, 500, epsilon, center=0.02) for epsilon in np.linspace(0.0, 0.05, 26)]
    assert all(later <= earlier for earlier, later in zip(pvalues, pvalues[1:]))
    pvalues = [union_pvalue(15, 6, 500, epsilon) for epsilon in np.linspace(0.0, 0.05, 26)]
    assert all(later <= earlier for earlier, later in zip(pvalues, pvalues[1:]))


def test_exact_statistic_tail_falls_with_a_and_rises_with_b():
    """The coupling lemma behind the rigorous supremum: P(Z ≤ z) is decreasing in a and increasing in b."""
    grid = np.linspace(0.001, 0.08, 12)
    for n, center in ((200, 0.0), (500, 0.02), (500, 0.05)):
        for z in (-2.0, -0.5, 1.0):
            by_a = _statistic_cdf(z, n, center, grid, np.full_like(grid, 0.02))
            by_b = _statistic_cdf(z, n, center, np.full_like(grid, 0.03), grid)
            assert np.all(np.diff(by_a) <= 1e-12) and np.all(np.diff(by_b) >= -1e-12)


def test_exact_bound_is_the_dual_of_its_test_and_tighter_than_the_union_bound():
    for n_plus, n_minus, n in ((20, 10, 1000), (9, 3, 300), (14, 6, 560)):
        for epsilon in (0.01, 0.02, 0.03):
            passes = exact_pvalue(n_plus, n_minus, n, epsilon) <= 0.1
            assert passes == (exact_upper(n_plus, n_minus, n, 0.1, center=epsilon) <= epsilon)
    # the docstring's example, and b = 0: no worse than bounding a alone
    assert exact_upper(20, 10, 1000, 0.1, center=0.02) == pytest.approx(0.0182, abs=2e-4)
    assert union_upper(20, 10, 1000, 0.1) == pytest.approx(0.0235, abs=2e-4)
    assert exact_upper(10, 0, 1000, 0.1, center=0.02) <= binomial_upper(10, 1000, 0.1) + 1e-4


def _rejection_rate(rejects, counts):
    keys, seen = np.unique(counts, axis=0, return_inverse=True)
    decisions = np.array([rejects(int(p), int(m)) for p, m in keys])
    return float(decisions[seen.ravel()].mean())


@pytest.mark.parametrize("n, a, b", [(400, 0.04, 0.02), (300, 0.02, 0.0), (800, 0.03, 0.01)])
def test_accuracy_bounds_cover_by_simulation(n, a, b):
    """At the boundary R = a − b = ε, each test rejects (wrongly) in at most δ of 4000 draws, plus noise."""
    delta, draws = 0.1, 4000
    counts = np.random.default_rng(7).multinomial(n, [a, b, 1 - a - b], size=draws)[:, :2]
    allowance = stats.binom.ppf(0.999, draws, delta) / draws
    epsilon = a - b
    exact = _rejection_rate(lambda p, m: exact_pvalue(p, m, n, epsilon) <= delta, counts)
    union = _rejection_rate(lambda p, m: union_upper(p, m, n, delta) <= epsilon, counts)
    print(f"n={n} a={a} b={b}: wrong rejections exact {exact:.4f}, union {union:.4f} (δ = {delta})")
    assert exact <= allowance and union <= allowance
    # and the exact test is not vacuous: well above the boundary it rejects in most draws
    assert _rejection_rate(lambda p, m: exact_pvalue(p, m, n, epsilon + 0.03) <= delta, counts) > 0.5


def test_consistency_bound_covers_by_simulation():
    delta, draws, n, rate = 0.1, 20000, 500, 0.04
    counts = np.random.default_rng(8).binomial(n, rate, size=draws)
    uppers = {k: binomial_upper(k, n, delta) for k in np.unique(counts)}
    miss = np.mean([uppers[k] < rate for k in counts])
    assert miss <= stats.binom.ppf(0.999, draws, delta) / draws


# --- per-row losses ----------------------------------------------------------------------------------------


def test_paired_losses_accuracy_consistency_and_multi_label_exact_sets():
    labels = np.array([0, 1, 2, 0])
    full = np.array([0, 1, 1, 2])
    policy = np.array([0, 2, 2, 1])
    assert paired_losses(policy, full, labels).tolist() == [0, 1, -1, 0]
    assert paired_losses(policy, full, guarantee="consistency").tolist() == [0, 1, 1, 1]
    gold = np.array([[1, 0, 1], [0, 1, 0]], dtype=float)
    full_sets = np.array([[True, False, True], [False, True, True]])
    policy_sets = np.array([[True, False, False], [False, True, True]])
    assert paired_losses(policy_sets, full_sets, gold).tolist() == [1, 0]
    assert paired_losses(policy_sets, full_sets, guarantee="consistency").tolist() == [1, 0]
    with pytest.raises(ValueError, match="labels"):
        paired_losses(policy, full)
    with pytest.raises(ValueError, match="guarantee"):
        paired_losses(policy, full, labels, guarantee="speed")


# --- Learn then Test ---------------------------------------------------------------------------------------


def _losses(n, plus, minus, seed=0):
    losses = np.zeros(n, dtype=np.int8)
    losses[:plus], losses[plus : plus + minus] = 1, -1
    return np.random.default_rng(seed).permutation(losses)


def test_certify_returns_the_fastest_certified_setting_and_its_bound():
    settings = ["slow", "middle", "fast", "too fast"]
    losses = [_losses(600, 1, 1), _losses(600, 3, 2), _losses(600, 6, 3), _losses(600, 40, 5)]
    result = certify(settings, losses, epsilon=0.02, delta=0.1, cost=[6.0, 5.0, 4.0, 2.0])
    assert result.setting == "fast" and result.certified == ["slow", "middle", "fast"]
    assert set(result.info) == {"epsilon", "delta", "bound", "n", "method"}
    assert result.info["n"] == 600 and result.info["bound"] <= 0.02
    assert result.info["bound"] == pytest.approx(risk_upper(losses[2], 0.1, epsilon=0.02))
    assert len(result.pvalues) == 4 and result.pvalues[-1] > 0.1
    assert "fast" in result.reason and "certified" in result.reason


def test_fixed_sequence_stops_at_the_first_failure():
    """A safe setting after a failing one is not tested: that is what keeps the family-wise level at δ."""
    result = certify(["risky", "safe"], [_losses(600, 40, 0), _losses(600, 0, 0)], 0.02, 0.1)
    assert result.setting is None and len(result.pvalues) == 1
    assert "risky" in result.reason and "serving full depth" in result.reason


def test_nothing_certifiable_falls_back_with_a_reason():
    # zero observed loss on 300 rows still cannot certify a 0.2 % budget at δ = 0.1
    for guarantee in ("accuracy", "consistency"):
        result = certify(["static(layer=5)"], [np.zeros(300, np.int8)], 0.002, 0.1, guarantee=guarantee)
        assert result.setting is None and result.info["bound"] is None and result.certified == []
        assert "no setting certified" in result.reason and "UCB" in result.reason
    assert certify([], [], 0.02, 0.1).setting is None
    with pytest.raises(ValueError, match="delta"):
        certify(["x"], [np.zeros(10)], 0.02, 0.0)


def test_risk_pvalue_methods():
    losses = _losses(500, 15, 5)
    assert risk_pvalue(losses, 0.02) == pytest.approx(exact_pvalue(15, 5, 500, 0.02))
    assert risk_pvalue(losses, 0.02, method="union") == pytest.approx(union_pvalue(15, 5, 500, 0.02))
    consistency = np.abs(losses)
    assert risk_pvalue(consistency, 0.06, "consistency") == pytest.approx(binomial_pvalue(20, 500, 0.06))
    with pytest.raises(ValueError, match="method"):
        risk_pvalue(losses, 0.02, method="hoeffding")


# --- the guarantee on synthetic exit caches ---------------------------------------------------------------

LAYERS, CLASSES = 8, 4
THRESHOLDS = np.linspace(0.6, 0.995, 40)


def draw_cache(rng: np.random.Generator, n: int):
    """Gold labels, every exit's prediction [n, L] and a confidence [n, L]. Per row a difficulty u; exit l is
    right when θ_l − u plus layer noise is positive (so an early exit is sometimes right where full depth is
    wrong), and its confidence is a noisy view of that margin."""
    gold = rng.integers(0, CLASSES, n)
    base = 0.35 + 0.55 * (np.arange(1, LAYERS + 1) / LAYERS) ** 0.7 - rng.random(n)[:, None]
    noise = 0.15 * rng.normal(size=(n, LAYERS))
    wrong = (gold[:, None] + rng.integers(1, CLASSES, (n, LAYERS))) % CLASSES
    predictions = np.where(base + noise > 0, gold[:, None], wrong)
    confidence = 1 / (1 + np.exp(-(8 * base + 2 * noise + 0.8 * rng.normal(size=(n, LAYERS)))))
    return gold, predictions, confidence


def replay(predictions: np.ndarray, confidence: np.ndarray):
    """Three families: `static` k, a confidence threshold, and the threshold from layer 3 on."""
    n, rows = len(predictions), np.arange(len(predictions))
    outputs = [(predictions[:, k - 1], np.full(n, k)) for k in range(1, LAYERS)]
    for min_layer in (1, 3):
        for threshold in THRESHOLDS:
            fire = confidence >= threshold
            fire[:, : min_layer - 1], fire[:, -1] = False, True
            layer = fire.argmax(axis=1)
            outputs.append((predictions[rows, layer], layer + 1))
    return [p for p, _ in outputs], [e for _, e in outputs]


@pytest.fixture(scope="module")
def population():
    """Population risk (300k rows) and average exit layer per setting, for both guarantees."""
    gold, predictions, confidence = draw_cache(np.random.default_rng(0), 300_000)
    outputs, exits = replay(predictions, confidence)
    full = predictions[:, -1]
    return {
        "accuracy": np.array([paired_losses(p, full, gold).mean() for p in outputs]),
        "consistency": np.array([paired_losses(p, full, guarantee="consistency").mean() for p in outputs]),
        "cost": np.array([e.mean() for e in exits]),
    }


def violation_rates(population, guarantee, epsilon, delta=0.1, splits=200, n=800):
    """Over `splits` fresh calibration sets of n rows: how often the certified and the uncertified choice have
    population risk above ε, how often certification fell back to full, and their average exit layers."""
    risk, cost = population[guarantee], population["cost"]
    broken = {"certified": 0, "uncertified": 0}
    fallbacks, layers = 0, {"certified": [], "uncertified": []}
    for split in range(splits):
        gold, predictions, confidence = draw_cache(np.random.default_rng(1000 + split), n)
        outputs, exits = replay(predictions, confidence)
        order_rows, test_rows = split_rows(n, 0.4, seed=split)
        labels = gold if guarantee == "accuracy" else None
        selection = selection_from_cache(
            outputs,
            exits,
            predictions[:, -1],
            labels,
            LAYERS,
            order_rows,
            test_rows,
            epsilon,
            delta,
            guarantee,
        )
        if selection.index is None:
            fallbacks += 1
            layers["certified"].append(LAYERS)
        else:
            broken["certified"] += risk[selection.index] > epsilon
            layers["certified"].append(cost[selection.index])
        empirical = np.array(
            [paired_losses(p, predictions[:, -1], labels, guarantee).mean() for p in outputs]
        )
        within = np.flatnonzero(empirical <= epsilon)
        naive = within[np.argmin([exits[i].mean() for i in within])]
        broken["uncertified"] += risk[naive] > epsilon
        layers["uncertified"].append(cost[naive])
    rates = {key: count / splits for key, count in broken.items()}
    return rates, fallbacks / splits, {key: float(np.mean(value)) for key, value in layers.items()}


@pytest.mark.parametrize(
    "guarantee, epsilon",
    # ε sits between the population risks of neighbouring settings (0.0209 and 0.0227; 0.0586 and 0.0626), so
    # the Monte Carlo error of the population values (standard error ≤ 0.0004) cannot flip a verdict
    [("accuracy", 0.0218), ("consistency", 0.0606)],
)
def test_certified_choice_keeps_the_budget_and_the_uncertified_one_does_not(population, guarantee, epsilon):
    delta, splits = 0.1, 200
    rates, fallback, layers = violation_rates(population, guarantee, epsilon, delta, splits)
    print(f"{guarantee}: violation rates {rates}, fallback {fallback}, average exit layers {layers}")
    near = np.abs(population[guarantee] - epsilon).min()
    assert near > 8e-4, f"a setting's population risk is within {near:.4f} of ε"
    allowed = stats.binom.ppf(0.999, splits, delta) / splits  # δ plus binomial noise over the splits
    assert rates["certified"] <= allowed
    assert rates["uncertified"] > allowed and rates["uncertified"] >= rates["certified"] + 0.15
    # and it is not safe by refusing: it certifies a faster setting in most splits
    assert fallback <= 0.25 and layers["certified"] < LAYERS - 2


def test_selection_from_cache_checks_its_rows_and_paths_only_faster_settings():
    gold, predictions, confidence = draw_cache(np.random.default_rng(3), 400)
    outputs, exits = replay(predictions, confidence)
    outputs.append(predictions[:, -1])
    exits.append(np.full(400, LAYERS))  # as slow as full: never a candidate
    order_rows, test_rows = split_rows(400, 0.4, seed=0)
    selection = selection_from_cache(
        outputs, exits, predictions[:, -1], gold, LAYERS, order_rows, test_rows, 0.05, 0.1
    )
    assert len(outputs) - 1 not in selection.path and selection.path
    assert selection.index is None or selection.index in selection.path
    assert selection.info["n"] == test_rows.size
    with pytest.raises(ValueError, match="disjoint"):
        selection_from_cache(
            outputs, exits, predictions[:, -1], gold, LAYERS, order_rows, order_rows, 0.05, 0.1
        )


def test_settings_tied_on_the_ordering_rows_are_tested_costliest_first():
    scores = np.array([0.0, 0.0, 0.0, 0.5])  # three settings lost nothing on the ordering rows
    costs = np.array([1.5, 3.0, 2.0, 1.0])
    assert risk_path(scores, costs, num_layers=6) == [1, 2, 0, 3]  # the risky cheapest one comes last


def test_min_test_rows_is_where_no_changed_row_certifies_the_budget():
    needed = min_test_rows(0.01, 0.1)
    assert needed == 230  # docs/calibration.md
    assert (1 - 0.01) ** needed <= 0.1 < (1 - 0.01) ** (needed - 1)
