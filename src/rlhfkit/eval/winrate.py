"""Pairwise win rate of one policy over another, with a 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal
CI_METHODS = ("wilson", "bootstrap")
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `rate` observed over `n` trials.

    Unlike the normal approximation it stays inside [0, 1] and does not collapse to a
    point when every outcome is equal (7/7 wins still gives [0.65, 1.0]).
    """
    if n < 1:
        raise ValueError(f"wilson_interval needs n >= 1, got {n}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"wilson_interval needs a rate in [0, 1], got {rate}")
    z2n = z * z / n
    centre = (rate + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(rate * (1 - rate) / n + z2n / (4 * n))
    # At rate 0 (or 1) the bound is exactly 0 (or 1); rounding would leave 3e-17 (or 1 - 1e-16),
    # an interval that misses its own rate.
    lo = 0.0 if rate == 0.0 else max(0.0, centre - half)
    hi = 1.0 if rate == 1.0 else min(1.0, centre + half)
    return lo, hi


def all_equal(outcomes: Sequence[float]) -> bool:
    """Whether every outcome is the same value: then every bootstrap resample is too."""
    x = np.asarray(outcomes, dtype=np.float64)
    return bool(x.size) and bool((x == x.flat[0]).all())


def bootstrap_interval(
    outcomes: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of per-prompt outcomes (seeded).

    When every outcome is equal, every resample's mean is that value and the percentile interval
    is a single point ([1, 1] for 20 wins of 20), which claims a certainty n prompts cannot give.
    Outcomes in [0, 1] are then a proportion, and get Wilson's interval of it over n instead
    (`wilson_interval`). Equal outcomes outside [0, 1] still give the point: the bootstrap has
    nothing to say about their spread, and callers should report it as such.
    """
    x = np.asarray(outcomes, dtype=np.float64)
    if x.size < 1:
        raise ValueError("bootstrap_interval needs at least one outcome")
    if all_equal(x) and 0.0 <= x.flat[0] <= 1.0:
        return wilson_interval(float(x.flat[0]), int(x.size))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def win_rate(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    tol: float = 1e-9,
    method: str = "wilson",
    seed: int = 0,
) -> dict:
    """Win rate of A over B on paired per-prompt scores; a tie counts as half a win.

    Per prompt i the outcome is 1 if ``a_i > b_i + tol``, 0.5 if ``|a_i - b_i| <= tol``
    and 0 otherwise. The 95% interval is Wilson's score interval on the rate over n
    prompts (a tie enters as half a success), or with ``method="bootstrap"`` the
    percentile interval of 2000 seeded resamples of the prompts. When every prompt has the
    same outcome (all wins, all ties or all losses) the bootstrap's interval would be a single
    point: it is Wilson's instead (`bootstrap_interval`), and ``ci_note`` says so.

    Returns ``{"rate", "ci95": [lo, hi], "ci_method", "n", "wins", "ties", "losses"}`` (and
    ``ci_note`` when the bootstrap was asked for and gave Wilson's interval).
    Raises ValueError if the lengths differ, there are no prompts, a score is not
    finite, or the method is unknown.
    """
    if method not in CI_METHODS:
        raise ValueError(f"unknown win-rate CI method {method!r}; choose one of {', '.join(CI_METHODS)}")
    a = np.asarray(scores_a, dtype=np.float64).ravel()
    b = np.asarray(scores_b, dtype=np.float64).ravel()
    if a.shape[0] != b.shape[0] or a.shape[0] < 1:
        raise ValueError(
            f"win_rate needs two equally long, non-empty score lists; "
            f"got len(scores_a)={a.shape[0]} and len(scores_b)={b.shape[0]}"
        )
    # A NaN (a judge that failed, a None score) would silently count as a loss for A.
    bad = ~(np.isfinite(a) & np.isfinite(b))
    if bad.any():
        raise ValueError(f"win_rate got a non-finite score at index {int(np.argmax(bad))}")
    diff = a - b
    ties = np.abs(diff) <= tol
    wins = (diff > tol) & ~ties
    losses = ~wins & ~ties
    outcomes = np.where(wins, 1.0, np.where(ties, 0.5, 0.0))

    n = int(outcomes.shape[0])
    rate = float(outcomes.mean())
    lo, hi = wilson_interval(rate, n) if method == "wilson" else bootstrap_interval(outcomes, seed)
    result = {
        "rate": rate,
        "ci95": [lo, hi],
        "ci_method": method,
        "n": n,
        "wins": int(wins.sum()),
        "ties": int(ties.sum()),
        "losses": int(losses.sum()),
    }
    if method == "bootstrap" and all_equal(outcomes):
        result["ci_note"] = f"all {n} outcomes equal: Wilson's interval (a bootstrap's would be one point)"
    return result
