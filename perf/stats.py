"""Percentiles as the harness reports them: nearest rank, no interpolation.

Nearest rank means a reported p99 is a latency some request really had, which is what a
threshold should be judged on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of unsorted ``values``; None for an empty sequence."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[rank]


def sorted_percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """The same for values that are sorted already (charts call this per bucket)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
