"""Settings: every tunable with its default and help text, declared once.

``settings:`` in ``inventory.yaml`` overrides them; ``Settings.describe()`` feeds the
docs and ``--help`` texts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from narwhal.config.duration import parse_duration
from narwhal.config.yamlfile import Document, format_path, show_value
from narwhal.errors import ConfigError, Problem

INVENTORY_FILE = "inventory.yaml"
KiB, MiB, GiB = 1024, 1024**2, 1024**3



def _setting(default: Any, kind: str, help: str) -> Any:
    return field(default=default, metadata={"kind": kind, "help": help})


@dataclass(frozen=True)
class Settings:
    """Tunables with their defaults, declared once; ``settings:`` in the inventory overrides."""

    health_interval: float = _setting(5.0, "duration", "seconds between health checks of each runner")
    health_timeout: float = _setting(10.0, "duration", "a health check slower than this marks the runner unhealthy")
    max_attempts: int = _setting(2, "count", "times a job is started before a lost runner makes it an error")
    log_cap: int = _setting(4 * MiB, "size", "log bytes kept per job; later output is dropped with a note")
    stop_grace: float = _setting(10.0, "duration", "seconds a cancelled or timed-out step gets between TERM and KILL")
    min_free_disk: int = _setting(1 * GiB, "size0", "a runner with less free disk for Docker is drained: it finishes its jobs and takes no new ones (0: no check)")
    connect_timeout: float = _setting(10.0, "duration", "seconds to wait for an SSH connection to a runner")
    keepalive_interval: float = _setting(5.0, "duration", "seconds between SSH keepalives")
    keepalive_count_max: int = _setting(3, "count", "unanswered keepalives before an SSH connection counts as lost")
    max_body: int = _setting(1 * MiB, "size", "largest request body the API accepts, in bytes")
    max_followers: int = _setting(2000, "count", "log streams (GET /jobs/ID/log?follow=1) open at once; more get 503")
    max_followers_per_client: int = _setting(50, "count", "log streams open at once from one client address; more get 503")
    follower_write_timeout: float = _setting(30.0, "duration", "a client that reads nothing of its answer or log stream for this long is dropped")
    max_fetches: int = _setting(8, "count", "repository clones/fetches run at once for submissions; a submission needing one more gets 503")
    max_fetches_per_host: int = _setting(2, "count", "of those, at once from one git server (local paths count as one server), so a stalled server cannot take every slot")
    fetch_wait: float = _setting(2.0, "duration", "seconds POST /commit waits for a fetch before answering 'resolving' (jobs follow when it ends)")
    fetch_timeout: float = _setting(300.0, "duration", "a clone or fetch still running after this is stopped (one stalled for 30s sooner)")

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) for every setting: for docs and ``--help`` text."""
        return [(f.name, f.default, f.metadata["help"]) for f in fields(cls)]


DEFAULT_SETTINGS = Settings()
_SIZE_RE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB}


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string like ``'512k'``, ``'4m'``, ``'1g'`` (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"expected a size in bytes such as 1048576, '512k', '4m' or '1g', got {show_value(value)}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"expected an integer >= 1, got {show_value(value)}")


def _positive_size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"expected a size > 0, got {show_value(value)}")
    return size


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "duration": parse_duration,
    "count": _count,
    "size": _positive_size,
    "size0": parse_size,
}


def parse_settings(raw: Any, filename: str = INVENTORY_FILE, document: Document | None = None) -> Settings:
    """Settings from the inventory's ``settings:`` mapping; ConfigError lists every problem."""
    if raw is None:
        return DEFAULT_SETTINGS
    if not isinstance(raw, dict):
        line = document.line_of(("settings",)) if document else None
        raise ConfigError([Problem(filename, line, "settings", f"expected a mapping, got {show_value(raw)}")])
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    problems = []
    for key, value in raw.items():
        path = ("settings", key)
        line = document.line_of(path) if document else None
        if key not in known:
            problems.append(Problem(filename, line, format_path(path), f"unknown key (allowed: {', '.join(known)})"))
            continue
        try:
            values[key] = _PARSERS[known[key].metadata["kind"]](value)
        except ValueError as e:
            problems.append(Problem(filename, line, format_path(path), str(e)))
    if problems:
        raise ConfigError(problems)
    return replace(DEFAULT_SETTINGS, **values)
