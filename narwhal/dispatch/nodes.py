"""This dispatcher as a node of the store: its id, its heartbeat, and whether it holds the database.

Groundwork for several dispatchers on one PostgreSQL database (active/active). Each
``narwhal serve`` registers itself in the store's ``nodes`` table under a fresh id at start
and beats every ``interval`` seconds; the beat also renews the leases of the job attempts it
claimed (``Store.claim_jobs``) and still works on (``held``: the scheduler says which), so an
attempt whose node stopped beating, or stopped working on it, can be taken over
(``Store.expired_attempts``, ``Store.take_over``) and its old node's late writes are fenced
off by attempt number (``LeaseLost``). ``GET /health`` says which node this is and whether it
holds the database: its last beat went through within ``HELD_FOR`` intervals.

On a single node (SQLite, or one dispatcher on PostgreSQL) the beat is one small write every
few seconds and changes nothing else. With ``settings.cluster`` the scheduler claims its jobs
and runner slots under this node's id, and the beat keeps those leases alive.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from narwhal.dispatch.backend import own_work
from narwhal.dispatch.store import Store, StoreInUse
from narwhal.errors import NarwhalError

log = logging.getLogger(__name__)

INTERVAL = 5.0  # seconds between beats
HELD_FOR = 3  # beats: a node whose last good beat is older than this many intervals does not hold the database
LEASE = INTERVAL * HELD_FOR  # seconds an attempt's lease lasts past a beat
SKEW_WARN = 2.0  # seconds between this host's clock and the database's worth a warning (leases use the database's)


class Node:
    """This dispatcher's row in ``nodes``, kept alive by a thread."""

    def __init__(self, store: Store, *, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic,
                 node_id: str | None = None, cluster: bool = False, config: str | None = None):
        self.store = store
        self.cluster = cluster  # one of several dispatchers on the database (settings.cluster)
        self.config = config  # Config.fingerprint: the pipelines and runners it runs jobs with
        self.config_differs: list[str] = []  # alive nodes whose fingerprint is another (host pid), at the last beat
        self.id = node_id or uuid.uuid4().hex
        self.interval = interval
        self.clock = clock
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._last_beat: float | None = None  # clock() of the last beat that reached the database
        self._holding = False  # the store's hold answered at the last beat
        self.clock_skew: float | None = None  # this host's clock minus the database's, at the last beat
        self.wall_clock: Callable[[], float] = time.time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        # (job, attempt) whose leases each beat renews: the scheduler's (start); none before
        self._held: Callable[[], Iterable[tuple[int, int]]] = tuple

    @property
    def lease(self) -> float:
        return self.interval * HELD_FOR

    def hold(self) -> None:
        """Become the one dispatcher on the store (``StoreInUse`` if another is): on PostgreSQL a
        session lock that the database frees when this process's connection ends, however it
        ends; on SQLite the state directory's flock does this already."""
        self.store.backend.hold(f"{self.id[-8:]} {self.host} pid {self.pid}", shared=self.cluster)

    def register(self) -> None:
        self.store.register_node(self.id, self.host, self.pid, self.config)
        self._last_beat = self.clock()
        self._holding = True
        self._check_clock()
        self._check_config()

    def set_config(self, config: str | None) -> None:
        """A reload: the fingerprint the others compare with theirs."""
        self.config = config
        self.store.set_node_config(self.id, config)
        self._check_config()

    def _check_config(self) -> None:
        """In a cluster, the nodes must run one config (docs/deploy.md): a node without a pipeline
        fails the jobs of it that it claims, and one with another capacity for a runner leases
        more of it than the others think. Say so, once each time the set of differing nodes changes,
        and in ``/health`` (``node.config_differs``)."""
        if not self.cluster or self.config is None:
            return
        try:
            others = self.store.nodes(stale_after=self.lease)
        except Exception:  # noqa: BLE001 - the beat went through; the next one looks again
            return
        differing = sorted(f"{n['host']} pid {n['pid']} (node {str(n['id'])[-8:]})" for n in others
                           if n["alive"] and n["id"] != self.id and n.get("config") not in (None, self.config))
        if differing and differing != self.config_differs:
            log.warning("node %s: other nodes run another config (pipelines or runners): %s; every node of a "
                        "cluster needs the same inventory.yaml and pipelines/ (jobs of a pipeline a node lacks "
                        "fail there; a runner's capacity is not one)", self.id[-8:], ", ".join(differing))
        self.config_differs = differing

    def beat(self) -> bool:
        """One heartbeat (and lease renewal); False if the database could not be reached or
        this node was declared gone (another node took its work over)."""
        self._holding = self.store.backend.holding()
        if not self._holding:  # its connection ended (the database restarted, a cut): take it again
            try:
                self.hold()
                self._holding = True
                log.warning("node %s: the store's hold was lost and is taken again", self.id[-8:])
            except StoreInUse as exc:
                log.error("node %s: the store's hold was lost, and %s", self.id[-8:], exc)
            except NarwhalError as exc:
                log.warning("node %s: the store's hold is lost: %s", self.id[-8:], exc)
        try:
            alive = self.store.heartbeat(self.id, self.lease, self._held())
        except Exception:  # noqa: BLE001 - an unreachable database is what this reports
            log.warning("node %s: heartbeat failed", self.id[-8:], exc_info=True)
            return False
        if alive:
            self._last_beat = self.clock()
            self._check_clock()
            self._check_config()
        return alive

    def _check_clock(self) -> None:
        """Leases and heartbeats use the database's clock, so a host whose clock is off costs no
        job; but the times it records (a job's start and end, a commit status's next try) are its
        own: say so when it is off by more than ``SKEW_WARN``, once each time it goes off."""
        try:
            skew = self.wall_clock() - self.store.database_time()
        except Exception:  # noqa: BLE001 - the beat went through; the next one looks again
            return
        was = self.clock_skew
        self.clock_skew = skew
        if abs(skew) > SKEW_WARN and (was is None or abs(was) <= SKEW_WARN):
            log.warning("node %s: this host's clock is %+.1fs off the database's: keep the clocks of a "
                        "cluster's hosts in sync (NTP); job times recorded here are off by as much",
                        self.id[-8:], skew)

    def holds_database(self) -> bool:
        last = self._last_beat
        return self._holding and last is not None and self.clock() - last <= self.interval * HELD_FOR

    def health(self) -> dict:
        """What ``GET /health`` says about this node."""
        return {"id": self.id, "host": self.host, "pid": self.pid, "store": self.store.kind,
                "cluster": self.cluster, "holds_database": self.holds_database(),
                "clock_skew": None if self.clock_skew is None else round(self.clock_skew, 3),
                "config": self.config, "config_differs": self.config_differs}

    def start(self, changed: Callable[[bool], None] | None = None,
              held: Callable[[], Iterable[tuple[int, int]]] | None = None) -> None:
        """Register and beat, renewing the leases of the attempts ``held()`` names (any thread may
        call it); in a cluster, also call ``changed`` whenever another node wrote a log line or an
        event (PostgreSQL's LISTEN/NOTIFY), so this node's followers look at once (with False
        when it was log lines alone)."""
        if held is not None:
            self._held = held
        self.register()
        self._thread = threading.Thread(target=self._run, name="narwhal-node", daemon=True)
        self._thread.start()
        if self.cluster and changed is not None:
            self.store.backend.announcing = True
            self._listener = threading.Thread(target=self.store.backend.listen, args=(changed, self._stop),
                                              name="narwhal-listen", daemon=True)
            self._listener.start()

    def _run(self) -> None:
        own_work()  # the beat's connections are not the API's to take
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=10)
            self._listener = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            try:
                self.store.node_stopped(self.id)
            except Exception:  # noqa: BLE001 - stopping: the row ages out by itself
                log.debug("node %s: could not record the stop", self.id[-8:], exc_info=True)
        # the hold goes with the store (Store.close): after the scheduler's last writes
