"""Certified choice of an early-exit setting (Learn then Test, Angelopoulos et al. 2021): with probability at
least 1 − δ over the draw of the calibration rows, the chosen setting's population risk is at most ε.

Risk, per row i, paired with full depth on the same row (the pairing cancels how hard the data is):

- `accuracy`:    d_i = 1[full correct] − 1[policy correct] ∈ {−1, 0, 1}; its mean is the accuracy drop
  R = a − b, with a = P(d = +1) and b = P(d = −1) the two discordant-pair rates. Multi-label: exact-set
  correctness.
- `consistency`: c_i = 1[policy prediction ≠ full-depth prediction] ∈ {0, 1} (needs no labels). Since
  d_i = +1 implies c_i = 1, it also bounds the accuracy drop, more loosely.

Bounds (each a valid one-sided test of H0: R ≥ ε, and its upper confidence bound, UCB(δ) ≤ ε ⇔ p ≤ δ):

- consistency: exact binomial, p = P(Binomial(n, ε) ≤ k), the dual of the Clopper–Pearson upper bound.
- accuracy, `exact` (the default): an exact unconditional test of the paired difference, with the nuisance
  rate b restricted to a confidence set (Berger & Boos 1994). Statistic Z = (N₊ − N₋ − nε)/√(N₊ + N₋ + c),
  c = max(1, nε/2): the difference studentised by the discordant count, so its null law hardly depends on b.
  Couple one uniform per row (+1 below a, −1 above 1 − b): raising a or lowering b can only raise Z (this needs
  c ≥ nε/2), so over H0 = {a − b ≥ ε} and for b in a grid cell [b_k, b_k+1] the tail P(Z ≤ z_obs) is at most
  its value at a = max(b_k + ε, 0), b = b_k+1. The largest cell value is therefore a rigorous supremum, not a
  grid approximation. b is restricted to b ≤ U_b, the Clopper–Pearson upper bound at level γ = 0.001, and γ
  is added: p = γ + max_k P_k(Z ≤ z_obs) (without the restriction the supremum runs over b up to
  (1 − ε)/2). Given M = N₊ + N₋, N₊ is binomial, so each P_k is a one-dimensional sum of binomial terms,
  computed exactly; the far tails of M are dropped and their mass added back (conservative).
- accuracy, `union`: Clopper–Pearson upper bound on a minus lower bound on b, each at δ/2 (union bound).

Why `exact`: both are finite-sample exact, but the union bound pays for a and b separately (two tails, each at
δ/2), while Z uses the pairing: its spread is √((a + b)/n), not √(a/n) + √(b/n). Where it matters, a true drop
near ε with a ≈ 1–5 %, b ≈ 0.5–3 % and n = 300–1000, the bound's excess over the observed drop is about
30–40 % smaller than the union bound's (n = 1000, 20 rows worse and 10 better than full, δ = 0.1, ε = 0.02:
UCB 0.0182 vs 0.0235). With b = 0 it matches bounding a alone. Bounding a alone (R ≤ a)
throws the b rows away. A betting confidence sequence (Waudby-Smith–Ramdas) is valid too, but at a fixed n it
pays for being valid at every n and depends on the row order. The bound is reported as the inverted test
with the statistic centred at the budget, so bound ≤ ε exactly when the test at ε passes.

Selection (`certify`): fixed-sequence testing over candidates in an order fixed before the test rows are
seen, safest first; every null rejected before the first failure is certified, family-wise at level δ, so
any of them may be picked: the fastest is. `selection_from_cache` makes that order valid by splitting the dev
rows (Pareto Testing, Laufer-Goldshtein et al. 2023): on the ordering rows each candidate gets a pessimistic
risk (mean + z_{1−δ} standard errors), the candidates are reduced to their score/cost Pareto frontier, safest
(slowest) first, which also puts all policy families in one sequence with no Bonferroni split; the test rows
only test. (Ordering by the plain mean let one noisy setting, e.g. `static` at a late layer, head the sequence
and stop it.) Nothing certified → None: the caller serves `full`, whose
risk is 0 by definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import special, stats

GUARANTEES = ("accuracy", "consistency")
ACCURACY_METHODS = ("exact", "union")
GAMMA = 1e-3  # nuisance confidence level of the `exact` test (added to its p-value)
_CELLS = 64  # grid cells over the nuisance rate b
_TAIL = 1e-8  # mass of M = N₊ + N₋ beyond which the sums stop (the exact dropped mass is added back)
_BISECT = 40  # bisection steps of the union p-value (on log δ over [-40, 0])
_RESOLUTION = 1e-5  # of the reported exact bound (rounded up)


# --- per-row losses -------------------------------------------------------------------------------------


def _correct(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Row correctness: class index equal, or (multi-label, [N, C]) the exact label set."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == 2:
        return (predictions.astype(bool) == labels.astype(bool)).all(axis=1)
    return predictions == labels


def _same(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    first, second = np.asarray(first), np.asarray(second)
    equal = first.astype(bool) == second.astype(bool) if first.ndim == 2 else first == second
    return equal.all(axis=1) if first.ndim == 2 else equal


def paired_losses(
    predictions: np.ndarray,
    full_predictions: np.ndarray,
    labels: np.ndarray | None = None,
    guarantee: str = "accuracy",
) -> np.ndarray:
    """Per-row loss of a policy against full depth, int8: d ∈ {−1, 0, 1} (accuracy) or c ∈ {0, 1} (consistency).
    Predictions are class indices [N] or label sets [N, C] (bool)."""
    if guarantee == "consistency":
        return (~_same(predictions, full_predictions)).astype(np.int8)
    if guarantee != "accuracy":
        raise ValueError(f"guarantee must be one of {', '.join(GUARANTEES)}, got {guarantee!r}")
    if labels is None:
        raise ValueError("guarantee 'accuracy' needs gold labels")
    return _correct(full_predictions, labels).astype(np.int8) - _correct(predictions, labels).astype(np.int8)


# --- binomial (Clopper–Pearson) -------------------------------------------------------------------------


def binomial_upper(k: int, n: int, delta: float) -> float:
    """One-sided Clopper–Pearson upper bound on a rate from k successes in n rows, at level 1 − δ."""
    return 1.0 if k >= n else float(stats.beta.ppf(1.0 - delta, k + 1, n - k))


def binomial_lower(k: int, n: int, delta: float) -> float:
    """One-sided Clopper–Pearson lower bound, at level 1 − δ."""
    return 0.0 if k <= 0 else float(stats.beta.ppf(delta, k, n - k + 1))


def min_test_rows(epsilon: float, delta: float) -> int:
    """The fewest test rows that can certify a budget ε at risk δ: even with no prediction changed, the bound
    reaches ε only once (1 − ε)^n ≤ δ (230 rows for ε = 0.01, δ = 0.1; docs/calibration.md)."""
    if not (0.0 < epsilon < 1.0 and 0.0 < delta < 1.0):
        raise ValueError(f"min_test_rows needs 0 < epsilon < 1 and 0 < delta < 1, got {epsilon}, {delta}")
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


def binomial_pvalue(k: int, n: int, epsilon: float) -> float:
    """Exact p-value of H0: rate ≥ ε after k successes in n rows, P(Binomial(n, ε) ≤ k); p ≤ δ ⇔ upper ≤ ε."""
    return float(stats.binom.cdf(k, n, epsilon)) if epsilon > 0 else 1.0


# --- accuracy drop a − b ----------------------------------------------------------------------------------


def union_upper(n_plus: int, n_minus: int, n: int, delta: float) -> float:
    """UCB on a − b: Clopper–Pearson upper bound on a minus lower bound on b, each at δ/2."""
    return binomial_upper(n_plus, n, delta / 2) - binomial_lower(n_minus, n, delta / 2)


def union_pvalue(n_plus: int, n_minus: int, n: int, epsilon: float) -> float:
    """The smallest δ at which `union_upper` ≤ ε (bisection on log δ; rounded up)."""
    if union_upper(n_plus, n_minus, n, 1.0) > epsilon:
        return 1.0
    low, high = -40.0, 0.0  # log δ: the bound at e^high is ≤ ε, at e^low it is not (or δ is negligible)
    for _ in range(_BISECT):
        middle = (low + high) / 2
        low, high = (
            (low, middle) if union_upper(n_plus, n_minus, n, np.exp(middle)) <= epsilon else (middle, high)
        )
    return float(np.exp(high))


def _statistic_cdf(z: float, n: int, center: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(Z ≤ z), Z = (N₊ − N₋ − n·center) / √(N₊ + N₋ + c), for (N₊, N₋, N₀) ~ Multinomial(n; a, b, 1 − a − b),
    per (a, b) pair. Given M = N₊ + N₋ = m, Z ≤ z ⇔ N₊ ≤ ⌊(z√(m + c) + m + n·center)/2⌋ and N₊ | m is
    Binomial(m, a/(a + b)). m outside [m_low, m_high] is left out and its whole mass added (an upper bound)."""
    c = _stabiliser(n, center)
    s = a + b
    q = np.divide(a, s, out=np.zeros_like(s), where=s > 0)
    low = int(stats.binom.ppf(_TAIL, n, s.min()))
    high = int(stats.binom.isf(_TAIL, n, s.max()))
    m = np.arange(max(low, 0), min(high, n) + 1)[None, :]
    # the 1e-9 guards the floor against rounding when z√(m + c) lands on an integer
    cutoff = np.floor((z * np.sqrt(m + c) + m + n * center) / 2 + 1e-9)
    mass = np.exp(
        special.gammaln(n + 1)
        - special.gammaln(m + 1)
        - special.gammaln(n - m + 1)
        + special.xlogy(m, s[:, None])
        + special.xlog1py(n - m, -s[:, None])
    )
    conditional = stats.binom.cdf(cutoff, m, q[:, None])
    dropped = stats.binom.cdf(m[0, 0] - 1, n, s) + stats.binom.sf(m[0, -1], n, s)
    return (mass * conditional).sum(axis=1) + dropped


