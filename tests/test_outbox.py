"""outbox: commit statuses delivered in order per key, retried with backoff, given up at the
deadline; against a real SQLite store with a hand-driven clock, then threaded against the
real stand-in forge (HTTP on loopback)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from narwhal.config.loader import Config, load_config
from narwhal.dispatch.outbox import Outbox, backoff, target_url
from narwhal.dispatch.store import Store
from narwhal.forge.status import DeliveryResult, StatusRequest
from narwhal.job import JobStatus, Origin
from testbed import StandInForge

TOKEN = "ghp_0utb0xT3stT0ken"
REPO = "https://forge.example/owner/app.git"
SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
SHA2 = "1" * 40
PIPELINE = "repo: \"*\"\nimage: busybox\nsteps:\n  - name: build\n    run: make\n"


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Forge:
    """A fake ``send``: records each request and answers from a script (default: 201)."""

    def __init__(self) -> None:
        self.sent: list[StatusRequest] = []
        self.answers: list[DeliveryResult] = []
        self.lock = threading.Lock()

    def __call__(self, request: StatusRequest, timeout: float) -> DeliveryResult:
        with self.lock:
            self.sent.append(request)
            return self.answers.pop(0) if self.answers else DeliveryResult(True, 201, False)

    def fail(self, count: int, code: int | None = None, retryable: bool = True, error: str = "could not connect") -> None:
        self.answers += [DeliveryResult(False, code, retryable, error)] * count

    def states(self) -> list[tuple[str, str]]:
        return [(r.json["context"], r.json["state"]) for r in self.sent]


def write_config(root: Path, forge_url: str = "https://api.github.com", kind: str = "github",
                 retry: str = "2s", retry_max: str = "30s", token: str | None = "FORGE_TOKEN") -> Path:
    (root / "pipelines").mkdir(parents=True, exist_ok=True)
    (root / "pipelines" / "build.yaml").write_text(PIPELINE)
    (root / "pipelines" / "test.yaml").write_text(PIPELINE)
    token_line = f", token: {token}" if token else ""
    (root / "inventory.yaml").write_text(
        "runners: [{name: local, transport: local}]\n"
        "secrets:\n  FORGE_TOKEN: {env: OUTBOX_TEST_TOKEN}\n  HOOK_SECRET: {env: OUTBOX_TEST_HOOK}\n"
        f"forges:\n  - {{name: gh, kind: {kind}, url: '{forge_url}'{token_line}, webhook_secret: HOOK_SECRET}}\n"
        f"settings:\n  status_retry: {retry}\n  status_retry_max: {retry_max}\n  status_deadline: 10m\n"
        "  public_url: https://ci.example.com/\n")
    return root


@pytest.fixture
def config(tmp_path, monkeypatch) -> Config:
    monkeypatch.setenv("OUTBOX_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("OUTBOX_TEST_HOOK", "hook-secret-value")
    return load_config(write_config(tmp_path / "config"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(store_spec, clock) -> Iterator[Store]:
    """The outbox's rows on both backends."""
    s = store_spec.open(clock)
    yield s
    s.close()


@pytest.fixture
def forge() -> Forge:
    return Forge()


@pytest.fixture
def outbox(store, config, clock, forge) -> Outbox:
    return Outbox(store, lambda: config, send=forge, clock=clock, jitter=lambda: 0.0)


def run_job(store: Store, pipelines: tuple[str, ...] = ("build",), commit: str = SHA,
            final: JobStatus = JobStatus.PASSED, repo: str = REPO) -> list[int]:
    """Jobs queued, started and finished: three outbox rows each."""
    jobs = [job for job, _ in store.create_jobs(repo, commit, "main", list(pipelines), Origin(forge="gh"))]
    for job in jobs:
        assert store.start_job(job.id, "local", 1)
        assert store.finish_job(job.id, 1, final, None if final is JobStatus.PASSED else "exit 1 in step build")
    return [job.id for job in jobs]


def rows(store: Store) -> list[tuple]:
    with store._tx(write=False) as db:
        return [tuple(r) for r in db.execute(
            "SELECT id, state, attempts, delivered_at IS NOT NULL, failed_at IS NOT NULL, last_error, next_at "
            "FROM outbox ORDER BY id")]


