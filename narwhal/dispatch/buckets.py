"""Log-spaced histogram buckets: how the stats keep durations and waits in a few rows.

8 buckets per doubling (each ~9% wide); percentiles report a bucket's upper bound. The
store counts into them as jobs change (``bucket_of``), and a rebuild counts in SQL: SQLite
calls ``sql_bucket``, PostgreSQL has the same function in SQL (``narwhal_bucket``).
"""

from __future__ import annotations

import math

BUCKETS_PER_DOUBLING = 8


def bucket_of(seconds: float) -> int:
    """Log-spaced bucket of a duration: 8 buckets per doubling, so ~9% wide.

    Durations under a millisecond (and negative ones from clock skew) share bucket 0.
    """
    ms = max(float(seconds) * 1000.0, 1.0)
    return round(BUCKETS_PER_DOUBLING * math.log2(ms))


def bucket_upper(bucket: int) -> float:
    """Upper bound of a bucket, in seconds (what percentiles report)."""
    return 2 ** ((bucket + 0.5) / BUCKETS_PER_DOUBLING) / 1000.0


def sql_bucket(seconds: float | None) -> int | None:
    return None if seconds is None else bucket_of(seconds)


def percentile(hist: list[tuple[int, int]], q: float) -> float | None:
    """q-quantile (0 < q <= 1) of a histogram given as sorted (bucket, count) pairs."""
    total = sum(c for _, c in hist)
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket, count in hist:
        seen += count
        if seen >= rank:
            return round(bucket_upper(bucket), 3)
    return round(bucket_upper(hist[-1][0]), 3)
