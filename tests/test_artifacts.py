"""Artifacts without Docker: the collector's argv, the tar intake (hostile streams included) and the
store's objects, quota, cap and expiry. The collector streams through a real LocalTransport (`cat`
of a tar file), so the byte path is the one jobs use; tests/e2e/test_artifacts.py runs it over SSH
with dockerd."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from narwhal.config.settings import DEFAULT_SETTINGS, Settings
from narwhal.dispatch.artifacts import ArtifactStore
from narwhal.dispatch.store import ARTIFACT_ROWS_KEPT, Store
from narwhal.execution import artifacts, docker
from narwhal.execution.transport import LocalTransport
from tests.conftest import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Store:
    s = Store(str(tmp_path / "narwhal.db"), clock=clock)
    yield s
    s.close()


def make_job(store: Store) -> int:
    (job, _), = store.create_jobs("/repo", "a" * 40, "main", ["p"])
    return job.id


def artifact_store(tmp_path: Path, store: Store, clock: Clock, **settings: object) -> ArtifactStore:
    values = Settings(**{**{f: getattr(DEFAULT_SETTINGS, f) for f in ("artifacts_expire",)}, **settings})
    return ArtifactStore(tmp_path / "artifacts", store, lambda: values, clock=clock)


def tar_of(entries: list[tarfile.TarInfo | tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for entry in entries:
            if isinstance(entry, tuple):
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(entry)
    return out.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def collect(tmp_path: Path, stream: bytes, receiver: artifacts.Receiver, cap: int = 1 << 30,
            timeout: float = 30) -> tuple[artifacts.Collected, int, bytes]:
    path = tmp_path / "stream.tar"
    path.write_bytes(stream)
    return asyncio.run(artifacts.collect(LocalTransport(), ["cat", str(path)], receiver, cap=cap, timeout=timeout))


# --- the collector's command line ---------------------------------------------------------


def test_collector_is_hardened_read_only_and_takes_patterns_as_arguments():
    labels = docker.labels("owner1", 7, 1)
    argv = docker.collect_artifacts("narwhal-x-7-1-artifacts", "img:1", ["dist/*.whl", "a b; rm -rf /"],
                                    volume="narwhal-x-7-1", label_values=labels)
    assert argv[:3] == ["docker", "run", "--rm"]
    assert "--read-only" in argv and argv[argv.index("--network") + 1] == "none"
    mount = argv[argv.index("--mount") + 1]
    assert mount.endswith(",readonly") and "target=/workspace" in mount
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[-4:] == [docker.COLLECT, "narwhal-artifacts", "dist/*.whl", "a b; rm -rf /"]
    assert argv[argv.index("--") + 1] == "img:1"
    with pytest.raises(ValueError):
        docker.collect_artifacts("n", "img", ["a\x00b"], volume="v", label_values=labels)
    with pytest.raises(ValueError):
        docker.collect_artifacts("n", "img", [], volume="v", label_values=labels)


def test_collector_script_globs_without_splitting(tmp_path: Path):
    """The fixed script, run by a real /bin/sh: a pattern is globbed, never split or evaluated."""
    import subprocess

    work = tmp_path / "w"
    (work / "dist").mkdir(parents=True)
    (work / "dist" / "a.whl").write_bytes(b"A")
    (work / "dist" / "b.whl").write_bytes(b"B")
    (work / "my report.xml").write_bytes(b"R")
    (work / "dist" / "skip.txt").write_bytes(b"S")
    script = docker.COLLECT.replace(docker.WORKSPACE, str(work))
    out = subprocess.run(["/bin/sh", "-c", script, "x", "dist/*.whl", "my report.xml", "none*", "$(touch pwned)"],
                         capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        assert sorted(tar.getnames()) == ["./dist/a.whl", "./dist/b.whl", "./my report.xml"]
    assert not (work / "pwned").exists() and not Path("pwned").exists()
    nothing = subprocess.run(["/bin/sh", "-c", script, "x", "none*"], capture_output=True, check=True)
    assert nothing.stdout == b""


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, path", [
    ("./dist/a.whl", "dist/a.whl"), ("a//b/./c", "a/b/c"), ("report.xml", "report.xml"),
    ("/etc/passwd", None), ("../x", None), ("a/../../x", None), ("a/..", None), (".", None), ("", None),
    ("a\nb", None), ("a\x00b", None), ("a\udcffb", None), ("x" * 1025, None),
])
def test_member_path(name, path):
    assert artifacts.member_path(name) == path


@pytest.mark.parametrize("path, target, symbolic, where", [
    ("dist/latest.whl", "a.whl", True, "dist/a.whl"),
    ("dist/latest.whl", "../report.xml", True, "report.xml"),
    ("link", "/etc/passwd", True, None),
    ("link", "../../etc/passwd", True, None),
    ("a/link", "../../x", True, None),
    ("hard", "dist/a.whl", False, "dist/a.whl"),
    ("hard", "../outside", False, None),
])
def test_link_target(path, target, symbolic, where):
    assert artifacts.link_target(path, target, symbolic) == where


# --- intake: what a collector may send ------------------------------------------------------


def test_files_come_back_byte_identical_and_deduplicated(tmp_path, store, clock):
    job = make_job(store)
    arts = artifact_store(tmp_path, store, clock)
    big = os.urandom(3 * 1024 * 1024 + 17)
    stream = tar_of([("./dist/a.whl", big), ("./report.xml", b"<r/>"), ("./copy.whl", big)])
    col = arts.collection(job, 1, None)
    got, code, _ = collect(tmp_path, stream, col)
    col.commit()
    assert (got.files, got.bytes, got.stopped, code) == (3, 2 * len(big) + 4, None, 0)
    rows = {r["path"]: r for r in store.artifacts(job)}
    assert sorted(rows) == ["copy.whl", "dist/a.whl", "report.xml"]
    sha = hashlib.sha256(big).hexdigest()
    assert rows["dist/a.whl"]["sha256"] == rows["copy.whl"]["sha256"] == sha
    assert arts.path_of(sha).read_bytes() == big
    assert arts.used == len(big) + 4  # one object for the two copies
    assert rows["report.xml"]["expires_at"] == clock.now + DEFAULT_SETTINGS.artifacts_expire
    assert list(arts.tmp.iterdir()) == []


def test_escapes_are_refused_with_a_note_naming_the_path(tmp_path, store, clock):
    job = make_job(store)
    arts = artifact_store(tmp_path, store, clock)
    fifo = tarfile.TarInfo("./pipe")
    fifo.type = tarfile.FIFOTYPE
    stream = tar_of([
        ("./ok.txt", b"fine"),
        ("/etc/passwd", b"root:x:0:0"),
        ("../../escape", b"nope"),
        link("./out", "/etc/shadow"),
        link("./up", "../../../etc/shadow"),
        link("./hard", "/etc/passwd", tarfile.LNKTYPE),
        link("./inside", "ok.txt"),
        link("./dangling", "missing.txt"),
        fifo,
    ])
    col = arts.collection(job, 1, None)
    got, _, _ = collect(tmp_path, stream, col)
    col.commit()
    assert sorted(r["path"] for r in store.artifacts(job)) == ["inside", "ok.txt"]
    text = "\n".join(got.notes)
    for name in ("/etc/passwd", "../../escape", "./out", "./up", "./hard", "./pipe", "dangling"):
        assert name in text, (name, text)
    assert "root:x" not in text and "nope" not in text  # paths only, never contents
    assert "points out of the workspace" in text


def test_a_file_over_the_jobs_cap_stops_collecting_and_keeps_what_came_before(tmp_path, store, clock):
    job = make_job(store)
    arts = artifact_store(tmp_path, store, clock, artifacts_job_cap=1000)
    col = arts.collection(job, 1, None)
    got, _, _ = collect(tmp_path, tar_of([("a", b"x" * 600), ("b", b"y" * 600), ("c", b"z")]), col)
    col.commit()
    assert got.stopped is not None and "cap of 1000 bytes" in got.stopped
    assert [r["path"] for r in store.artifacts(job)] == ["a"]
    assert list(arts.tmp.iterdir()) == []


def test_the_store_quota_counts_distinct_objects(tmp_path, store, clock):
    arts = artifact_store(tmp_path, store, clock, artifacts_quota=2500)
    first, second = make_job(store), store.create_jobs("/repo", "b" * 40, None, ["p"])[0][0].id
    col = arts.collection(first, 1, None)
    collect(tmp_path, tar_of([("a", b"x" * 1000)]), col)
    col.commit()
    col = arts.collection(second, 1, None)
    got, _, _ = collect(tmp_path, tar_of([("same", b"x" * 1000), ("other", b"y" * 1000), ("third", b"z" * 1000)]),
                        col)
    col.commit()
    assert got.stopped is not None and "quota (2500 bytes, 2000 used)" in got.stopped
    assert [r["path"] for r in store.artifacts(second)] == ["other", "same"]  # "same" took no room
    assert arts.used == 2000


def test_a_stream_larger_than_the_cap_is_cut_off(tmp_path, store, clock):
    job = make_job(store)
    arts = artifact_store(tmp_path, store, clock)
    col = arts.collection(job, 1, None)
    stream = tar_of([(f"f{i}", os.urandom(256 * 1024)) for i in range(12)])
    got, _, _ = collect(tmp_path, stream, col, cap=0)  # slack only: 1 MiB of stream
    col.commit()
    assert got.stopped is not None and "more than 0 bytes" in got.stopped
    assert got.files < 12


def test_hostile_headers_are_bounded(tmp_path, store, clock):
    job = make_job(store)
    arts = artifact_store(tmp_path, store, clock)
    # A GNU long-name header that claims 2 GiB: tarfile would read it all into memory.
    head = tarfile.TarInfo("././@LongLink")
    head.type = tarfile.GNUTYPE_LONGNAME
    head.size = 2 * 1024**3
    raw = head.tobuf(format=tarfile.USTAR_FORMAT)
    col = arts.collection(job, 1, None)
    got, _, _ = collect(tmp_path, raw + b"\0" * 4096, col)
    assert got.stopped is not None and "not valid" in got.stopped
    col = arts.collection(job, 1, None)
    got, _, _ = collect(tmp_path, b"this is not a tar stream at all" * 100, col)
    assert got.stopped is not None and got.files == 0
    got, _, _ = collect(tmp_path, b"", arts.collection(job, 1, None))
    assert (got.files, got.stopped) == (0, None)  # nothing matched: nothing sent


def test_pax_names_and_utf8_come_back(tmp_path, store, clock):
    job = make_job(store)
    arts = artifact_store(tmp_path, store, clock)
    long = "d/" + "n" * 300 + "/résumé ☃.txt"
    col = arts.collection(job, 1, None)
    got, _, _ = collect(tmp_path, tar_of([(long, b"ok")], fmt=tarfile.PAX_FORMAT), col)
    col.commit()
    assert got.files == 1 and store.artifact(job, long) is not None


def test_a_failing_collector_is_reported(tmp_path, store, clock):
    job = make_job(store)
    arts = artifact_store(tmp_path, store, clock)
    got, code, errors = asyncio.run(artifacts.collect(
        LocalTransport(), ["/bin/sh", "-c", "echo 'tar: not found' >&2; exit 127"],
        arts.collection(job, 1, None), cap=1 << 20, timeout=10))
    assert (code, errors.strip(), got.files) == (127, b"tar: not found", 0)


def test_a_collector_that_hangs_is_stopped_at_the_timeout(tmp_path, store, clock):
    job = make_job(store)
    arts = artifact_store(tmp_path, store, clock)
    got, _, _ = asyncio.run(artifacts.collect(LocalTransport(), ["sleep", "30"], arts.collection(job, 1, None),
                                              cap=1 << 20, timeout=0.5))
    assert got.stopped == "collecting took longer than 0.5s"


# --- expiry ------------------------------------------------------------------------------


def test_sweep_removes_expired_objects_and_keeps_shared_ones(tmp_path, store, clock):
    arts = artifact_store(tmp_path, store, clock)
    old, new = make_job(store), store.create_jobs("/repo", "b" * 40, None, ["p"])[0][0].id
    col = arts.collection(old, 1, 60)
    collect(tmp_path, tar_of([("shared", b"s"), ("mine", b"m")]), col)
    col.commit()
    col = arts.collection(new, 1, 3600)
    collect(tmp_path, tar_of([("shared", b"s")]), col)
    col.commit()
    clock.now += 61
    assert arts.sweep() == (0, 1)  # "mine" is gone; "shared" is still named by the new job
    assert not arts.path_of(hashlib.sha256(b"m").hexdigest()).exists()
    assert arts.path_of(hashlib.sha256(b"s").hexdigest()).exists()
    assert store.artifact(old, "mine") is not None  # the row stays: downloads say 410, not 404
    clock.now += ARTIFACT_ROWS_KEPT
    assert arts.sweep() == (2, 1)  # the old job's rows are forgotten; the new job's expired meanwhile
    assert store.artifacts(old) == [] and store.artifact(new, "shared") is not None and arts.used == 0


def test_sweep_spares_objects_of_a_collection_in_progress(tmp_path, store, clock):
    arts = artifact_store(tmp_path, store, clock)
    job = make_job(store)
    col = arts.collection(job, 1, None)
    col.put("f", 3, io.BytesIO(b"abc").read)
    clock.now += 10  # a lone dispatcher's sweep spares no object for its age: only the hold keeps it
    assert arts.sweep() == (0, 0)  # not recorded yet, but held
    col.commit()
    assert arts.sweep() == (0, 0)
    aborted = arts.collection(job, 2, None)
    aborted.put("g", 3, io.BytesIO(b"xyz").read)
    aborted.abort()
    clock.now += 10
    assert arts.sweep() == (0, 1)


def test_a_restarted_store_counts_what_is_on_disk(tmp_path, store, clock):
    arts = artifact_store(tmp_path, store, clock)
    col = arts.collection(make_job(store), 1, None)
    col.put("f", 5, io.BytesIO(b"hello").read)
    col.commit()
    assert artifact_store(tmp_path, store, clock).used == 5


def test_path_of_takes_only_a_sha256(tmp_path, store, clock):
    arts = artifact_store(tmp_path, store, clock)
    for bad in ("../../narwhal.db", "a" * 63, "A" * 64, "g" * 64, ""):
        with pytest.raises(ValueError):
            arts.path_of(bad)