def _stabiliser(n: int, center: float) -> float:
    """c in Z's denominator: c ≥ n·center/2 keeps Z monotone under the coupling (module docstring)."""
    return max(1.0, n * max(center, 0.0) / 2)


def exact_pvalue(
    n_plus: int, n_minus: int, n: int, epsilon: float, center: float | None = None, gamma: float = GAMMA
) -> float:
    """Exact p-value of H0: a − b ≥ ε (Berger–Boos, see the module docstring); never below γ. `center` (default
    ε) is where the statistic is centred: any value fixed before seeing the rows keeps the test valid."""
    if not -1.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (-1, 1), got {epsilon}")
    center = epsilon if center is None else center
    if not 0.0 <= center < 1.0:
        raise ValueError(f"center must be in [0, 1), got {center}")
    z = (n_plus - n_minus - n * center) / np.sqrt(n_plus + n_minus + _stabiliser(n, center))
    edges = np.linspace(0.0, binomial_upper(n_minus, n, gamma), _CELLS + 1)
    # Cell k holds H0 points with b in [b_k, b_k+1], a ≥ max(b_k + ε, 0) and a + b ≤ 1: the worst is a as low and
    # b as high as the cell allows.
    a = np.maximum(edges[:-1] + epsilon, 0.0)
    b = np.minimum(edges[1:], 1.0 - a)
    keep = b >= edges[:-1]
    if not keep.any():
        return gamma
    worst = _statistic_cdf(z, n, center, a[keep], b[keep]).max()
    return float(min(1.0, gamma + worst))


