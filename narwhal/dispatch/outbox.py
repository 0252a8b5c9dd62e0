"""The outbox: commit statuses on their way to the forges.

Every state change of a job that a forge hears about leaves a row in the store's outbox, in
the transaction of the change (``store._status_changed``). ``Outbox`` sends those rows with
``narwhal.forge.status`` and records what became of each:

* Rows of one key (forge, repository, commit, context) go out one at a time, oldest first:
  only a key's oldest undelivered row may be sent, so an older state never lands after a newer
  one and the final state arrives last. Different keys are independent and go out at once, on
  a small pool of ``WORKERS`` threads.
* A refusal that may pass (no connection, a timeout, 5xx, 429) is tried again after
  ``status_retry`` seconds, doubled each time up to ``status_retry_max`` (less up to a quarter,
  at random, so that rows failed together do not come back together).
* Any other refusal (401, 404, 422, GitLab's 400 for a transition it does not allow) gives the
  row up with the forge's answer; the next row of its key goes next.
* A row older than ``status_deadline`` is given up, and so is one whose next try would fall
  after it; so is one whose forge, token or token secret is no longer in the config.
* Several dispatchers on one store (``settings.cluster``) share the outbox: a row is taken for
  a send by one conditional update (``Store.outbox_claim``), so one of them sends it.
* A row is marked delivered after the forge said yes. A dispatcher that dies in between
  (``kill -9``) sends it again when it starts (in a cluster, another sends it ``CLAIM_LEASE``
  later): at least once. Forges keep one status per
  commit and context, the latest sent, so a repeat changes nothing.

The worker wakes when told (``wake()``: a job changed, a send ended) and otherwise looks at
the store every ``POLL`` seconds; ``run_once()`` does the same work in the calling thread
until nothing is due (burst mode, for tests with a fake clock).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable

from narwhal.config.loader import Config
from narwhal.config.settings import Settings
from narwhal.dispatch.store import OutboxRow, Store
from narwhal.forge import status
from narwhal.forge.status import DeliveryResult, StatusError, StatusRequest

log = logging.getLogger(__name__)

WORKERS = 4  # statuses in flight at once (each to its own key)
POLL = 0.5  # seconds between looks at the store when nothing woke the worker
MIN_GAP = 0.1  # a burst of wake-ups (every log flush notifies) costs at most one look per this
SEND_TIMEOUT = 10.0  # seconds to connect, and between bytes of the answer
MIN_RETRY = 0.05  # seconds: the shortest wait before a retry, whatever the settings say
HEADS = 200  # key heads read per look
STOP_WAIT = 5.0  # seconds stop() waits for sends in flight (an unfinished one is sent again later)
CLAIM_LEASE = 3 * SEND_TIMEOUT  # a row taken for a send is not due again for this long (its sender died)

Key = tuple[str, str, str, str]
Sender = Callable[[StatusRequest, float], DeliveryResult]


def target_url(public_url: str | None, job_id: int) -> str | None:
    """Where a status links to: the job at the dispatcher's public URL (none without one)."""
    return None if public_url is None else f"{public_url}/jobs/{job_id}"


def backoff(attempts: int, settings: Settings, jitter: float = 0.0) -> float:
    """Seconds before try ``attempts + 1``: ``status_retry`` doubled per try made, at most
    ``status_retry_max``, less ``jitter`` (0 to 1) times a quarter of it."""
    delay = min(settings.status_retry * 2.0 ** max(attempts - 1, 0), settings.status_retry_max)
    return max(delay * (1.0 - 0.25 * jitter), MIN_RETRY)