# --- the store's part -------------------------------------------------------------------


def test_each_state_change_of_a_forge_job_joins_the_outbox(store):
    [job_id] = run_job(store)
    assert [(r[1], r[2]) for r in rows(store)] == [("queued", 0), ("running", 0), ("passed", 0)]
    [(plain, _)] = store.create_jobs("/src/app", SHA, None, ["build"])  # no forge: no row
    assert store.start_job(plain.id, "local", 1)
    assert len(rows(store)) == 3
    (head,) = store.outbox_heads()
    assert (head.job_id, head.forge, head.repo, head.commit, head.context, head.state) == (
        job_id, "gh", REPO, SHA, "narwhal/build", "queued")


def test_heads_are_the_oldest_pending_row_of_each_key_soonest_due_first(store, clock):
    run_job(store, ("build", "test"))
    run_job(store, ("build",), commit=SHA2)
    heads = store.outbox_heads()
    assert [(h.commit, h.context, h.state) for h in heads] == [
        (SHA, "narwhal/build", "queued"), (SHA, "narwhal/test", "queued"), (SHA2, "narwhal/build", "queued")]
    first = heads[0]
    assert store.outbox_retry(first.id, "could not connect", clock.now + 50)
    assert [h.id for h in store.outbox_heads()] == [heads[1].id, heads[2].id, first.id]  # due later: last
    assert store.outbox_delivered(heads[1].id)
    assert not store.outbox_delivered(heads[1].id)  # once only
    assert not store.outbox_retry(heads[1].id, "late", 0)
    assert not store.outbox_failed(heads[1].id, "late")
    assert [h.state for h in store.outbox_heads() if h.context == "narwhal/test"] == ["running"]
    assert store.outbox_heads(limit=1) == [store.outbox_heads()[0]]


def test_the_summary_counts_per_forge_with_the_last_error_and_delivery(store, clock):
    run_job(store, ("build", "test"))
    a, b = store.outbox_heads()
    clock.advance(1)
    store.outbox_retry(a.id, "HTTP 503: Service Unavailable", clock.now + 5)
    clock.advance(1)
    store.outbox_delivered(b.id)
    clock.advance(1)
    store.outbox_failed(a.id, "HTTP 422: Validation Failed")
    assert store.outbox_summary() == {"gh": {
        "pending": 4, "delivered": 1, "failed": 1, "last_delivered_at": clock.now - 1,
        "last_error": "HTTP 422: Validation Failed", "last_error_at": clock.now}}
    assert rows(store)[0][2] == 2  # two tries: the retry and the refusal


# --- order, backoff, deadline (burst mode, a hand-driven clock) ----------------------------


def test_every_state_arrives_in_order_with_the_target_url(outbox, store, forge):
    [job_id] = run_job(store)
    assert outbox.run_once() == 3
    assert forge.states() == [("narwhal/build", "pending"), ("narwhal/build", "pending"),
                              ("narwhal/build", "success")]
    first = forge.sent[0]
    assert first.url == f"https://api.github.com/repos/owner/app/statuses/{SHA}"
    assert first.headers["Authorization"] == f"Bearer {TOKEN}"
    assert first.json["target_url"] == f"https://ci.example.com/jobs/{job_id}"
    assert [r.json["description"] for r in forge.sent] == ["queued", "running on local", "passed in 0s"]
    assert [r[3] for r in rows(store)] == [True] * 3 and store.outbox_heads() == []
    assert outbox.run_once() == 0


def test_a_retrying_row_holds_back_the_newer_rows_of_its_key(outbox, store, forge, clock):
    run_job(store)
    forge.fail(3)
    assert outbox.run_once() == 1  # the queued row failed; running and passed wait behind it
    assert len(forge.sent) == 1 and rows(store)[0][2:6] == (1, False, False, "could not connect")
    for _ in range(2):
        clock.advance(60)
        assert outbox.run_once() == 1
    assert [r[2] for r in rows(store)] == [3, 0, 0]
    clock.advance(60)
    assert outbox.run_once() == 3
    assert [s for _, s in forge.states()] == ["pending"] * 5 + ["success"]  # 4 tries of the first, then the rest
    assert [r[2] for r in rows(store)] == [4, 1, 1]


