"""Browser sessions in the store, on both backends: what one dispatcher signs in, signs out or
renders a form for holds at every other dispatcher on the same database, and after a restart.

Two ``Store`` objects on one database stand for two nodes of a cluster (each its own
connections, as two processes have); tests/e2e/test_cluster_shared.py does the same with
real ``narwhal serve`` processes behind their HTTP ports."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from narwhal.api import session
from narwhal.api.session import LIFETIME, LOGIN_LIFETIME, Sessions
from narwhal.dispatch import store as store_module
from narwhal.dispatch.store import Store
from tests.conftest import Clock, StoreSpec


@pytest.fixture
def clock() -> Clock:
    return Clock(1_700_000_000.0)


@pytest.fixture
def nodes(store_spec: StoreSpec) -> Iterator[tuple[Store, Store]]:
    """Two stores on one database: two dispatchers' views of it."""
    a, b = store_spec.open(), store_spec.open()
    yield a, b
    a.close()
    b.close()


def rows(store: Store) -> list[tuple]:
    with store._tx(write=False) as db:
        return [tuple(r) for r in db.execute("SELECT key, created_at, expires_at FROM sessions ORDER BY created_at")]


def test_a_session_made_at_one_node_is_valid_at_another_and_ends_at_both(nodes, clock):
    a, b = Sessions(nodes[0], clock), Sessions(nodes[1], clock)
    sid = a.create()
    assert a.valid(sid) and b.valid(sid)
    b.end(sid)  # signed out at the other node
    assert not a.valid(sid) and not b.valid(sid)


def test_the_csrf_token_of_one_node_is_accepted_at_another(nodes, clock):
    a, b = Sessions(nodes[0], clock), Sessions(nodes[1], clock)
    sid = a.create()
    token = a.csrf_token(sid)
    assert b.csrf_token(sid) == token and b.check_csrf(sid, token)
    assert not b.check_csrf(sid, token[:-1] + ("0" if token[-1] != "0" else "1"))
    other = a.create()
    assert not b.check_csrf(other, token)  # another session's token
    # The sign-in form too: rendered by one node, posted to another.
    nonce = a.login_nonce()
    assert b.check_login_csrf(nonce, a.login_csrf(nonce))
    b.end(sid)
    assert not a.check_csrf(sid, token)  # no session, no form


def test_a_restart_keeps_sessions_and_the_csrf_key(store_spec, clock):
    first = store_spec.open()
    sid = Sessions(first, clock).create()
    token = Sessions(first, clock).csrf_token(sid)
    first.close()
    with store_spec.open() as again:
        restarted = Sessions(again, clock)
        assert restarted.valid(sid) and restarted.check_csrf(sid, token)


def test_the_store_keeps_only_the_ids_hash(nodes, clock):
    sid = Sessions(nodes[0], clock).create()
    (key, created, expires), = rows(nodes[1])
    assert key == hashlib.sha256(sid.encode()).hexdigest() and sid not in key
    assert (created, expires) == (clock.now, clock.now + LIFETIME)
    with nodes[1]._tx(write=False) as db:
        stored = [str(v) for row in db.execute("SELECT key, value FROM meta") for v in row]
    assert not any(sid in v for v in stored)


def test_sessions_expire_and_expired_rows_are_swept(nodes, clock):
    a, b = Sessions(nodes[0], clock), Sessions(nodes[1], clock)
    old = a.create()
    clock.now += LIFETIME - 1
    assert b.valid(old)
    clock.now += 1
    assert not b.valid(old) and not a.valid(old)
    assert len(rows(nodes[0])) == 1  # a check only reads
    fresh = b.create()  # signing in sweeps what expired
    assert [r[0] for r in rows(nodes[0])] == [hashlib.sha256(fresh.encode()).hexdigest()]


def test_at_most_max_sessions_the_oldest_dropped(nodes, clock, monkeypatch):
    monkeypatch.setattr(session, "MAX_SESSIONS", 5)
    a, b = Sessions(nodes[0], clock), Sessions(nodes[1], clock)
    made = []
    for i in range(8):
        clock.now += 1
        made.append((a if i % 2 else b).create())
    assert len(rows(nodes[0])) == 5
    assert [a.valid(sid) for sid in made] == [False] * 3 + [True] * 5


