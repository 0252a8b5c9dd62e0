"""Is a runner fit to take jobs? One round trip: docker info, load average, free disk.

``check`` never raises: every failure (unreachable, host key, Docker down) is an
``unhealthy`` Health with a reason the operator can act on.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from narwhal.config.settings import DEFAULT_SETTINGS
from narwhal.errors import NarwhalError
from narwhal.execution.transport import Transport

# A fixed script (no user input): sections are marked so one round trip answers everything.
# The first line of the docker section is Docker's data dir, used for `df`.
SCRIPT = r"""
out=$(docker info --format '{{.DockerRootDir}}{{"\n"}}{{json .}}' 2>&1); rc=$?
echo "== docker $rc"
printf '%s\n' "$out"
echo "== load"
cat /proc/loadavg 2>&1
echo "== df"
root=$(printf '%s\n' "$out" | head -n 1)
case "$root" in /*) df -Pk -- "$root" 2>&1 ;; esac
echo "== end"
"""


@dataclass
class Health:
    state: str  # "healthy" | "unhealthy" | "unknown"
    reason: str | None = None
    checked_at: float | None = None
    docker_version: str | None = None
    load: float | None = None  # 1-minute load average
    free_disk: int | None = None  # bytes free on Docker's data dir
    ncpu: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_healthy(self) -> bool:
        return self.state == "healthy"


async def check(transport: Transport, timeout: float = DEFAULT_SETTINGS.health_timeout) -> Health:
    """Ask the runner how it is, in one command; a failure is an answer too.

    The timeout is ``Settings.health_timeout``: the scheduler passes the configured one.
    """
    now = time.time()
    try:
        result = await asyncio.wait_for(transport.run(["sh", "-c", SCRIPT], timeout=timeout),
                                        timeout + 5)
    except NarwhalError as exc:
        return Health("unhealthy", str(exc), now)
    except TimeoutError:
        return Health("unhealthy", f"no answer within {timeout:g}s", now)
    except Exception as exc:  # noqa: BLE001 - never raise: health is reported, not thrown
        # The type, not the text: a library's message may quote a file it read.
        return Health("unhealthy", f"health check failed: unexpected {type(exc).__name__}", now)
    return parse(result.stdout.decode("utf-8", "replace"), now)


def parse(text: str, checked_at: float) -> Health:
    """Turn the script's sectioned output into a Health."""
    sections = _sections(text)
    docker_head = sections.get("docker", ("", []))
    rc, docker_lines = docker_head
    health = Health("healthy", None, checked_at)
    health.load = _load(sections.get("load", ("", []))[1])
    health.free_disk = _free_disk(sections.get("df", ("", []))[1])
    if rc.strip() != "0":
        return _unhealthy(health, "docker unavailable: " + _first_error(docker_lines))
    info = _info(docker_lines[1:] if len(docker_lines) > 1 else [])
    if info is None:
        return _unhealthy(health, "docker unavailable: unreadable `docker info` output")
    errors = info.get("ServerErrors") or []
    if errors:
        return _unhealthy(health, "docker unavailable: " + "; ".join(map(str, errors)))
    health.docker_version = info.get("ServerVersion") or None
    health.ncpu = info.get("NCPU") if isinstance(info.get("NCPU"), int) else None
    if health.docker_version is None:
        return _unhealthy(health, "docker unavailable: no server version")
    return health


def _unhealthy(health: Health, reason: str) -> Health:
    health.state = "unhealthy"
    health.reason = reason
    return health


def _sections(text: str) -> dict[str, tuple[str, list[str]]]:
    sections: dict[str, tuple[str, list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("== "):
            name, _, arg = line[3:].partition(" ")
            current = []
            sections[name] = (arg, current)
        elif current is not None:
            current.append(line)
    return sections


def _first_error(lines: list[str]) -> str:
    """Docker's own complaint: the daemon line if any, else the first plain (non-JSON) line."""
    plain = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("{")]
    for line in plain:
        if "docker daemon" in line.lower():
            return line
    info = _info(lines) or {}
    if info.get("ServerErrors"):
        return "; ".join(map(str, info["ServerErrors"]))
    return plain[0] if plain else "docker info failed"


def _info(lines: list[str]) -> dict[str, Any] | None:
    for line in lines:
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _load(lines: list[str]) -> float | None:
    try:
        return float(lines[0].split()[0])
    except (IndexError, ValueError):
        return None


def _free_disk(lines: list[str]) -> int | None:
    """`df -Pk` data line: filesystem, blocks, used, available (1K blocks), ..."""
    for line in lines[1:]:
        fields = line.split()
        if len(fields) >= 4 and fields[3].isdigit():
            return int(fields[3]) * 1024
    return None