def test_keys_proceed_independently(outbox, store, forge, clock):
    run_job(store, ("build", "test"))
    forge.fail(1)  # the first send (build's queued row) fails; test's rows go on
    assert outbox.run_once() == 4
    assert forge.states() == [("narwhal/build", "pending"), ("narwhal/test", "pending"),
                              ("narwhal/test", "pending"), ("narwhal/test", "success")]
    clock.advance(2)
    assert outbox.run_once() == 3
    assert forge.states()[4:] == [("narwhal/build", "pending"), ("narwhal/build", "pending"),
                                  ("narwhal/build", "success")]


def test_backoff_doubles_up_to_the_cap(outbox, store, forge, clock, config):
    run_job(store)
    forge.fail(8)
    waits = []
    for _ in range(8):
        assert outbox.run_once() == 1
        next_at = rows(store)[0][6]
        waits.append(next_at - clock.now)
        clock.now = next_at
    assert waits == [2, 4, 8, 16, 30, 30, 30, 30]
    settings = config.settings
    assert backoff(1, settings) == 2 and backoff(3, settings) == 8 and backoff(99, settings) == 30
    assert backoff(1, settings, jitter=1.0) == 1.5 and backoff(10, settings, jitter=0.5) == 26.25
    assert backoff(1, replace(settings, status_retry=0.001)) == 0.05  # never a busy loop


@pytest.mark.parametrize("code, error", [
    (400, "HTTP 400: Cannot transition status via :enqueue from :running"),  # GitLab, a state backwards
    (401, "HTTP 401: Bad credentials"), (404, "HTTP 404: Not Found"), (422, "HTTP 422: Validation Failed"),
])
def test_a_refusal_fails_the_row_and_the_next_one_goes(outbox, store, forge, code, error):
    run_job(store, final=JobStatus.FAILED)
    forge.fail(1, code=code, retryable=False, error=error)
    assert outbox.run_once() == 3
    assert [r[2:6] for r in rows(store)] == [(1, False, True, error),
                                             (1, True, False, None), (1, True, False, None)]
    assert [s for _, s in forge.states()] == ["pending", "pending", "failure"]
    assert store.outbox_summary()["gh"]["failed"] == 1
    assert store.outbox_summary()["gh"]["last_error"] == error


def test_a_row_past_the_deadline_is_given_up(outbox, store, forge, clock):
    run_job(store)
    clock.advance(601)  # status_deadline: 10m; the dispatcher was down, say
    assert outbox.run_once() == 3
    assert forge.sent == []
    assert [r[4] for r in rows(store)] == [True] * 3
    assert rows(store)[0][5] == "not delivered within status_deadline (600s)"
    assert rows(store)[0][2] == 0  # nothing was tried


def test_a_row_whose_next_try_would_pass_the_deadline_is_given_up(outbox, store, forge, clock):
    run_job(store)
    forge.fail(99)
    tries = 0
    while store.outbox_heads():
        clock.now = max(clock.now, min(h.next_at for h in store.outbox_heads()))
        tries += outbox.run_once()
    failed = rows(store)
    assert all(r[4] for r in failed)
    assert failed[0][5] == ("could not connect; given up: status_deadline (600s) passes before the next try")
    # tries at 0, 2, 6, 14 and 30, 60, ... 600 s: every one that fits before the deadline
    assert failed[0][2] == 4 + 20
    assert clock.now - 1_000_000.0 <= 600


def test_a_forge_gone_from_the_config_fails_its_rows_with_the_reason(store, forge, clock, tmp_path, monkeypatch, config):
    run_job(store)
    gone = replace(config, forges=[])
    assert Outbox(store, lambda: gone, send=forge, clock=clock).run_once() == 3
    assert forge.sent == []
    assert {r[5] for r in rows(store)} == {"forge 'gh' is no longer in inventory.yaml"}

    run_job(store, commit=SHA2)
    tokenless = load_config(write_config(tmp_path / "tokenless", token=None))
    assert Outbox(store, lambda: tokenless, send=forge, clock=clock).run_once() == 3
    assert rows(store)[-1][5] == "forge 'gh' has no token in inventory.yaml: it takes no commit statuses"
    assert forge.sent == []