def exact_upper(
    n_plus: int, n_minus: int, n: int, delta: float, center: float, gamma: float = GAMMA
) -> float:
    """UCB on a − b: the smallest ε with `exact_pvalue(..., ε, center)` ≤ δ. With `center` fixed, p falls as ε
    grows (smaller H0), so bisection finds it (rounded up to 1e-5). Pass the budget as `center`: then
    UCB ≤ budget ⇔ the certify test at the budget passes. Needs δ > γ."""
    if delta <= gamma:
        raise ValueError(f"delta must exceed gamma={gamma} for the exact bound, got {delta}")

    def passes(epsilon: float) -> bool:
        return exact_pvalue(n_plus, n_minus, n, epsilon, center, gamma) <= delta

    high = min(center, 1.0 - 1e-9) if passes(center) else 1.0 - 1e-9
    if high == 1.0 - 1e-9 and not passes(high):
        return 1.0
    step = 0.01  # bracket: walk down with doubling steps until the test fails
    low = high - step
    while low > -1.0 and passes(low):
        high, step = low, 2 * step
        low = max(high - step, -1.0)
    while high - low > _RESOLUTION:
        middle = (low + high) / 2
        low, high = (low, middle) if passes(middle) else (middle, high)
    return high


# --- losses → bound / p-value ---------------------------------------------------------------------------


def _counts(losses: np.ndarray) -> tuple[int, int, int]:
    losses = np.asarray(losses)
    return int((losses > 0).sum()), int((losses < 0).sum()), int(losses.size)


def risk_pvalue(
    losses: np.ndarray, epsilon: float, guarantee: str = "accuracy", method: str = "exact"
) -> float:
    """Valid p-value of H0: risk ≥ ε from per-row `paired_losses` (`method` is used by `accuracy` only)."""
    n_plus, n_minus, n = _counts(losses)
    if guarantee == "consistency":
        return binomial_pvalue(n_plus, n, epsilon)
    if method == "exact":
        return exact_pvalue(n_plus, n_minus, n, epsilon)
    if method == "union":
        return union_pvalue(n_plus, n_minus, n, epsilon)
    raise ValueError(f"method must be one of {', '.join(ACCURACY_METHODS)}, got {method!r}")


