"""Pairwise win rate of one policy over another, with a 95% confidence interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Z95 = 1.96


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], tol: float = 1e-9) -> dict:
    """Win rate of A over B on paired per-prompt scores; a tie counts as half a win.

    Per prompt i the outcome is 1 if ``a_i > b_i + tol``, 0.5 if ``|a_i - b_i| <= tol``
    and 0 otherwise. The 95% interval is the normal approximation
    ``rate ± 1.96 * std(outcomes, ddof=1) / sqrt(n)``, clipped to [0, 1].

    The interval collapses to ``[rate, rate]`` when ``n < 2`` (the sample std is
    undefined) or when every outcome is equal (std 0). That is a statement about the
    sample, not real certainty: the normal approximation has nothing to work with, and
    a degenerate interval is easier to spot downstream than a NaN.

    Returns ``{"rate", "ci95": [lo, hi], "n", "wins", "ties", "losses"}``.
    Raises ValueError if the lengths differ, there are no prompts, or a score is not finite.
    """
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
    std = float(outcomes.std(ddof=1)) if n >= 2 else 0.0
    if std > 0.0:
        half = Z95 * std / np.sqrt(n)
        ci = [float(max(0.0, rate - half)), float(min(1.0, rate + half))]
    else:
        ci = [rate, rate]
    return {
        "rate": rate,
        "ci95": ci,
        "n": n,
        "wins": int(wins.sum()),
        "ties": int(ties.sum()),
        "losses": int(losses.sum()),
    }
