"""Durations as people write them in config files: ``90``, ``"90s"``, ``"1h30m"``, ``"30d"``."""

from __future__ import annotations

import math
import re
from typing import Any

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_ORDER = ["d", "h", "m", "s", "ms"]
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
EXPECTED = "expected a duration > 0 such as 90, '90s', '10m', '1h30m' or '500ms'"


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string of ``<n>d<n>h<n>m<n>s<n>ms`` parts (largest first).

    Raises ValueError saying what was expected; zero, negative, non-finite and
    boolean values are refused.
    """
    seconds = _seconds(value)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{EXPECTED}, got {value!r}")
    return seconds


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    return _parse_parts(text)


def _parse_parts(text: str) -> float | None:
    total, pos, last = 0.0, 0, -1
    for match in _PART.finditer(text):
        if match.start() != pos:
            return None
        rank = _ORDER.index(match.group(2))
        if rank <= last:  # repeated or out-of-order unit, e.g. "1m1h"
            return None
        last, pos = rank, match.end()
        total += float(match.group(1)) * _UNITS[match.group(2)]
    return total if pos == len(text) and pos > 0 else None
