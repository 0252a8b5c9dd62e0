"""One artifacts directory shared by several dispatchers (settings.artifacts_dir on the nodes of a
cluster): writers and sweeps of different nodes at once, on each store backend.

Two ``ArtifactStore`` objects on one directory, each over its own ``Store`` on one database,
stand for two nodes; the races a sweep must survive are forced at the exact step they need.
Then the API: a download through a node whose directory lacks the object is a clear 503, and
with a shared directory any node serves the bytes. The real path (two ``narwhal serve``
processes, sshd, dockerd) is tests/e2e/test_cluster_shared.py."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import webtest

from narwhal.api.app import make_app
from narwhal.config.loader import load_config
from narwhal.config.settings import DEFAULT_SETTINGS
from narwhal.dispatch import artifacts as artifacts_mod
from narwhal.dispatch.artifacts import GRACE, ArtifactStore
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.dispatch.store import Store
from tests.conftest import Clock, StoreSpec

X = b"the same wheel, built on two nodes\n" * 1000
CLUSTER = replace(DEFAULT_SETTINGS, cluster=True)  # what the nodes' settings say (the grace follows it)


@pytest.fixture
def clock() -> Clock:
    return Clock()


Node = tuple[ArtifactStore, Store]


@pytest.fixture
def nodes(store_spec: StoreSpec, tmp_path: Path, clock: Clock) -> Iterator[Callable[[], Node]]:
    """Factory: another node on the one database and the one artifacts directory (default grace)."""
    opened: list[Store] = []

    def node() -> Node:
        store = store_spec.open(clock)
        opened.append(store)
        return ArtifactStore(tmp_path / "shared", store, lambda: CLUSTER, clock=clock), store

    yield node
    for s in opened:
        s.close()


def job(store: Store, n: int = 0) -> int:
    return store.create_jobs("/repo", f"{n:040x}", "main", ["p"])[0][0].id


def keep(arts: ArtifactStore, job_id: int, files: dict[str, bytes], expire: float | None = None,
         commit: bool = True):
    col = arts.collection(job_id, 1, expire)
    for name, data in files.items():
        col.put(name, len(data), io.BytesIO(data).read)
    if commit:
        col.commit()
    return col


def age(arts: ArtifactStore, data: bytes, seconds: float) -> None:
    """Make an object look stored ``seconds`` before the clock's now."""
    then = arts.clock() - seconds
    os.utime(arts.path_of(sha(data)), (then, then))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def objects(arts: ArtifactStore) -> list[Path]:
    return sorted(p for p in arts.objects.rglob("*") if p.is_file())


