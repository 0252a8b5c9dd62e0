"""A job's caches on its runner: keys, restore before the first step, save after a passing job.

The dispatcher renders each cache's key (``keys_for``: the ``hash`` of files comes from its
git mirror, never from the runner) and hands the runner ``CacheKey`` values in the
``JobSpec``. On the runner (``JobCaches``):

* restore: ``docker volume inspect`` says which cache volumes exist; if any does, one
  helper container (the pipeline's image, the steps' hardening, no network) mounts them
  read-only and copies each one's current generation of its paths into the workspace,
  which it creates. Each cache's line says ``restored (12.0 MiB)`` or ``miss``.
* save, after a passing job: the caches whose ``save`` asks for it (``on_miss``: only those
  the restore missed; ``always``; never for ``never`` or a pull request) get their volume
  (``docker volume create``, labelled) and one helper container writes a new generation
  and switches to it atomically (``docker.CACHE_SAVE``). A save that fails, times out or is
  too big is a note; the job still passed. A cancel stops it and cancels the job.

Eviction (by age and total size) is the dispatcher's: ``narwhal.dispatch.caches``.
"""

from __future__ import annotations

import secrets as secrets_mod
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from narwhal.config.cache import render
from narwhal.config.pipeline import Pipeline
from narwhal.execution import docker

SAVE_NEVER_EVENTS = ("pull_request",)  # strangers' code: it may read caches, never write them
TAIL = 20  # lines of a helper's own output kept to explain a failure


@dataclass(frozen=True)
class CacheKey:
    """One cache of one job: its rendered key, paths and save policy."""

    key: str
    paths: tuple[str, ...]
    save: str  # on_miss, always, never


def keys_for(pipeline: Pipeline, *, branch: str | None, event: str,
             entries: Callable[[list[str]], Iterable[tuple[str, str]]]) -> tuple[CacheKey, ...]:
    """The caches of one job of ``pipeline``. ``entries(paths)``: the commit's files at or under
    ``paths`` as (path, "mode type oid"), from the dispatcher's mirror."""
    out = []
    for cache in pipeline.cache:
        save = "never" if event in SAVE_NEVER_EVENTS else cache.save
        out.append(CacheKey(render(cache.key, branch=branch, entries=entries), tuple(cache.paths), save))
    return tuple(out)


def volumes_of(owner: str, repo: str, caches: Iterable[CacheKey]) -> list[tuple[str, str, str]]:
    """(volume, repository, key) of each cache."""
    return [(docker.cache_volume_name(owner, repo, c.key), repo, c.key) for c in caches]


def size_text(kib: int) -> str:
    if kib < 1024:
        return f"{kib} KiB"
    if kib < 1024 * 1024:
        return f"{kib / 1024:.1f} MiB"
    return f"{kib / 1024 / 1024:.2f} GiB"


# How the runner hands its own machinery to JobCaches: run a docker command of narwhal's
# own (control), and run a helper container to its end under the job's cancel and
# deadline (supervise: returns its exit code, raises the runner's stop).
Control = Callable[..., Awaitable]
Supervise = Callable[[list[str], str, Callable[[list[str]], None], float], Awaitable[int]]