def risk_upper(
    losses: np.ndarray,
    delta: float,
    guarantee: str = "accuracy",
    method: str = "exact",
    epsilon: float | None = None,
) -> float:
    """Upper confidence bound on the risk at level 1 − δ (the dual of `risk_pvalue`). The `exact` bound needs
    the budget `epsilon` its statistic is centred on (fixed before the rows are seen)."""
    n_plus, n_minus, n = _counts(losses)
    if guarantee == "consistency":
        return binomial_upper(n_plus, n, delta)
    if method == "exact":
        if epsilon is None:
            raise ValueError("the exact bound needs the budget epsilon its statistic is centred on")
        return exact_upper(n_plus, n_minus, n, delta, epsilon)
    if method == "union":
        return union_upper(n_plus, n_minus, n, delta)
    raise ValueError(f"method must be one of {', '.join(ACCURACY_METHODS)}, got {method!r}")


def describe_method(guarantee: str, method: str) -> str:
    bound = {
        "consistency": "exact binomial (Clopper-Pearson) on disagreement with full depth",
        "exact": "exact unconditional studentised paired test (Berger-Boos, gamma=0.001) on the accuracy drop",
        "union": "Clopper-Pearson on both discordant rates, union bound",
    }["consistency" if guarantee == "consistency" else method]
    return f"learn-then-test, fixed-sequence; {bound}"


# --- Learn then Test ------------------------------------------------------------------------------------


class Certified(NamedTuple):
    """`setting` is None when nothing is certified (serve `full`); `certified` holds every setting the sequence
    certified (all are safe together at level δ); `pvalues` the tested ones, in order."""

    setting: Any
    reason: str
    info: dict[str, Any]
    certified: list[Any]
    pvalues: list[float]


