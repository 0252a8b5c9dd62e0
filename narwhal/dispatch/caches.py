"""Cache eviction: when each cache was last used, and which caches a runner's engine drops.

The last use of a cache (restored or saved) is the dispatcher's record, in the store's
``cache_uses`` table, not a stamp in the volume: a restore mounts the cache read-only (a
job must not be able to change what it restores from), a Docker label cannot change once
set, and the dispatcher sees every use anyway, so the sweep needs no container and no
image. A cache the table does not know (made before the table, or by a job whose record
was lost) counts as used when the sweep first sees it.

The sweep runs with the runners' health checks, every ``cache_sweep_interval`` per runner:
it lists the owner's cache volumes with the sizes the Docker daemon measures (``docker
system df -v``: everything in the volume, old generations and interrupted saves included),
drops those unused for ``cache_max_age``, then the least recently used until the rest fit
in ``cache_max_total``. A volume a container holds (a restore or save under way) is not
removed this time. The table is one of the store's migrations (both backends).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable

from narwhal.dispatch.store import Store
from narwhal.errors import CommandFailed, DockerUnavailable
from narwhal.execution import docker
from narwhal.execution.transport import Result, Transport

log = logging.getLogger(__name__)

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKMGTP]?)i?B\s*")
DOCKER_TIMEOUT = 120.0  # seconds for one docker command of the sweep (`system df` measures every volume)
_UNITS = {"": 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5}


class CacheUses:
    """The ``cache_uses`` table over a ``Store``: (volume, repository, key, last use)."""

    def __init__(self, store: Store):
        self.store = store  # its transactions (``_tx``: the store's one helper, same layer); SQL both backends take

    def touch(self, caches: Iterable[tuple[str, str, str]], at: float) -> None:
        """(volume, repository, key) of caches used at ``at``."""
        with self.store._tx() as db:  # noqa: SLF001
            db.executemany("INSERT INTO cache_uses (volume, repo, key, used_at) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (volume) DO UPDATE SET used_at = CASE WHEN excluded.used_at > cache_uses.used_at "
                           "THEN excluded.used_at ELSE cache_uses.used_at END",
                           [(v, r, k, at) for v, r, k in caches])

    def last_used(self, volumes: Iterable[str], first_seen: float) -> dict[str, float]:
        """When each of ``volumes`` was last used; one not recorded yet is recorded as ``first_seen``."""
        volumes = list(volumes)
        with self.store._tx() as db:  # noqa: SLF001
            db.executemany("INSERT INTO cache_uses (volume, repo, key, used_at) VALUES (?, '', '', ?) "
                           "ON CONFLICT (volume) DO NOTHING",
                           [(v, first_seen) for v in volumes])
            out = {}
            for v in volumes:
                row = db.execute("SELECT used_at FROM cache_uses WHERE volume = ?", (v,)).fetchone()
                out[v] = float(row[0])
        return out

    def forget(self, volumes: Iterable[str]) -> None:
        with self.store._tx() as db:  # noqa: SLF001
            db.executemany("DELETE FROM cache_uses WHERE volume = ?", [(v,) for v in volumes])

    def all(self) -> list[dict]:
        with self.store._tx(write=False) as db:  # noqa: SLF001
            rows = db.execute("SELECT volume, repo, key, used_at FROM cache_uses ORDER BY used_at").fetchall()
        return [{"volume": v, "repo": r, "key": k, "used_at": u} for v, r, k, u in rows]


def choose(sizes: dict[str, int], used: dict[str, float], *, now: float, max_age: float,
           max_total: int) -> list[tuple[str, str]]:
    """(volume, why) to evict: unused for ``max_age``, then the least recently used until the
    rest take at most ``max_total`` bytes (0: no limit). Pure."""
    out: list[tuple[str, str]] = []
    left = []
    for name in sorted(sizes, key=lambda n: (used.get(n, now), n)):
        age = now - used.get(name, now)
        if age > max_age:
            out.append((name, f"unused for {age / 86400:.1f} days"))
        else:
            left.append(name)
    total = sum(sizes[n] for n in left)
    for name in left:
        if not max_total or total <= max_total:
            break
        out.append((name, f"least recently used; caches took {total} bytes, limit {max_total}"))
        total -= sizes[name]
    return out


def parse_size(text: str) -> int:
    """Bytes from Docker's human size (``31B``, ``1.2kB``, ``3.4GB``: powers of 1000); 0 when unreadable."""
    match = _SIZE.fullmatch(text or "")
    if not match:
        return 0
    return int(float(match.group(1)) * _UNITS[match.group(2)])


async def cache_sizes(transport: Transport, owner: str) -> dict[str, int]:
    """The owner's cache volumes on this runner's engine and their sizes in bytes."""
    listed = await _control(transport, docker.cache_volumes(owner))
    names = set(listed.stdout.decode("utf-8", "replace").split())
    if not names:
        return {}
    result = await _control(transport, docker.volume_sizes())
    sizes = {name: 0 for name in names}
    try:
        volumes = json.loads(result.stdout.decode("utf-8", "replace") or "[]")
    except ValueError:
        volumes = []
    for volume in volumes if isinstance(volumes, list) else []:
        if isinstance(volume, dict) and volume.get("Name") in names:
            sizes[volume["Name"]] = parse_size(str(volume.get("Size", "")))
    return sizes


async def sweep(transport: Transport, owner: str, uses: CacheUses, *, now: float, max_age: float,
                max_total: int) -> list[tuple[str, str]]:
    """Evict what ``choose`` says on one runner; (volume, why) of those removed."""
    sizes = await cache_sizes(transport, owner)
    if not sizes:
        return []
    used = await asyncio.to_thread(uses.last_used, list(sizes), now)
    evict = choose(sizes, used, now=now, max_age=max_age, max_total=max_total)
    if not evict:
        return []
    result = await _control(transport, docker.remove_volumes([name for name, _ in evict]), check=False)
    gone = set(result.stdout.decode("utf-8", "replace").split())
    removed = [(name, why) for name, why in evict if name in gone]
    if removed:
        await asyncio.to_thread(uses.forget, [name for name, _ in removed])
    return removed


async def _control(transport: Transport, argv: list[str], *, check: bool = True) -> Result:
    try:
        result = await transport.run(argv, timeout=DOCKER_TIMEOUT)
    except TimeoutError:
        raise DockerUnavailable(f"docker unavailable: `{' '.join(argv[:3])}` did not answer "
                                f"within {DOCKER_TIMEOUT:g}s on {transport.name}") from None
    if check and not result.ok:
        raise CommandFailed(result.argv, result.exit_status, result.output)
    return result
