"""Runner hosts narwhal may use: the inventory file and runners added over the API."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from narwhal.config.settings import DEFAULT_SETTINGS, Settings
from narwhal.config.yamlfile import (
    Document,
    duplicate_names,
    line_order,
    load_yaml,
    matching,
    show_value,
    validation_problems,
)
from narwhal.errors import ConfigError, Problem

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
MEMORY_RE = re.compile(r"([0-9]+)([bkmg]?)")  # [0-9]: \d would take any Unicode digit
NETWORK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_CAPACITY = 1024  # jobs at once on one runner; more is a typo (or an attempt to win every pick)
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOST_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


# Runner and pipeline names end up in container names and URLs: keep them plain.
check_name = matching(NAME_RE, "a name of letters, digits, '.', '_' or '-' "
                               "(1-63 characters, starting with a letter or digit)")
# Labels are matched literally against pipelines' labels.
check_label = matching(LABEL_RE, "a label of letters, digits, '.', '_', ':', '/' or '-' "
                                 "(starting with a letter or digit)", max_length=128)
_check_network = matching(NETWORK_RE, "a Docker network name such as none, bridge or host")  # no `container:`
_check_user = matching(USER_RE, "a user name of lowercase letters, digits, '_' or '-' "
                                "(starting with a letter or '_', at most 32)")


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


Name = Annotated[str, AfterValidator(check_name)]
Labels = Annotated[list[Annotated[str, AfterValidator(check_label)]], AfterValidator(_unique)]


def _memory_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Limits(BaseModel):
    """Resource limits for every step container on a runner."""

    model_config = ConfigDict(extra="forbid", strict=True)

    memory: Annotated[str, BeforeValidator(_memory_to_str)] = "2g"
    cpus: float = Field(default=2.0, gt=0)
    pids: int = Field(default=1024, gt=0)

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        match = MEMORY_RE.fullmatch(value.strip().lower())
        if not match or int(match.group(1)) <= 0:
            raise ValueError(f"expected a size > 0 such as '512m' or '2g', got {show_value(value)}")
        return match.group(0)


DEFAULT_LIMITS = Limits()


class Runner(BaseModel):
    """One host that runs jobs, reached over SSH (or this machine, ``transport: local``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    host: str = "localhost"
    port: int = Field(22, ge=1, le=65535)
    user: Annotated[str, AfterValidator(_check_user)] = "narwhal"
    key: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    labels: Labels = []
    capacity: int = Field(1, ge=1, le=MAX_CAPACITY)
    transport: Literal["ssh", "local"] = "ssh"
    limits: Limits = Field(default_factory=Limits)
    # The Docker network steps join. `none` by default: a build reaches nothing unless the
    # runner's admin says so (`bridge`, `host` or a named network); pipelines cannot.
    network: Annotated[str, AfterValidator(_check_network)] = "none"

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if _is_ip(value) or (HOST_RE.fullmatch(value) and len(value) <= 253):
            return value
        raise ValueError(f"expected a host name or IP address, got {show_value(value)}")

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _check_path(value)
        return os.path.expanduser(value)

    @field_validator("known_hosts")
    @classmethod
    def _known_hosts(cls, value: str) -> str:
        _check_path(value)
        return value

    @property
    def known_hosts_path(self) -> Path:
        """Expanded when used, so a dispatcher started as another user finds its own."""
        return Path(os.path.expanduser(self.known_hosts))

    @property
    def is_local(self) -> bool:
        return self.transport == "local"

    def carries(self, labels: list[str]) -> bool:
        """Whether this runner has every one of ``labels`` (a pipeline's requirement)."""
        return set(labels) <= set(self.labels)


class Inventory(BaseModel):
    """The inventory file: runners, defaults merged under each, and optional settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    runners: list[Runner] = []
    defaults: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None  # validated by narwhal.config
    secrets: dict[Any, Any] | None = None  # validated (and read) by narwhal.config.secrets
    forges: list[Any] | None = None  # validated by narwhal.config.forges
    repos: list[Any] | None = None  # repository credentials, validated by narwhal.config.credentials

    def runner(self, name: str) -> Runner | None:
        return next((r for r in self.runners if r.name == name), None)


def load_inventory(path: str | os.PathLike, name: str | None = None) -> Inventory:
    """Load and validate an inventory file; ConfigError lists every problem in it."""
    return parse_inventory(load_yaml(path, name))


def parse_inventory(data: Document | Any, filename: str | None = None) -> Inventory:
    """Validate inventory data (a Document keeps line numbers in the messages)."""
    document = data if isinstance(data, Document) else Document(data, filename or "inventory")
    filename = filename or document.filename
    problems: list[Problem] = []
    raw = {} if document.data is None else document.data
    if not isinstance(raw, dict):
        raise ConfigError([Problem(filename, document.line_of(()), "", f"expected a mapping, got {show_value(raw)}")])
    defaults, defaults_problems = _check_defaults(raw.get("defaults"), filename, document)
    problems += defaults_problems
    merged = dict(raw)
    if isinstance(raw.get("runners"), list):
        merged["runners"] = [{**defaults, **r} if isinstance(r, dict) else r for r in raw["runners"]]
    problems += duplicate_names(raw.get("runners"), "runners", "runner", filename, document)
    inventory = None
    try:
        inventory = Inventory.model_validate(merged)
    except ValidationError as e:
        problems += validation_problems(e, Inventory, filename, document)
    if problems:
        raise ConfigError(sorted(problems, key=line_order))
    assert inventory is not None
    return inventory


def validate_runner(data: Any, source: str = "api", defaults: dict | None = None,
                    settings: Settings = DEFAULT_SETTINGS) -> Runner:
    """Validate one runner given outside the inventory (``POST /runner``, or its stored copy).

    The inventory's ``defaults:`` are merged under it, as under inventory runners. A runner
    from the API is untrusted: it runs over SSH with no network for steps, a bounded
    capacity, the inventory's limits, only the labels ``settings.api_runner_labels`` allows,
    and key or known_hosts files only inside ``settings.runner_files_dir``.
    Problems are reported as ``runner.<field>`` against ``source``; none echoes a file.
    """
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, None, "runner", f"expected a mapping, got {show_value(data)}")])
    data = {k: v for k, v in data.items() if not (k in ("key", "known_hosts") and v is None)}
    problems = _untrusted_problems(data, source, settings) if source == "api" else []
    merged = {**(defaults or {}), **data}
    if source == "api":
        merged |= {"transport": "ssh", "network": "none"}  # not the defaults' either: the admin's own
        files_dir = settings.runner_files_dir
        for field in ("key", "known_hosts"):
            inside = _inside(files_dir, data[field]) if field in data and files_dir is not None else None
            if inside is not None:
                merged[field] = inside
    try:
        runner = Runner.model_validate(merged)
    except ValidationError as e:
        said = {p.path for p in problems}  # one message per field: ours says why
        problems += [p for p in validation_problems(e, Runner, source, None, ("runner",)) if p.path not in said]
        raise ConfigError(problems) from None
    limit = settings.api_runner_max_capacity
    if source == "api" and runner.capacity > limit:
        problems.append(Problem(source, None, "runner.capacity",
                                f"at most {limit} for a runner added over the API "
                                f"(setting api_runner_max_capacity), got {runner.capacity}"))
    if problems:
        raise ConfigError(problems)
    return runner


def _untrusted_problems(data: dict, source: str, settings: Settings) -> list[Problem]:
    """What a runner from the API may not choose: these take jobs that trust narwhal's host."""
    problems = []

    def refuse(field: str, why: str) -> None:
        problems.append(Problem(source, None, f"runner.{field}", why))

    if "transport" in data and data["transport"] != "ssh":
        refuse("transport", "a runner added over the API must use ssh "
                            "(transport: local runs steps on the dispatcher's host: inventory only)")
    if "network" in data and data["network"] != "none":
        refuse("network", "a runner added over the API runs steps with network none "
                          "(other networks: inventory only)")
    if "limits" in data:
        refuse("limits", "a runner added over the API takes the inventory's limits (defaults: limits); "
                         "it cannot choose its own")
    labels = data.get("labels")
    allowed = set(settings.api_runner_labels)
    if isinstance(labels, list) and not set(map(str, labels)) <= allowed:
        extra = sorted(set(map(str, labels)) - allowed)
        refuse("labels", f"a runner added over the API may carry only the labels the setting "
                         f"api_runner_labels lists ({', '.join(sorted(allowed)) or 'none'}); not {', '.join(extra)}")
    files_dir = settings.runner_files_dir
    for field in ("key", "known_hosts"):
        value = data.get(field)
        if field not in data:
            continue
        if files_dir is None:
            refuse(field, "a runner added over the API cannot name files (the inventory's defaults "
                          "apply; an admin may allow files in a directory with setting runner_files_dir)")
        elif _inside(files_dir, value) is None:
            refuse(field, "must be a file inside the directory the setting runner_files_dir names")
    return problems


def _inside(directory: str, value: Any) -> str | None:
    """VALUE (relative to DIRECTORY if not absolute) with links resolved, if inside DIRECTORY.

    Only paths are compared: nothing says whether the file exists or what it holds.
    """
    if not isinstance(value, str) or not value.strip() or "\x00" in value or value.startswith("-"):
        return None
    root = os.path.realpath(os.path.expanduser(directory))
    path = os.path.realpath(os.path.join(root, os.path.expanduser(value)))  # an absolute VALUE replaces root
    if path == root or os.path.commonpath([root, path]) != root:
        return None
    return path


def _check_defaults(raw: Any, filename: str, document: Document) -> tuple[dict, list[Problem]]:
    """Defaults are runner fields without a name; return them only when they are valid."""
    if raw is None or not isinstance(raw, dict):
        return {}, []  # a non-mapping is reported by the Inventory model itself
    if "name" in raw:
        line = document.line_of(("defaults", "name"))
        return {}, [Problem(filename, line, "defaults.name", "a runner's name cannot have a default")]
    try:
        Runner.model_validate({**raw, "name": "defaults"})
    except ValidationError as e:
        return {}, validation_problems(e, Runner, filename, document, ("defaults",))
    return raw, []


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _check_path(value: str) -> None:
    if not value.strip() or "\x00" in value or value.startswith("-"):
        raise ValueError(f"expected a file path, got {show_value(value)}")
