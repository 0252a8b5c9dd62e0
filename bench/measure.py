"""Small statistics for the benchmark: medians, nearest-rank percentiles, ratios."""

from __future__ import annotations

import math
import statistics


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank q-quantile (0 < q <= 1): a value that was really measured."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values: list[float]) -> dict:
    """n, median, p95, min and max of a sample (seconds, or whatever unit it came in)."""
    if not values:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None}
    return {"n": len(values), "median": statistics.median(values), "p95": percentile(values, 0.95),
            "min": min(values), "max": max(values)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