def test_nodes_signing_in_at_once_never_leave_more_than_the_cap(store_spec, monkeypatch):
    monkeypatch.setattr(session, "MAX_SESSIONS", 7)
    stores = [store_spec.open() for _ in range(4)]
    made: list[str] = []
    try:
        def sign_in(store: Store) -> None:
            sessions = Sessions(store)
            for _ in range(15):
                made.append(sessions.create())

        threads = [threading.Thread(target=sign_in, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(made) == 60 and len(rows(stores[0])) == 7
        assert sum(Sessions(stores[0]).valid(sid) for sid in made) == 7
        # one key for all, made once however many asked at once
        assert len({s.session_secret() for s in stores}) == 1
    finally:
        for s in stores:
            s.close()


def test_a_sign_in_waits_for_one_in_progress_at_another_node(nodes, clock, monkeypatch):
    """Node A is in the middle of a sign-in at the cap (its transaction open, the oldest session
    deleted but not committed): node B's sign-in waits for it, then drops the next oldest, so the
    cap holds. Without the lock both would drop the same row and leave one too many."""
    monkeypatch.setattr(session, "MAX_SESSIONS", 3)
    a, b = nodes
    for _ in range(3):
        clock.now += 1
        Sessions(a, clock).create()
    done = threading.Event()

    def sign_in_at_b() -> None:
        Sessions(b, clock).create()
        done.set()

    with a._tx() as db:
        clock.now += 1
        store_module._add_session(db, "a" * 64, clock.now, clock.now + LIFETIME, 3)
        other = threading.Thread(target=sign_in_at_b)
        other.start()
        assert not done.wait(0.5)  # B waits for A's sign-in to end
    other.join()
    assert done.is_set() and len(rows(a)) == 3


def test_a_check_is_a_read_not_a_write(nodes, clock, monkeypatch):
    sessions = Sessions(nodes[0], clock)
    sid = sessions.create()
    token = sessions.csrf_token(sid)
    backend = nodes[0].backend
    real = backend.transaction
    kinds: list[bool] = []

    def spy(write: bool = True):
        kinds.append(write)
        return real(write)

    monkeypatch.setattr(backend, "transaction", spy)
    for _ in range(3):
        assert sessions.valid(sid) and sessions.check_csrf(sid, token)
        assert not sessions.valid("nobody")
    assert kinds and not any(kinds)


def test_each_database_has_its_own_key(tmp_path, clock):
    with Store(str(tmp_path / "a.db")) as one, Store(str(tmp_path / "b.db")) as two:
        a, b = Sessions(one, clock), Sessions(two, clock)
        sid = a.create()
        assert not b.valid(sid) and not b.check_csrf(sid, a.csrf_token(sid))
        nonce = a.login_nonce()
        assert not b.check_login_csrf(nonce, a.login_csrf(nonce))


@pytest.mark.parametrize("sid", [None, "", "x" * 101, "\udcff" * 10, "é" * 50, "a\x00b", "' OR 1=1 --"])
def test_hostile_session_ids_are_just_not_signed_in(nodes, clock, sid):
    sessions = Sessions(nodes[0], clock)
    sessions.create()
    assert not sessions.valid(sid)
    assert not sessions.check_csrf(sid, "0" * 64)
    sessions.end(sid)  # nothing happens
    assert len(rows(nodes[0])) == 1


@pytest.mark.parametrize("nonce", [None, "", "x" * 101, "².abc", "١٢٣.abc", "abc", "-5.x", "99999999999999999999.x"])
def test_hostile_sign_in_nonces_are_refused(nodes, clock, nonce):
    sessions = Sessions(nodes[0], clock)
    assert not sessions.check_login_csrf(nonce, "0" * 64)


def test_a_sign_in_form_expires(nodes, clock):
    a, b = Sessions(nodes[0], clock), Sessions(nodes[1], clock)
    nonce = a.login_nonce()
    token = a.login_csrf(nonce)
    clock.now += LOGIN_LIFETIME
    assert b.check_login_csrf(nonce, token)
    clock.now += 1
    assert not b.check_login_csrf(nonce, token)


def test_the_store_is_asked_for_only_when_a_session_is_used():
    asked: list[int] = []

    def store() -> Store:
        asked.append(1)
        raise AssertionError("not wanted")

    sessions = Sessions(store)
    assert not sessions.valid(None) and not sessions.valid("x" * 200) and not asked