@dataclass
class JobCaches:
    """The caches of one running job (its runner's side)."""

    owner: str
    repo: str
    job_id: int
    attempt: int
    caches: tuple[CacheKey, ...]
    image: str
    volume: str  # the job's workspace
    labels: dict[str, str]
    limits: docker.LimitsLike
    timeout: float
    max_bytes: int
    note: Callable[[str], None]
    control: Control
    supervise: Supervise
    hit: set[int] = field(default_factory=set)  # indexes restored

    def _volume(self, cache: CacheKey) -> str:
        return docker.cache_volume_name(self.owner, self.repo, cache.key)

    def _name(self, what: str) -> str:
        return docker.container_name(self.owner, self.job_id, self.attempt, f"cache-{what}")

    async def restore(self) -> None:
        """Copy every cache that exists into the workspace (which this creates, when it does)."""
        volumes = [self._volume(c) for c in self.caches]
        listed = await self.control(docker.existing_volumes(volumes), check=False)
        present = set(listed.stdout.decode("utf-8", "replace").split())
        wanted = [(i, c) for i, c in enumerate(self.caches) if volumes[i] in present]
        for i, cache in enumerate(self.caches):
            if volumes[i] not in present:
                self.note(f"cache {cache.key}: miss")
        if not wanted:
            return
        token = secrets_mod.token_hex(16)
        name = self._name("restore")
        argv = docker.restore_caches(name, self.image, token, [(volumes[i], c.paths) for i, c in wanted],
                                     owner=self.owner, volume=self.volume,
                                     label_values={**self.labels, docker.LABEL_STEP: "cache restore"},
                                     limits=self.limits)
        began = time.monotonic()
        answers, tail, code = await self._helper(argv, name, token)
        took = time.monotonic() - began
        for slot, (i, cache) in enumerate(wanted):
            what = answers.get(slot, ["failed"])
            if what[0] == "hit":
                self.hit.add(i)
                self.note(f"cache {cache.key}: restored ({size_text(_kib(what))} in {took:.1f}s)")
            elif what[0] == "miss":
                self.note(f"cache {cache.key}: miss")
            else:
                self.note(f"cache {cache.key}: restore failed (exit {code}){_last(tail)}; running without it")

    def to_save(self) -> list[tuple[int, CacheKey]]:
        return [(i, c) for i, c in enumerate(self.caches)
                if c.save == "always" or (c.save == "on_miss" and i not in self.hit)]

    async def save(self) -> None:
        """Save the caches that ask for it (after a passing job)."""
        chosen = self.to_save()
        if not chosen:
            return
        volumes = []
        for _, cache in chosen:
            volume = self._volume(cache)
            await self.control(docker.create_cache_volume(
                volume, docker.cache_labels(self.owner, self.repo, cache.key)))
            volumes.append(volume)
        token = secrets_mod.token_hex(16)
        generation = f"{self.job_id}-{self.attempt}-{secrets_mod.token_hex(4)}"
        name = self._name("save")
        argv = docker.save_caches(name, self.image, token, generation,
                                  [(v, c.paths) for v, (_, c) in zip(volumes, chosen, strict=True)],
                                  owner=self.owner, volume=self.volume,
                                  label_values={**self.labels, docker.LABEL_STEP: "cache save"},
                                  max_kib=max(1, self.max_bytes // 1024), stale=stale_after(self.timeout),
                                  limits=self.limits)
        began = time.monotonic()
        answers, tail, code = await self._helper(argv, name, token)
        took = time.monotonic() - began
        for slot, (_, cache) in enumerate(chosen):
            what = answers.get(slot, ["failed"])
            if what[0] == "saved":
                self.note(f"cache {cache.key}: saved ({size_text(_kib(what))} in {took:.1f}s)")
            elif what[0] == "empty":
                self.note(f"cache {cache.key}: not saved: none of its paths exist ({', '.join(cache.paths)})")
            elif what[0] == "toobig":
                self.note(f"cache {cache.key}: not saved: {size_text(_kib(what))} is more than cache_max_size "
                          f"({size_text(self.max_bytes // 1024)})")
            else:
                self.note(f"cache {cache.key}: save failed (exit {code}){_last(tail)}")

    async def _helper(self, argv: list[str], name: str, token: str) -> tuple[dict[int, list[str]], list[str], int]:
        """Run a helper container; (its answers by cache slot, its other lines, its exit code)."""
        answers: dict[int, list[str]] = {}
        tail: list[str] = []

        def on_lines(lines: list[str]) -> None:
            for line in lines:
                words = line.split()
                if len(words) >= 3 and words[0] == token and words[1].isdigit():
                    answers[int(words[1])] = words[2:]
                else:
                    tail.append(line)
                    del tail[:-TAIL]

        code = await self.supervise(argv, name, on_lines, self.timeout)
        return answers, tail, code


def stale_after(timeout: float) -> int:
    """Seconds after which an old generation (or an interrupted save) may go: no restore or
    save that could be using it is still running then (they stop at ``timeout``)."""
    return int(2 * timeout + 60)


def _kib(what: list[str]) -> int:
    return int(what[1]) if len(what) > 1 and what[1].isdigit() else 0


def _last(tail: list[str]) -> str:
    return f": {tail[-1][:200]}" if tail else ""
