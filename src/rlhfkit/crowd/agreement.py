"""Inter-annotator agreement."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence


def krippendorff_alpha_nominal(units: Mapping[Hashable, Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal labels; `units` maps an item to the labels it got.

    Items with fewer than two labels carry no information about agreement and are
    skipped. Returns None when no item has two labels or all labels are the same value
    (expected disagreement 0: alpha is undefined).
    """
    coincidence: Counter[tuple[Hashable, Hashable]] = Counter()
    for values in units.values():
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nk - 1) if c == k else nc * nk
                coincidence[(c, k)] += pairs / (m - 1)
    totals: Counter[Hashable] = Counter()
    for (c, _), v in coincidence.items():
        totals[c] += v
    n = sum(totals.values())
    observed = sum(v for (c, k), v in coincidence.items() if c != k)
    expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if n <= 1 or expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected
