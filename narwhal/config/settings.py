"""Settings: every tunable with its default and help text, declared once.

``settings:`` in ``inventory.yaml`` overrides them; ``Settings.describe()`` feeds the
docs and ``--help`` texts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from narwhal.config.duration import parse_duration
from narwhal.config.secrets import check_secret_name
from narwhal.config.yamlfile import Document, format_path, show_value
from narwhal.errors import ConfigError, Problem

INVENTORY_FILE = "inventory.yaml"
DEFAULT_LISTEN = "127.0.0.1:8080"  # where `narwhal serve` listens, and the CLI looks, by default
KiB, MiB, GiB = 1024, 1024**2, 1024**3


HOOKS_PREFIX = "/hooks/"  # webhook deliveries: signed by the forge, not sent with the API token


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
    max_hook_body: int = _setting(8 * MiB, "size", "largest webhook delivery (POST /hooks/NAME) accepted, in bytes; forges send whole commit lists")

    def body_limit(self, path: str) -> int:
        """The largest body a request to ``path`` may send."""
        return self.max_hook_body if path.startswith(HOOKS_PREFIX) else self.max_body
    # Step output.
    max_line: int = _setting(64 * KiB, "size", "longest log line kept, in bytes; a longer line is cut with a note and the rest of it dropped")
    # The API's HTTP boundary (read at start; a reload does not change them).
    public_names: tuple[str, ...] = _setting((), "names", "names (host or host:port) clients use to reach the API besides loopback and the listen address; any other Host or Origin is refused")
    read_token: bool = _setting(False, "flag", "reads need the API token too (not GET /health); needs a token")
    http_timeout: float = _setting(10.0, "duration", "seconds the API waits on a silent client socket (slow headers or body) before dropping it")
    # --- repositories: where sources may come from (narwhal.config.repository) ---
    local_roots: tuple[str, ...] = _setting((), "paths", "directories on the dispatcher's host whose git repositories may be built, given as a path or file:// (none: local repositories are refused)")
    fetch_hosts: tuple[str, ...] | None = _setting(None, "hosts", "hosts (`host` or `host:port`, globs allowed) the dispatcher may fetch repositories from (unset: the hosts the pipelines' repo patterns name; `*` only when listed)")
    # --- runners registered over the API ---
    api_runner_max_capacity: int = _setting(4, "count", "largest capacity a runner added over the API may have (inventory runners: 1024)")
    runner_files_dir: str | None = _setting(None, "dir", "directory that key and known_hosts files of runners added over the API must be in (none: they cannot name files and take the inventory's defaults)")
    api_runner_labels: tuple[str, ...] = _setting((), "labels", "labels a runner added over the API may carry (none: it may carry no labels, so it takes only pipelines that ask for none)")
    # --- submissions and log followers: what a slow or hostile client may hold ---
    max_followers: int = _setting(2000, "count", "log streams (GET /jobs/ID/log?follow=1) open at once; more get 503")
    max_followers_per_client: int = _setting(50, "count", "log streams open at once from one client address; more get 503")
    follower_write_timeout: float = _setting(30.0, "duration", "a client that reads nothing of its answer or log stream for this long is dropped")
    max_fetches: int = _setting(8, "count", "repository clones/fetches run at once for submissions; a submission needing one more gets 503")
    max_fetches_per_host: int = _setting(2, "count", "of those, at once from one git server (local paths count as one server), so a stalled server cannot take every slot")
    fetch_wait: float = _setting(2.0, "duration", "seconds POST /commit waits for a fetch before answering 'resolving' (jobs follow when it ends)")
    fetch_timeout: float = _setting(300.0, "duration", "a clone or fetch still running after this is stopped (one stalled for 30s sooner)")
    # --- pipelines' clone: (narwhal.execution.clone) ---
    clone_max_bytes: int = _setting(1 * GiB, "size", "largest workspace tar a pipeline's clone: (a .git, submodules) may make; larger fails the job")
    clone_cache: int = _setting(2 * GiB, "size0", "bytes of prepared clone: workspaces kept on the dispatcher for later jobs of the same commit (least recently used go first)")
    # --- commit statuses sent to forges (narwhal.dispatch.outbox) ---
    public_url: str | None = _setting(None, "url", "the dispatcher's URL as users reach it, such as https://ci.example.com: job URLs in API answers and commit statuses link to /jobs/ID there (none: answers give the path, statuses carry no link)")
    status_deadline: float = _setting(3600.0, "duration", "a commit status not delivered this long after its job changed is given up and shown as failed")
    status_retry: float = _setting(2.0, "duration", "wait before a commit status the forge did not take (down, 5xx, 429) is sent again; doubled each time")
    status_retry_max: float = _setting(300.0, "duration", "longest wait between two tries of one commit status")
    # --- pipeline caches on the runners (narwhal.execution.cache) ---
    cache_max_age: float = _setting(7 * 86400.0, "duration", "a cache not restored or saved for this long is removed from the runner")
    cache_max_total: int = _setting(10 * GiB, "size0", "caches of one runner's Docker engine together, at most; the least recently used go first (0: no limit)")
    cache_max_size: int = _setting(2 * GiB, "size", "largest cache one job may save; a bigger one is not saved, with a note")
    cache_timeout: float = _setting(600.0, "duration", "a cache restore or save still running after this is stopped (the job goes on without it)")
    cache_sweep_interval: float = _setting(600.0, "duration", "seconds between two evictions of old and surplus caches on each runner")
    # --- where the state lives (narwhal.dispatch.store; read at start, a reload keeps the running one) ---
    store: str | None = _setting(None, "store", "where the dispatcher keeps its state: none for SQLite in the state directory (STATE/narwhal.db), or a PostgreSQL database as postgresql://USER@HOST:PORT/DATABASE (no password in it; libpq's TLS and connection options such as ?sslmode=verify-full allowed, not host, user, passfile, service or options; needs narwhal[postgresql])")
    store_password: str | None = _setting(None, "secret", "the secret (declared under secrets:) that holds the PostgreSQL password; none: libpq's own ways (~/.pgpass, peer or certificate authentication)")
    cluster: bool = _setting(False, "flag", "several narwhal serve processes share the PostgreSQL store (needs a postgresql:// store): each claims jobs and runner slots under leases, and takes over the jobs of a node that stopped beating (false: one dispatcher per database)")

    # --- artifacts (narwhal.dispatch.artifacts): content-addressed files, rows in the store ---
    artifacts_dir: str | None = _setting(None, "dir", "directory of the artifact store (read at start; none: STATE/artifacts); the nodes of a cluster must all name one directory they share (NFS or similar), or a download through another node than the one that ran the job fails")
    artifacts_expire: float = _setting(30 * 86400.0, "duration", "how long a job's artifacts are kept when its pipeline's artifacts.expire does not say")
    artifacts_job_cap: int = _setting(1 * GiB, "size", "most bytes of artifacts one job keeps; collecting stops there, with a note in the job's log")
    artifacts_quota: int = _setting(10 * GiB, "size", "most bytes the artifact store holds (each distinct file once); a job that would go over stops collecting, with a note")
    artifacts_timeout: float = _setting(600.0, "duration", "a job's artifact collection still running after this is stopped (what came in is kept)")

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) for every setting: for docs and ``--help`` text."""
        return [(f.name, f.default, f.metadata["help"]) for f in fields(cls)]

    @classmethod
    def kind(cls, name: str) -> str:
        """How a setting is written: ``duration``, ``count``, ``size``, ``size0``, ``flag``, ``names``, ``paths``, ``hosts``, ``dir``, ``url``, ``store`` or ``secret``."""
        return {f.name: f.metadata["kind"] for f in fields(cls)}[name]


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


def show_setting(kind: str, value: Any) -> str:
    """A setting's value as one would write it in ``inventory.yaml``: ``10s``, ``4m``, ``2``."""
    if kind == "duration":
        return f"{value / 86400:g}d" if value >= 86400 and value % 86400 == 0 else f"{value:g}s"
    if kind in ("paths", "hosts", "labels"):
        return "pipelines' hosts" if value is None else "[" + ", ".join(value) + "]"
    if kind in ("dir", "url", "store", "secret"):
        return "none" if value is None else str(value)
    if kind in ("size", "size0"):
        for unit, factor in (("g", GiB), ("m", MiB), ("k", KiB)):
            if value and value % factor == 0:
                return f"{value // factor}{unit}"
    if kind == "flag":
        return "true" if value else "false"
    if kind == "names":
        return "[" + ", ".join(value) + "]"
    return str(value)


TABLE_BEGIN = "<!-- settings table: generated from narwhal.config.settings.Settings; do not edit -->"
TABLE_END = "<!-- end of settings table -->"


def settings_table() -> str:
    """The Markdown table of every setting, its default and its help, between the markers."""
    rows = [TABLE_BEGIN, "| setting | default | meaning |", "|---|---|---|"]
    for name, default, help in Settings.describe():
        rows.append(f"| `{name}` | `{show_setting(Settings.kind(name), default)}` | {help} |")
    return "\n".join([*rows, TABLE_END])


def replace_table(text: str) -> str:
    """TEXT with the settings table between the markers regenerated."""
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    return text[:start] + settings_table() + text[end:]


def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"expected an integer >= 1, got {show_value(value)}")


def _positive_size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"expected a size > 0, got {show_value(value)}")
    return size


_NAME_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.?)+|\[[0-9a-f:.]+\]")


def parse_names(value: Any) -> tuple[str, ...]:
    """Host names as ``host`` or ``host:port`` (``[::1]:8080`` for IPv6), lowercased."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of host names such as [ci.example.com, 'ci.example.com:8443'], "
                         f"got {show_value(value)}")
    names = []
    for raw in value:
        name = raw.strip().lower()
        host, sep, port = name, "", ""
        if name.count(":") == 1 or name.startswith("[") and "]:" in name:
            host, sep, port = name.rpartition(":")
        if not _NAME_RE.fullmatch(host) or sep and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"expected host or host:port, got {show_value(raw)}")
        names.append(f"{host.rstrip('.')}:{port}" if port else host.rstrip("."))
    return tuple(names)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {show_value(value)}")


def _list(value: Any, what: str, check: Callable[[str], bool]) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v and check(v) for v in items):
        raise ValueError(f"expected a list of {what}, got {show_value(value)}")
    return tuple(items)


_HOST_GLOB_RE = re.compile(r"[A-Za-z0-9*?.\[\]:-]+")


def _paths(value: Any) -> tuple[str, ...]:
    return _list(value, "absolute directory paths", lambda v: v.startswith("/"))


def _hosts(value: Any) -> tuple[str, ...]:
    return tuple(h.lower() for h in _list(value, "host names or globs (host or host:port)",
                                          lambda v: bool(_HOST_GLOB_RE.fullmatch(v))))


def _labels(value: Any) -> tuple[str, ...]:
    return _list(value, "runner labels", lambda v: bool(v.strip()) and v == v.strip())


def _directory(value: Any) -> str | None:
    """An absolute (or ``~``) directory path; ``none`` (or null) for no directory."""
    if value is None or value == "none":
        return None
    if isinstance(value, str) and "\x00" not in value and os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    raise ValueError(f"expected an absolute directory path or none, got {show_value(value)}")


_URL_HOST_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_URL_PATH_RE = re.compile(r"(?:/[A-Za-z0-9._~-]+)*/?")


def parse_public_url(value: Any) -> str | None:
    """The dispatcher's public base URL: http(s), a host, maybe a port and a plain path; no
    credentials, query or fragment. One spelling (scheme and host lowercased, no trailing
    ``/``); ``none`` (or null) for none."""
    if value is None or value == "none":
        return None
    problem = "expected the dispatcher's URL such as https://ci.example.com (http or https, no credentials, query or fragment)"
    if not isinstance(value, str) or len(value) > 2048 or not value.isascii():
        raise ValueError(f"{problem}, got {show_value(value)}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"{problem}, got {show_value(value)}") from None
    host = (parts.hostname or "").lower()
    if (parts.scheme.lower() not in ("http", "https") or "@" in parts.netloc or "?" in value or "#" in value
            or not _URL_HOST_RE.fullmatch(f"[{host}]" if ":" in host else host) or port == 0
            or not _URL_PATH_RE.fullmatch(parts.path) or "/./" in parts.path + "/" or "/../" in parts.path + "/"):
        raise ValueError(f"{problem}, got {show_value(value)}")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}[parts.scheme.lower()]:
        netloc += f":{port}"
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


_STORE_PROBLEM = ("expected none (SQLite in the state directory) or a PostgreSQL URL such as "
                  "postgresql://narwhal@db.example.com:5432/narwhal")
_STORE_DATABASE_RE = re.compile(r"/[A-Za-z0-9_.-]{1,63}")
_STORE_VALUE_RE = re.compile(r"[A-Za-z0-9_./:-]*")
# libpq parameters a store URL may carry: how to reach and trust the server, never who to be or
# where else to look. The host, port, user and database are the URL's own (so every message that
# shows the URL names where narwhal connects); a password only through store_password.
STORE_PARAMETERS = frozenset({
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "sslcrldir", "sslsni", "sslcompression",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "channel_binding", "require_auth",
    "gssencmode", "krbsrvname", "gsslib", "connect_timeout", "target_session_attrs", "load_balance_hosts",
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout", "requirepeer",
})
_STORE_REFUSED = {
    **dict.fromkeys(("host", "hostaddr", "port", "user", "dbname"),
                    "name the host, port, user and database in the URL itself "
                    "(postgresql://USER@HOST:PORT/DATABASE; a unix socket's directory as %2F-encoded HOST)"),
    **dict.fromkeys(("passfile", "service"),
                    "it would have libpq read the password or the connection from another file: "
                    "name the password's secret in store_password"),
    "options": "session settings are not taken from the URL",
    **dict.fromkeys(("application_name", "fallback_application_name", "client_encoding", "replication"),
                    "narwhal sets it itself"),
}
_PASSWORD_PROBLEM = ("the store URL must not hold a password (it would show wherever the URL does): "
                     "declare it as a secret and name it in store_password")


def parse_store(value: Any) -> str | None:
    """The ``store`` setting: None (SQLite in the state directory), or a ``postgresql://`` URL with
    a host and a database and no password (that comes from ``store_password``'s secret), and of
    libpq's parameters only ``STORE_PARAMETERS``. A refusal never shows the value: an operator
    may have put a password in it, in one spelling or another."""
    if value is None or value in ("none", "sqlite"):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{_STORE_PROBLEM}, got {show_value(value)}")  # a list or a mapping: not shown
    if len(value) > 2048 or not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError(f"{_STORE_PROBLEM}: it must be printable ASCII without spaces, at most 2048 characters")
    rest = value.partition("://")[2]
    userinfo = rest.partition("/")[0].partition("?")[0].rpartition("@")[0]
    keys = [unquote(item.partition("=")[0]).lower() for item in value.partition("?")[2].split("&")]
    if ":" in unquote(userinfo) or any("password" in key for key in keys):
        raise ValueError(_PASSWORD_PROBLEM)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{_STORE_PROBLEM}: its host or port is not one (a port is a number up to 65535)") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"{_STORE_PROBLEM}: it must start with postgresql://")
    if not parts.hostname:
        raise ValueError(f"{_STORE_PROBLEM}: it names no host")
    if not _STORE_DATABASE_RE.fullmatch(parts.path):
        raise ValueError(f"{_STORE_PROBLEM}: the database after the host must be a name of 1 to 63 letters, "
                         "digits, '_', '.' or '-'")
    if parts.fragment or value.endswith("#"):
        raise ValueError(f"{_STORE_PROBLEM}: no #fragment")
    for item in parts.query.split("&") if parts.query or value.endswith("?") else ():
        key, equals, setting = item.partition("=")
        shown = repr(key) if re.fullmatch(r"[a-z_]{1,40}", key) else "a parameter"
        if key in _STORE_REFUSED:
            raise ValueError(f"{_STORE_PROBLEM}: ?{key}= is not allowed: {_STORE_REFUSED[key]}")
        if key not in STORE_PARAMETERS:
            raise ValueError(f"{_STORE_PROBLEM}: {shown} is not one of the libpq parameters a store URL may carry "
                             f"({', '.join(sorted(STORE_PARAMETERS))})")
        if not equals or not _STORE_VALUE_RE.fullmatch(setting):
            raise ValueError(f"{_STORE_PROBLEM}: ?{key}= must have a value of letters, digits, '_', '.', '/', "
                             "':' or '-'")
    return value


def parse_secret_name(value: Any) -> str | None:
    """A secret's name (checked against ``secrets:`` by the loader), or none."""
    if value is None or value == "none":
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected the name of a secret declared under secrets:, got {show_value(value)}")
    return check_secret_name(value)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "duration": parse_duration,
    "count": _count,
    "size": _positive_size,
    "size0": parse_size,
    "names": parse_names,
    "flag": _flag,
    "paths": _paths,
    "hosts": _hosts,
    "dir": _directory,
    "labels": _labels,
    "url": parse_public_url,
    "store": parse_store,
    "secret": parse_secret_name,
}


def parse_setting(name: str, value: Any) -> Any:
    """One setting's value as written in the inventory (``'10s'``, ``'4m'``, ``3``); ValueError if bad."""
    return _PARSERS[Settings.kind(name)](value)


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
            values[key] = parse_setting(key, value)
        except ValueError as e:
            problems.append(Problem(filename, line, format_path(path), str(e)))
    if values.get("cluster") and values.get("store") is None and "settings.store" not in {p.path for p in problems}:
        line = document.line_of(("settings", "cluster")) if document else None
        problems.append(Problem(filename, line, "settings.cluster",
                                "needs a PostgreSQL store (settings.store: postgresql://...): "
                                "several dispatchers cannot share SQLite"))
    if problems:
        raise ConfigError(problems)
    return replace(DEFAULT_SETTINGS, **values)


if __name__ == "__main__":  # python -m narwhal.config.settings README.md: regenerate the table
    import sys
    from pathlib import Path

    for name in sys.argv[1:]:
        path = Path(name)
        path.write_text(replace_table(path.read_text()))