class Outbox:
    """Delivers the store's outbox to the forges; ``start()`` and ``stop()`` with the dispatcher."""

    def __init__(self, store: Store, config: Callable[[], Config], *, send: Sender = status.send,
                 clock: Callable[[], float] = time.time, jitter: Callable[[], float] = random.random,
                 workers: int = WORKERS, shared: bool = False):
        self.store = store
        self.shared = shared  # settings.cluster: other dispatchers send from the same outbox
        self.config = config  # the current config: a reload changes forges, secrets and settings
        self.send = send
        self.clock = clock
        self.jitter = jitter
        self.workers = workers
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._busy: set[Key] = set()  # keys with a row on its way: their next row waits
        self._finished = 0  # bumped each time a key leaves _busy
        self._released: dict[Key, int] = {}  # key -> _finished when it left _busy, while that may matter
        self._queue: queue.Queue[OutboxRow | None] = queue.Queue()
        self._threads: list[threading.Thread] = []

    # --- life --------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._threads = [threading.Thread(target=self._loop, name="narwhal-outbox", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"narwhal-outbox-{i}", daemon=True)
                          for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = STOP_WAIT) -> None:
        """Stop looking and sending; wait up to ``timeout`` for sends in flight. A row whose
        answer did not come is still pending in the store: the next start sends it."""
        self._stopping.set()
        self._wake.set()
        for _ in range(self.workers):
            self._queue.put(None)
        give_up = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, give_up - time.monotonic()))
        self._threads = []

    def wake(self) -> None:
        """Something changed (a job's state, a send ended): look at the store soon."""
        self._wake.set()

    # --- the work ------------------------------------------------------------------------

    def run_once(self) -> int:
        """Burst mode: send every row due now, key by key in order, in this thread, until
        none is due; returns how many sends were tried or rows given up."""
        done = 0
        while True:
            now = self.clock()
            due = [row for row in self.store.outbox_heads(HEADS) if row.next_at <= now]
            if not due:
                return done
            for row in due:
                self.deliver(row)
                done += 1

    def deliver(self, row: OutboxRow) -> str:
        """One try of ``row``: ``delivered``, ``retry`` (scheduled again), ``failed`` (given up) or
        ``taken`` (another dispatcher of the cluster sends it, or it was settled meanwhile)."""
        now = self.clock()
        if self.shared and not self.store.outbox_claim(row.id, now, now + CLAIM_LEASE):
            return "taken"
        config = self.config()
        settings = config.settings
        deadline = row.created_at + settings.status_deadline
        if self.clock() > deadline:
            return self._fail(row, f"not delivered within status_deadline ({settings.status_deadline:g}s)",
                              attempted=False)
        forge = config.forge(row.forge)
        if forge is None:
            return self._fail(row, f"forge {row.forge!r} is no longer in inventory.yaml", attempted=False)
        if forge.token is None:
            return self._fail(row, f"forge {row.forge!r} has no token in inventory.yaml: it takes no "
                                   "commit statuses", attempted=False)
        secret = config.secrets.get(forge.token)
        if secret is None:
            return self._fail(row, f"forge {row.forge!r}: its token names secret {forge.token!r}, "
                                   "which is not declared", attempted=False)
        try:
            request = status.status_request(forge, row.repo, row.commit, row.state, row.context, row.description,
                                            target_url(settings.public_url, row.job_id), secret.value)
        except StatusError as exc:
            return self._fail(row, f"cannot make the status: {exc}", attempted=False)
        result = self.send(request, SEND_TIMEOUT)
        if result.ok:
            self.store.outbox_delivered(row.id)
            if row.attempts:
                log.info("forge %s: status %s of job %s delivered after %d failed tries",
                         row.forge, row.state, row.job_id, row.attempts)
            return "delivered"
        error = result.error or f"HTTP {result.status_code}"
        if not result.retryable:
            return self._fail(row, error, attempted=True)
        now = self.clock()
        next_at = now + backoff(row.attempts + 1, settings, self.jitter())
        if next_at > deadline:
            return self._fail(row, f"{error}; given up: status_deadline ({settings.status_deadline:g}s) "
                                   "passes before the next try", attempted=True)
        self.store.outbox_retry(row.id, error, next_at)
        if not row.attempts:  # the first failure of a row is told; the retries of it are not
            log.info("forge %s: status %s of job %s not delivered (%s); trying again in %.1fs",
                     row.forge, row.state, row.job_id, error, next_at - now)
        return "retry"

    def _fail(self, row: OutboxRow, error: str, attempted: bool) -> str:
        self.store.outbox_failed(row.id, error, attempted)
        log.warning("forge %s: status %s of job %s (%s) given up: %s",
                    row.forge, row.state, row.job_id, row.context, error)
        return "failed"

    def _postpone(self, row: OutboxRow, error: str) -> None:
        """After a bug or a bad moment of the disk: try the row again later, not at once."""
        try:
            settings = self.config().settings
            self.store.outbox_retry(row.id, error, self.clock() + backoff(row.attempts + 1, settings))
        except Exception:  # noqa: BLE001 - still pending; the next look finds it
            log.exception("postponing status %s of job %s failed", row.state, row.job_id)

    # --- threads -------------------------------------------------------------------------

    def _loop(self) -> None:
        """Hand every due key head to the workers, one row per key at a time."""
        last = 0.0
        while not self._stopping.is_set():
            self._stopping.wait(max(0.0, last + MIN_GAP - time.monotonic()))
            if self._stopping.is_set():
                return
            self._wake.clear()
            last = time.monotonic()
            wait = POLL
            try:
                wait = min(wait, self._hand_out())
            except Exception:  # noqa: BLE001 - the worker must survive a bad moment of the disk
                log.exception("reading the outbox failed")
            self._wake.wait(max(wait, 0.0))

    def _hand_out(self) -> float:
        """Queue the due heads; returns the seconds until the next one not yet due."""
        with self._lock:
            start = self._finished
            # A key released before this look began is read fresh below; later ones may not be.
            self._released = {k: n for k, n in self._released.items() if n > start}
        heads = self.store.outbox_heads(HEADS)
        now = self.clock()
        wait = POLL
        for row in heads:
            if row.next_at > now:
                wait = min(wait, row.next_at - now)
                continue
            with self._lock:
                if row.key in self._busy or row.key in self._released:
                    # On its way, or sent since the read: this head may be stale. The send's
                    # end wakes the loop, which reads the key's next head then.
                    continue
                self._busy.add(row.key)
            self._queue.put(row)
        return wait

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                row = self._queue.get(timeout=POLL)
            except queue.Empty:
                continue
            if row is None or self._stopping.is_set():
                return
            try:
                self.deliver(row)
            except Exception as exc:  # noqa: BLE001 - the row stays pending and is tried again
                if self._stopping.is_set():  # the store closed under a slow send: the next start sends it
                    log.info("status %s of job %s left for the next start", row.state, row.job_id)
                    return
                log.exception("delivering status %s of job %s to forge %s failed", row.state, row.job_id, row.forge)
                self._postpone(row, f"internal error ({type(exc).__name__})")
            finally:
                with self._lock:
                    self._busy.discard(row.key)
                    self._finished += 1
                    self._released[row.key] = self._finished
                self.wake()