def test_a_secret_gone_from_the_config_fails_the_row(store, forge, clock, config):
    run_job(store)
    secretless = replace(config, secrets={})
    Outbox(store, lambda: secretless, send=forge, clock=clock).run_once()
    assert rows(store)[0][5] == "forge 'gh': its token names secret 'FORGE_TOKEN', which is not declared"


def test_a_repository_the_forge_cannot_name_fails_the_row(outbox, store, forge):
    run_job(store, repo="https://forge.example/group/sub/app.git")  # GitHub has owner/repo only
    assert outbox.run_once() == 3
    assert rows(store)[0][5] == "cannot make the status: a github repository path is owner/repo"
    assert forge.sent == []


def test_no_public_url_no_target_url(store, forge, clock, config):
    run_job(store)
    plain = replace(config, settings=replace(config.settings, public_url=None))
    Outbox(store, lambda: plain, send=forge, clock=clock).run_once()
    assert all("target_url" not in r.json for r in forge.sent) and len(forge.sent) == 3
    assert target_url(None, 4) is None and target_url("https://ci.example.com/nw", 4) == "https://ci.example.com/nw/jobs/4"


def test_the_token_never_reaches_the_store(outbox, store, forge):
    run_job(store)
    forge.fail(1, code=401, retryable=False, error="HTTP 401: Bad credentials")
    outbox.run_once()
    assert TOKEN not in dump(store)


def test_undelivered_rows_go_out_after_a_restart(store_spec, config, forge, clock, monkeypatch):
    first = store_spec.open(clock)
    run_job(first)
    # The forge takes the first status, and the process dies before it records so (kill -9).
    monkeypatch.setattr(first, "outbox_delivered", lambda id: False)
    head = first.outbox_heads()[0]
    assert Outbox(first, lambda: config, send=forge, clock=clock).deliver(head) == "delivered"
    first.close()
    again = store_spec.open(clock)
    try:
        assert Outbox(again, lambda: config, send=forge, clock=clock).run_once() == 3
        assert again.outbox_heads() == []
    finally:
        again.close()
    # At least once: the unrecorded status goes again, and the final one is still the last.
    assert [r.json["description"] for r in forge.sent] == ["queued", "queued", "running on local", "passed in 0s"]


# --- the threads -------------------------------------------------------------------------


def wait_until(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what} not reached after {timeout}s")


def test_keys_go_out_concurrently_but_one_key_never_twice_at_once(store_spec, config):
    in_flight: dict[str, int] = {}
    most = {"all": 0, "key": 0}
    lock = threading.Lock()
    sent: list[tuple[str, str]] = []

    def slow(request: StatusRequest, timeout: float) -> DeliveryResult:
        key = request.url + " " + request.json["context"]
        with lock:
            in_flight[key] = in_flight.get(key, 0) + 1
            most["all"] = max(most["all"], sum(in_flight.values()))
            most["key"] = max(most["key"], in_flight[key])
        time.sleep(0.05)
        with lock:
            in_flight[key] -= 1
            sent.append((key, request.json["description"]))
        return DeliveryResult(True, 201, False)

    store = store_spec.open()
    outbox = Outbox(store, lambda: config, send=slow, workers=3)
    for commit in (SHA, SHA2):  # every status waits before the outbox starts: its concurrency, not the writers' pace
        run_job(store, ("build", "test"), commit=commit)
    outbox.start()
    try:
        wait_until(lambda: len(sent) == 12, what="12 statuses")
        assert store.outbox_summary()["gh"]["delivered"] == 12
    finally:
        outbox.stop()
        store.close()
    assert most["key"] == 1 and most["all"] >= 2
    per_key: dict[str, list[str]] = {}
    for key, description in sent:
        per_key.setdefault(key, []).append(description.split(" ")[0])
    assert len(per_key) == 4
    assert all(states == ["queued", "running", "passed"] for states in per_key.values()), per_key


