"""Best-of-n sampling: the analytic KL of the best-of-n policy from the base policy."""

from __future__ import annotations

import math


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020).

    Exact when no response has a noticeable probability under the base policy, an upper bound
    otherwise (Beirami et al. 2024): two equally likely answers give 0.131 at n = 2, not 0.193.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n
