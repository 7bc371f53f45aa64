"""Small statistics helpers: percentiles, and median with min-max over rounds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of durations given in seconds, reported in milliseconds."""

    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1000.0

    return {
        "p50_ms": ms(percentile(values_s, 50)),
        "p95_ms": ms(percentile(values_s, 95)),
        "p99_ms": ms(percentile(values_s, 99)),
        "max_ms": ms(max(values_s) if values_s else None),
        "count": len(values_s),
    }


def spread(values: Sequence[float | None]) -> tuple[float, float, float, int] | None:
    """(median, min, max, n) of the values that exist, or None."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None
    return statistics.median(present), min(present), max(present), len(present)