def certify(
    settings: Sequence[Any],
    losses_per_setting: Sequence[np.ndarray],
    epsilon: float,
    delta: float,
    guarantee: str = "accuracy",
    method: str = "exact",
    cost: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> Certified:
    """Fixed-sequence Learn-then-Test. `settings` must be ordered safest first by something the loss rows did not
    decide (a parameter path, or other rows: see `selection_from_cache`). Tests H0_j: risk_j ≥ ε in that order
    and stops at the first p > δ; returns the certified setting of lowest `cost` (default: the last certified).
    `names` (default `str(setting)`) are for the reason only."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if guarantee == "accuracy" and method == "exact" and delta <= GAMMA:
        raise ValueError(f"delta must exceed {GAMMA} with the exact bound (or use method='union')")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    if len(settings) != len(losses_per_setting):
        raise ValueError("one loss array per setting")
    sizes = {np.asarray(losses).size for losses in losses_per_setting}
    if len(sizes) > 1:
        raise ValueError("every setting's losses must cover the same rows")
    n = sizes.pop() if sizes else 0
    info: dict[str, Any] = {
        "epsilon": epsilon,
        "delta": delta,
        "bound": None,
        "n": n,
        "method": describe_method(guarantee, method),
    }
    if n == 0 or not settings:
        return Certified(None, "no candidate setting or no test rows; serving full depth", info, [], [])
    passed, pvalues = [], []
    for index, losses in enumerate(losses_per_setting):
        pvalues.append(risk_pvalue(losses, epsilon, guarantee, method))
        if pvalues[-1] > delta:
            break
        passed.append(index)
    if not passed:
        first = losses_per_setting[0]
        return Certified(
            None,
            f"no setting certified: the safest candidate, {names[0] if names else settings[0]}, has empirical "
            f"{guarantee} risk {float(np.mean(first)):.4f} but p = {pvalues[0]:.3g} > δ = {delta} for risk ≥ "
            f"ε = {epsilon} (UCB {risk_upper(first, delta, guarantee, method, epsilon):.4f} on n = {n} rows); "
            f"serving full depth",
            info,
            [],
            pvalues,
        )
    chosen = passed[-1] if cost is None else min(passed, key=lambda index: (cost[index], -index))
    info["bound"] = risk_upper(losses_per_setting[chosen], delta, guarantee, method, epsilon)
    reason = (
        f"{names[chosen] if names else settings[chosen]}: {guarantee} risk ≤ {epsilon} certified with "
        f"probability ≥ {1 - delta:g} (UCB {info['bound']:.4f} on n = {n} rows); fastest of {len(passed)} "
        f"settings certified before the fixed sequence stopped"
    )
    return Certified(settings[chosen], reason, info, [settings[i] for i in passed], pvalues)


# --- from what calibration has ----------------------------------------------------------------------------


class Selection(NamedTuple):
    """`index` into the caller's settings (None: serve `full`); `path` the tested order as indices."""

    index: int | None
    reason: str
    info: dict[str, Any]
    path: list[int]
    pvalues: list[float]


def split_rows(num_rows: int, order_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of row indices into ordering rows and test rows (both sorted)."""
    order = np.random.default_rng(seed).permutation(num_rows)
    cut = min(max(round(num_rows * order_fraction), 1), num_rows - 1)
    return np.sort(order[:cut]), np.sort(order[cut:])


def order_scores(order_losses: np.ndarray, num_test: int, delta: float) -> np.ndarray:
    """Pessimistic risk per setting from the ordering rows [S, n_order]: the mean plus z_{1−δ} standard errors of
    both the ordering mean and the coming test mean, so noisy settings (few rows, many discordant pairs) go
    later in the sequence, where their failure costs nothing."""
    num_order = order_losses.shape[1]
    mean = order_losses.mean(axis=1)
    variance = np.maximum((order_losses != 0).mean(axis=1) - mean**2, 1.0 / num_order)
    spread = 1 / np.sqrt(num_order) + 1 / np.sqrt(num_test)
    return mean + stats.norm.ppf(1 - delta) * np.sqrt(variance) * spread


def risk_path(scores: np.ndarray, costs: np.ndarray, num_layers: float) -> list[int]:
    """Indices of the score/cost Pareto frontier among settings cheaper than full depth, safest (costliest)
    first: walking from the cheapest, keep a setting if its score is not above any cheaper kept one's. Ties stay
    on the path, costliest first: settings that lost nothing on the ordering rows are tested from the slowest
    (closest to full depth) on, so one lucky fast setting cannot end the sequence before a safe one is tested."""
    cheaper = (i for i in range(len(scores)) if costs[i] < num_layers)
    frontier: list[int] = []
    for index in sorted(cheaper, key=lambda i: (costs[i], scores[i], i)):
        if not frontier or scores[index] <= scores[frontier[-1]]:
            frontier.append(index)
    return frontier[::-1]


def selection_from_cache(
    predictions: Sequence[np.ndarray],
    exit_layers: Sequence[np.ndarray],
    full_predictions: np.ndarray,
    labels: np.ndarray | None,
    num_layers: int,
    order_rows: np.ndarray,
    test_rows: np.ndarray,
    epsilon: float,
    delta: float = 0.1,
    guarantee: str = "accuracy",
    method: str = "exact",
    names: Sequence[str] | None = None,
) -> Selection:
    """Certified choice among replayed settings. Per setting: predictions over all dev rows ([N] class indices
    or [N, C] bool) and 1-based exit layers [N]. The path (`order_scores`, `risk_path`) is built on
    `order_rows` only and tested on `test_rows` (disjoint); the fastest certified setting by average exit layer
    over all rows wins (any certified one may be picked, by any rule)."""
    order_rows, test_rows = np.asarray(order_rows), np.asarray(test_rows)
    if np.intersect1d(order_rows, test_rows).size:
        raise ValueError("ordering rows and test rows must be disjoint")
    losses = [paired_losses(p, full_predictions, labels, guarantee) for p in predictions]
    exits = [np.asarray(e, dtype=float) for e in exit_layers]
    scores = order_scores(np.stack([loss[order_rows] for loss in losses]), test_rows.size, delta)
    path = risk_path(scores, np.array([e[order_rows].mean() for e in exits]), num_layers)
    names = list(names) if names is not None else [f"setting {i}" for i in range(len(losses))]
    result = certify(
        path,
        [losses[i][test_rows] for i in path],
        epsilon,
        delta,
        guarantee,
        method,
        cost=[float(exits[i].mean()) for i in path],
        names=[names[i] for i in path],
    )
    if guarantee == "accuracy" and result.setting is not None:
        result.info["consistency_bound"] = consistency_bound(
            predictions[result.setting], full_predictions, test_rows, delta
        )
    return Selection(result.setting, result.reason, result.info, path, result.pvalues)


def consistency_bound(
    predictions: np.ndarray, full_predictions: np.ndarray, test_rows: np.ndarray, delta: float
) -> float:
    """Clopper–Pearson upper bound (level 1 − δ, rounded up to 6 decimals) on the setting's disagreement with
    full depth over the test rows: the rate a production monitor tests against (docs/monitoring.md)."""
    disagreements = paired_losses(predictions, full_predictions, None, "consistency")[test_rows]
    upper = binomial_upper(int(disagreements.sum()), disagreements.size, delta)
    return min(math.ceil(round(upper * 1e6, 6)) / 1e6, 1.0)
