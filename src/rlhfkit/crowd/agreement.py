"""Inter-annotator agreement: Krippendorff's alpha at the nominal, ordinal and interval levels."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence

LEVELS = ("nominal", "ordinal", "interval")


def _coincidences(units: Mapping[Hashable, Sequence[Hashable]]) -> Counter[tuple[Hashable, Hashable]]:
    """Krippendorff's coincidence matrix: each ordered pair of values within a unit, weighted 1/(m-1)."""
    coincidence: Counter[tuple[Hashable, Hashable]] = Counter()
    for values in units.values():
        m = len(values)
        if m < 2:
            continue  # one label says nothing about agreement
        counts = Counter(values)
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nk - 1) if c == k else nc * nk
                coincidence[(c, k)] += pairs / (m - 1)
    return coincidence


def _distance(level: str, totals: Mapping[Hashable, float]) -> Callable[[Hashable, Hashable], float]:
    """The squared difference function delta^2(c, k) of a level of measurement."""
    if level == "nominal":
        return lambda c, k: 0.0 if c == k else 1.0
    for value in totals:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{level} alpha needs numeric labels, got {value!r}")
    if level == "interval":
        return lambda c, k: float(c - k) ** 2  # type: ignore[operator]
    # Ordinal: the distance is the mass of values between c and k (each end counts half),
    # so it depends on how often the values in between are used, not on their spacing.
    ordered = sorted(totals)  # type: ignore[type-var]
    rank = {v: i for i, v in enumerate(ordered)}
    cumulative = [0.0]
    for v in ordered:
        cumulative.append(cumulative[-1] + totals[v])

    def ordinal(c: Hashable, k: Hashable) -> float:
        lo, hi = sorted((rank[c], rank[k]))
        between = cumulative[hi + 1] - cumulative[lo]
        return (between - (totals[c] + totals[k]) / 2) ** 2

    return ordinal


def krippendorff_alpha(units: Mapping[Hashable, Sequence[Hashable]], level: str = "nominal") -> float | None:
    """Krippendorff's alpha; `units` maps an item to the labels it got, `level` is one of LEVELS.

    Items with fewer than two labels are skipped. Returns None when no item has two
    labels or the expected disagreement is 0 (every label the same value: alpha is
    undefined).
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    coincidence = _coincidences(units)
    totals: Counter[Hashable] = Counter()
    for (c, _), v in coincidence.items():
        totals[c] += v
    n = sum(totals.values())
    if n <= 1:
        return None
    delta = _distance(level, totals)
    observed = sum(v * delta(c, k) for (c, k), v in coincidence.items())
    expected = sum(totals[c] * totals[k] * delta(c, k) for c in totals for k in totals)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def krippendorff_alpha_nominal(units: Mapping[Hashable, Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal labels (see `krippendorff_alpha`)."""
    return krippendorff_alpha(units, "nominal")