def test_nodes_storing_the_same_content_at_once_all_succeed(nodes):
    (a, sa), (b, sb) = nodes(), nodes()
    writers = [(arts, store, i) for i in range(6) for arts, store in ((a, sa), (b, sb))]
    ids = [job(store, i * 2 + (arts is b)) for arts, store, i in writers]
    start = threading.Barrier(len(writers))
    failed: list[BaseException] = []

    def write(arts: ArtifactStore, job_id: int, n: int) -> None:
        try:
            start.wait()
            keep(arts, job_id, {"dist/app.whl": X, "own.txt": f"mine {n}".encode()})
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    threads = [threading.Thread(target=write, args=(arts, jid, n))
               for n, ((arts, _, _), jid) in enumerate(zip(writers, ids, strict=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == []
    assert a.path_of(sha(X)).read_bytes() == X
    assert len(objects(a)) == 1 + len(writers)  # the shared one once, and each writer's own
    assert list(a.tmp.iterdir()) == []  # every temp file renamed in or dropped
    for jid in ids:  # every row names an object that is there, whichever node reads it
        for row in sb.artifacts(jid):
            assert b.path_of(row["sha256"]).is_file()


def test_a_sweep_spares_what_another_node_stored_and_has_not_recorded_yet(nodes, clock):
    (a, sa), (b, _) = nodes(), nodes()
    col = keep(a, job(sa), {"f": X}, commit=False)  # a collection still running at A
    clock.now += 60
    assert b.sweep() == (0, 0)  # B does not know A's collection: the grace keeps it
    assert a.path_of(sha(X)).is_file()
    col.commit()
    clock.now += b.grace + 1
    assert b.sweep() == (0, 0)  # recorded now: the row keeps it
    assert b.grace == GRACE + DEFAULT_SETTINGS.artifacts_timeout
    assert ArtifactStore(a.root, sa, lambda: DEFAULT_SETTINGS).grace == 0  # a lone dispatcher sees every collection


def test_an_old_object_another_job_names_is_kept(nodes, clock):
    (a, sa), (b, _) = nodes(), nodes()
    keep(a, job(sa), {"f": X})
    age(a, X, 10 * b.grace)
    assert b.sweep() == (0, 0) and b.path_of(sha(X)).read_bytes() == X
    clock.now += DEFAULT_SETTINGS.artifacts_expire + 1  # expired: nothing names it
    age(a, X, 10 * b.grace)
    assert b.sweep() == (0, 1) and objects(a) == []


def test_an_expired_object_stored_again_by_another_node_is_spared(nodes, clock):
    (a, sa), (b, _) = nodes(), nodes()
    keep(a, job(sa, 1), {"f": X}, expire=60)
    clock.now += 61
    age(a, X, 10 * b.grace)
    col = keep(a, job(sa, 2), {"again": X}, commit=False)  # there already: A only moves its time on
    assert b.sweep() == (0, 0) and a.path_of(sha(X)).read_bytes() == X
    col.commit()


def test_an_object_stored_again_while_a_sweep_looks_goes_back(nodes, clock, monkeypatch):
    """B's sweep found the object old and unnamed; A stores the same content again right after
    (between B's walk and its removal): B moves it aside, sees it young again, and puts it back."""
    (a, sa), (b, sb) = nodes(), nodes()
    keep(a, job(sa, 1), {"f": X}, expire=60)
    clock.now += 61
    age(a, X, 10 * b.grace)
    held = []
    rows = sb.live_artifact_objects

    def after_the_walk(now: float) -> set[str]:
        held.append(keep(a, job(sa, 2), {"again": X}, commit=False))
        return rows(now)

    monkeypatch.setattr(sb, "live_artifact_objects", after_the_walk)
    assert b.sweep() == (0, 0)
    assert held and a.path_of(sha(X)).read_bytes() == X and list(a.tmp.iterdir()) == []
    held[0].commit()


class RenameThen:
    """The artifacts module's ``os``, running ``then`` right after a sweep moves an object aside."""

    def __init__(self, then: Callable[[], None]):
        self.then = then
        self.fired = False

    def __getattr__(self, name: str):
        return getattr(os, name)

    def rename(self, src, dst) -> None:
        os.rename(src, dst)
        if not self.fired and Path(dst).name.startswith("swept-"):
            self.fired = True
            self.then()


def test_an_object_stored_while_a_sweep_holds_the_old_one_aside_stays(nodes, clock, monkeypatch):
    """A stores the content while B has the old copy moved aside: A finds no object, renames its
    own in; B then removes only the old copy."""
    (a, sa), (b, _) = nodes(), nodes()
    keep(a, job(sa, 1), {"f": X}, expire=60)
    clock.now += 61
    age(a, X, 10 * b.grace)
    held = []
    hook = RenameThen(lambda: held.append(keep(a, job(sa, 2), {"again": X}, commit=False)))
    monkeypatch.setattr(artifacts_mod, "os", hook)
    assert b.sweep() == (0, 1)  # the old copy
    assert hook.fired and a.path_of(sha(X)).read_bytes() == X and list(a.tmp.iterdir()) == []
    held[0].commit()


def test_two_sweeps_at_once_remove_each_object_once(nodes, clock):
    (a, sa), (b, _) = nodes(), nodes()
    data = [f"object {i}".encode() * 100 for i in range(40)]
    for i, d in enumerate(data):
        keep(a, job(sa, i), {"f": d}, expire=60)
    clock.now += 61
    for d in data:
        age(a, d, 10 * a.grace)
    start = threading.Barrier(2)
    results: list[tuple[int, int]] = []
    failed: list[BaseException] = []

    def sweep(arts: ArtifactStore) -> None:
        try:
            start.wait()
            results.append(arts.sweep())
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    threads = [threading.Thread(target=sweep, args=(arts,)) for arts in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == [] and sum(removed for _, removed in results) == len(data)
    assert objects(a) == [] and list(a.tmp.iterdir()) == [] and a.used == b.used == 0


def test_a_sweep_counts_every_nodes_objects_for_the_quota(nodes):
    (a, sa), (b, _) = nodes(), nodes()
    keep(a, job(sa), {"f": X})
    assert a.used == len(X) and b.used == 0  # B has not looked since
    b.sweep()
    assert b.used == len(X)


# --- through the API: a node whose directory lacks the object -----------------------------------


INVENTORY = "runners:\n  - name: local\n    transport: local\n"
PIPELINE = 'repo: "*"\nimage: img\nsteps:\n  - {name: build, run: "true"}\nartifacts: {paths: [dist]}\n'


@pytest.fixture
def cluster(postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Dispatcher]]:
    """Factory: a node of a cluster (a Dispatcher that is never started) on one PostgreSQL database."""
    database = postgres.spec()
    spec = next(database)
    monkeypatch.setenv("NARWHAL_TEST_PGPASS", spec.password or "")
    made: list[Dispatcher] = []

    def node(artifacts_dir: Path | None = None) -> Dispatcher:
        config = tmp_path / f"config{len(made)}"
        (config / "pipelines").mkdir(parents=True)
        shared = f"  artifacts_dir: {str(artifacts_dir)!r}\n" if artifacts_dir else ""
        (config / "inventory.yaml").write_text(
            INVENTORY + f"settings:\n  store: {spec.where}\n  store_password: PGPASS\n  cluster: true\n{shared}"
            "secrets:\n  PGPASS: {env: NARWHAL_TEST_PGPASS}\n")
        (config / "pipelines" / "ci.yaml").write_text(PIPELINE)
        d = Dispatcher(load_config(config), tmp_path / f"state{len(made)}")
        made.append(d)
        return d

    yield node
    for d in made:
        d.stop()
    database.close()  # dropped


def collected(d: Dispatcher, data: bytes) -> int:
    (j, _), = d.store.create_jobs("/repo", "c" * 40, "main", ["ci"])
    keep(d.artifact_store, j.id, {"dist/app.whl": data})
    return j.id


def test_a_download_through_a_node_without_the_object_says_why(cluster, tmp_path):
    ran, other = cluster(), cluster()
    assert any("settings.artifacts_dir: not set, with cluster: true" in str(w) for w in ran.config.warnings)
    data = os.urandom(100_000)
    job_id = collected(ran, data)
    url = f"/jobs/{job_id}/artifacts/dist/app.whl"
    r = webtest.TestApp(make_app(ran)).get(url)
    assert r.status_int == 200 and sha(r.body) == sha(data)
    for method in ("GET", "HEAD"):
        r = webtest.TestApp(make_app(other)).request(url, method=method, expect_errors=True)
        assert r.status_int == 503 and r.content_type == "application/json"
        if method == "GET":
            message = r.json["error"]
            assert "not in this node's artifacts_dir" in message and "shared" in message
            assert "docs/deploy.md" in message
            assert str(tmp_path) not in r.text and "Traceback" not in r.text
    listing = webtest.TestApp(make_app(other)).get(f"/jobs/{job_id}/artifacts").json
    assert [a["path"] for a in listing["artifacts"]] == ["dist/app.whl"]  # the rows are shared


def test_with_a_shared_artifacts_dir_any_node_serves_the_bytes(cluster, tmp_path):
    shared = tmp_path / "shared-artifacts"
    ran, other = cluster(shared), cluster(shared)
    assert not any("artifacts_dir" in str(w) for w in ran.config.warnings)
    assert ran.artifact_store.root == other.artifact_store.root == shared
    data = os.urandom(100_000)
    job_id = collected(ran, data)
    r = webtest.TestApp(make_app(other)).get(f"/jobs/{job_id}/artifacts/dist/app.whl")
    assert r.status_int == 200 and sha(r.body) == sha(data) == r.headers["X-Checksum-SHA256"]
    assert not (tmp_path / "state0" / "artifacts").exists() and not (tmp_path / "state1" / "artifacts").exists()


def test_a_lone_dispatcher_missing_an_object_says_gone(tmp_path):
    config = tmp_path / "config"
    (config / "pipelines").mkdir(parents=True)
    (config / "inventory.yaml").write_text(INVENTORY)
    (config / "pipelines" / "ci.yaml").write_text(PIPELINE)
    d = Dispatcher(load_config(config), tmp_path / "state")
    try:
        job_id = collected(d, b"lost")
        d.artifact_store.path_of(sha(b"lost")).unlink()
        r = webtest.TestApp(make_app(d)).get(f"/jobs/{job_id}/artifacts/dist/app.whl", expect_errors=True)
        assert r.status_int == 410 and "no longer stored" in r.json["error"] and str(tmp_path) not in r.text
    finally:
        d.stop()
