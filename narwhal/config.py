"""The whole configuration of a dispatcher: runners, pipelines and settings.

A config directory holds ``inventory.yaml`` (runners, optional ``defaults:`` and
``settings:``) and ``pipelines/*.yaml``. Every file is checked and all problems are
reported at once; things that are suspicious but not wrong become warnings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from narwhal.duration import parse_duration
from narwhal.errors import ConfigError, Problem
from narwhal.inventory import Inventory, Runner, parse_inventory
from narwhal.pipeline import Pipeline, load_pipelines
from narwhal.yamlfile import Document, format_path, line_order, load_yaml, show_value

INVENTORY_FILE = "inventory.yaml"
PIPELINES_DIR = "pipelines"
KiB, MiB, GiB = 1024, 1024**2, 1024**3


# --- settings ----------------------------------------------------------------------


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


# --- the whole configuration -------------------------------------------------------


@dataclass
class Config:
    inventory: Inventory
    pipelines: list[Pipeline]
    settings: Settings = DEFAULT_SETTINGS
    config_dir: Path | None = None
    warnings: list[Problem] = field(default_factory=list)

    @property
    def runners(self) -> list[Runner]:
        return self.inventory.runners

    def pipeline(self, name: str) -> Pipeline | None:
        return next((p for p in self.pipelines if p.name == name), None)

    def pipelines_for(self, repo: str, branch: str | None = None) -> list[Pipeline]:
        """Pipelines a commit on ``repo``/``branch`` should run, in file order."""
        return [p for p in self.pipelines if p.matches(repo, branch)]

    def runners_for(self, pipeline: Pipeline) -> list[Runner]:
        """Inventory runners whose labels cover the pipeline's."""
        return [r for r in self.runners if r.carries(pipeline.labels)]


def default_config_dir() -> Path:
    """``$NARWHAL_CONFIG``, else the current directory."""
    return Path(os.environ.get("NARWHAL_CONFIG") or ".")


def load_config(directory: str | os.PathLike | None = None) -> Config:
    """Load ``inventory.yaml`` and ``pipelines/`` from ``directory``.

    Raises one ConfigError carrying the problems of every file; file names in it
    are relative to ``directory``.
    """
    root = Path(directory) if directory is not None else default_config_dir()
    if not root.is_dir():
        raise ConfigError([Problem(str(root), None, "", "config directory not found")])
    problems: list[Problem] = []
    inventory, settings = _load_inventory(root, problems)
    pipelines = _load_pipelines(root, problems)
    if problems:
        raise ConfigError(problems)
    assert inventory is not None and settings is not None
    config = Config(inventory, pipelines, settings, root)
    config.warnings = find_warnings(config)
    return config


def _load_inventory(root: Path, problems: list[Problem]) -> tuple[Inventory | None, Settings | None]:
    try:
        document = load_yaml(root / INVENTORY_FILE, INVENTORY_FILE)
    except ConfigError as e:
        problems += e.problems
        return None, None
    found: list[Problem] = []
    inventory = settings = None
    try:
        inventory = parse_inventory(document)
    except ConfigError as e:
        found += e.problems
    raw_settings = document.data.get("settings") if isinstance(document.data, dict) else None
    try:
        settings = parse_settings(raw_settings, INVENTORY_FILE, document)
    except ConfigError as e:
        found += [p for p in e.problems if p not in found]
    problems += sorted(found, key=line_order)
    return inventory, settings


def _load_pipelines(root: Path, problems: list[Problem]) -> list[Pipeline]:
    directory = root / PIPELINES_DIR
    if not directory.is_dir():
        return []
    try:
        return load_pipelines(directory, PIPELINES_DIR)
    except ConfigError as e:
        problems += e.problems
        return []


def find_warnings(config: Config) -> list[Problem]:
    """Things that are valid but probably not meant: a pipeline no runner can take."""
    warnings = []
    if not config.runners:
        warnings.append(Problem(INVENTORY_FILE, None, "runners", "no runners (add them here or with POST /runner)"))
    if not config.pipelines:
        warnings.append(Problem(PIPELINES_DIR, None, "", "no pipelines (add pipelines/NAME.yaml)"))
    all_labels = {label for r in config.runners for label in r.labels}
    for pipeline in config.pipelines:
        warnings += _label_warnings(pipeline, config.runners, all_labels)
    return warnings


def _label_warnings(pipeline: Pipeline, runners: list[Runner], all_labels: set[str]) -> list[Problem]:
    if not runners or any(r.carries(pipeline.labels) for r in runners):
        return []
    missing = [(i, label) for i, label in enumerate(pipeline.labels) if label not in all_labels]
    out = []
    for i, label in missing:
        file, line = pipeline.where(("labels", i))
        out.append(Problem(file or pipeline.name, line, "labels", f"no runner has label {label!r}"))
    if not missing:
        file, line = pipeline.where(("labels",))
        wanted = ", ".join(repr(label) for label in pipeline.labels)
        out.append(Problem(file or pipeline.name, line, "labels", f"no single runner has all of {wanted}"))
    return out


def summarize(config: Config) -> dict:
    """Plain data for ``narwhal check`` (rendered by rich, or printed with ``--json``)."""
    return {
        "runners": [
            {
                "name": r.name,
                "transport": r.transport,
                "host": r.host,
                "labels": list(r.labels),
                "capacity": r.capacity,
            }
            for r in config.runners
        ],
        "pipelines": [
            {
                "name": p.name,
                "repo": list(p.repo),
                "branches": list(p.branches) if p.branches is not None else None,
                "labels": list(p.labels),
                "steps": [s.name for s in p.steps],
                "runners": [r.name for r in config.runners_for(p)],
            }
            for p in config.pipelines
        ],
        "warnings": [str(w) for w in config.warnings],
    }