@pytest.fixture
def stand_in() -> Iterator[StandInForge]:
    with StandInForge(TOKEN, kinds="gitlab") as server:
        yield server


def test_delivery_to_the_stand_in_forge_through_an_outage(tmp_path, monkeypatch, stand_in):
    monkeypatch.setenv("OUTBOX_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("OUTBOX_TEST_HOOK", "hook-secret-value")
    config = load_config(write_config(tmp_path / "config", forge_url=stand_in.url, kind="gitlab",
                                      retry="100ms", retry_max="200ms"))
    store = Store(str(tmp_path / "narwhal.db"))
    outbox = Outbox(store, lambda: config)
    outbox.start()
    try:
        repo = "https://forge.example/group/app.git"
        [(job, _)] = store.create_jobs(repo, SHA, "main", ["build"], Origin(forge="gh"))
        outbox.wake()
        stand_in.wait_for(1)
        stand_in.down()
        store.start_job(job.id, "local", 1)
        outbox.wake()
        wait_until(lambda: store.outbox_summary()["gh"]["last_error"] == "could not connect", what="a retry")
        store.finish_job(job.id, 1, JobStatus.FAILED, "exit 2 in step build")
        time.sleep(0.5)
        assert len(stand_in.statuses) == 1
        stand_in.up()
        recorded = stand_in.wait_for(3)
    finally:
        outbox.stop()
        store.close()
    assert [(s.state, s.context, s.description) for s in recorded] == [
        ("pending", "narwhal/build", "queued"), ("running", "narwhal/build", "running on local"),
        ("failed", "narwhal/build", "failed in 0s: exit 2 in step build")]
    assert {s.path for s in recorded} == {f"/api/v4/projects/group%2Fapp/statuses/{SHA}"}
    assert {s.target_url for s in recorded} == {f"https://ci.example.com/jobs/{job.id}"}
    summary = Store(str(tmp_path / "narwhal.db")).outbox_summary()["gh"]
    assert (summary["pending"], summary["delivered"], summary["failed"]) == (0, 3, 0)
    assert summary["last_delivered_at"] >= summary["last_error_at"]


def test_a_wrong_token_is_a_failed_row_with_the_forge_answer(tmp_path, monkeypatch, stand_in):
    monkeypatch.setenv("OUTBOX_TEST_TOKEN", "not-the-token")
    monkeypatch.setenv("OUTBOX_TEST_HOOK", "hook-secret-value")
    config = load_config(write_config(tmp_path / "config", forge_url=stand_in.url, kind="gitlab"))
    store = Store(str(tmp_path / "narwhal.db"))
    try:
        store.create_jobs("https://forge.example/group/app.git", SHA, "main", ["build"], Origin(forge="gh"))
        assert Outbox(store, lambda: config).run_once() == 1
        summary = store.outbox_summary()["gh"]
    finally:
        store.close()
    assert summary["failed"] == 1 and summary["last_error"] == "HTTP 401: 401 Unauthorized"
    assert stand_in.statuses == []


def test_stop_without_start_and_twice_is_harmless(store, config):
    outbox = Outbox(store, lambda: config)
    outbox.stop()
    outbox.stop()


def test_the_dispatcher_wakes_its_outbox_on_every_scheduler_change(tmp_path, config):
    from narwhal.dispatch.dispatcher import Dispatcher

    d = Dispatcher(config, tmp_path / "state")
    try:
        d.outbox._wake.clear()
        d.scheduler.notify()  # a job started, finished, was re-queued or cancelled
        assert d.outbox._wake.is_set()
    finally:
        d.stop()


def dump(store: Store) -> str:
    """Every value of every table, as text (what a backup of the store would hold)."""
    if store.kind == "sqlite":
        return "\n".join(store._conn().iterdump())
    with store._tx(write=False) as db:
        tables = [t for (t,) in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(str(row) for table in tables for row in db.execute(f'SELECT * FROM "{table}"'))
