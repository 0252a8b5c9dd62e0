"""clone.py on real git: the workspace tar with a .git and submodules, made from the mirror only.

Submodules come from a real git server on loopback (testbed.GitHttpServer); hostile
``.gitmodules`` entries are refused with a note and never fetched.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from narwhal.cli.gitrepo import GIT_ENV, add_commit
from narwhal.config.pipeline import Clone
from narwhal.config.settings import Settings
from narwhal.errors import SourceError
from narwhal.execution import clone as clone_mod
from narwhal.execution.clone import Workspaces
from narwhal.execution.source import Mirror
from testbed import GitHttpServer, make_git_repo

ENV = {**os.environ, **GIT_ENV}


def git(path: str | Path, *args: str, input: bytes | None = None) -> str:
    return subprocess.run(["git", "-C", str(path), *args], env=ENV, check=True, capture_output=True,
                          input=input).stdout.decode().strip()


def tag(path: str, name: str) -> None:
    git(path, "tag", "-a", name, "-m", f"release {name}")


def unpack(data: bytes, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="tar")
    return into


def workspaces(tmp_path: Path, **settings: object) -> Workspaces:
    return Workspaces(Mirror(tmp_path / "mirrors"), tmp_path / "workspaces", lambda: Settings(**settings))  # type: ignore[arg-type]


def with_gitlink(repo: str, path: str, commit: str, gitmodules: str) -> str:
    """A commit of REPO with a gitlink at PATH and the given .gitmodules text."""
    Path(repo, ".gitmodules").write_text(gitmodules)
    git(repo, "add", ".gitmodules")
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{commit},{path}")
    git(repo, "commit", "-q", "-m", "submodule")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def history(tmp_path) -> tuple[str, str]:
    """A repository with tags v1.0 and v1.1, two commits after v1.1, and a side branch tagged v9."""
    path, _ = make_git_repo(str(tmp_path / "repo"), {"README.md": "# app\n"})
    add_commit(path, {"a.txt": "1\n"})
    tag(path, "v1.0")
    add_commit(path, {"a.txt": "2\n"})
    tag(path, "v1.1")
    add_commit(path, {"a.txt": "3\n"})
    head = add_commit(path, {"a.txt": "4\n"})
    git(path, "checkout", "-q", "-b", "side")
    add_commit(path, {"side.txt": "x\n"})
    tag(path, "v9")
    git(path, "checkout", "-q", "main")
    return path, head


def test_git_true_ships_a_dot_git_where_describe_and_log_name_the_commit(history, tmp_path):
    repo, head = history
    prepared = workspaces(tmp_path).prepare(repo, head, Clone(git=True), [])
    data = prepared.path.read_bytes()
    root = unpack(data, tmp_path / "ws")
    assert git(root, "describe", "--tags") == f"v1.1-2-g{head[:7]}"
    assert git(root, "describe", "--tags", "--dirty", "--long").endswith(head[:7])  # a clean tree
    assert git(root, "log", "-1", "--format=%H") == head
    assert git(root, "rev-parse", "HEAD") == head
    assert git(root, "status", "--porcelain") == ""
    assert (root / ".git/HEAD").read_text().strip() == head  # detached at the commit
    assert git(root, "tag", "-l") == "v1.0\nv1.1"  # v9 is not in the commit's history
    assert git(root, "config", "remote.origin.url") == repo
    assert (root / "a.txt").read_text() == "4\n"


def test_the_dot_git_holds_nothing_of_the_dispatcher(history, tmp_path):
    repo, head = history
    ws = workspaces(tmp_path)
    data = ws.prepare(repo, head, Clone(git=True), []).path.read_bytes()
    # No mirror or build path: no FETCH_HEAD, no reflog, no remote pointing there.
    assert str(tmp_path / "mirrors").encode() not in data and str(tmp_path / "workspaces").encode() not in data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        members = tar.getmembers()
    top = {n.split("/")[1] for n in names if n.startswith(".git/") and n.count("/") >= 1}
    assert top <= {"HEAD", "config", "index", "objects", "refs", "packed-refs", "shallow"}
    assert not any(n.startswith((".git/hooks", ".git/logs", ".git/FETCH_HEAD")) for n in names)
    assert all(m.uid == 0 and m.gid == 0 for m in members)
    assert not any("side" in n for n in names)  # no other branch


def test_a_commit_no_branch_holds_still_ships(history, tmp_path):
    repo, head = history
    orphan = git(repo, "commit-tree", "-p", head, "-m", "detached", f"{head}^{{tree}}")
    git(repo, "update-ref", "refs/keep/x", orphan)  # so the mirror's clone has it, though no branch does
    root = unpack(workspaces(tmp_path).prepare(repo, orphan, Clone(git=True), []).path.read_bytes(),
                  tmp_path / "ws")
    assert git(root, "log", "-1", "--format=%H") == orphan
    assert git(root, "describe", "--tags") == f"v1.1-3-g{orphan[:7]}"


def test_depth_ships_that_much_history_and_the_tags_within_it(history, tmp_path):
    repo, head = history
    root = unpack(workspaces(tmp_path).prepare(repo, head, Clone(git=True, depth=3), []).path.read_bytes(),
                  tmp_path / "ws")
    assert git(root, "rev-list", "--count", "HEAD") == "3"
    assert git(root, "tag", "-l") == "v1.1"
    assert git(root, "describe", "--tags") == f"v1.1-2-g{head[:7]}"


def test_a_workspace_is_made_once_per_commit_and_options(history, tmp_path):
    repo, head = history
    ws = workspaces(tmp_path)
    first = ws.prepare(repo, head, Clone(git=True), [])
    mtime = first.path.stat().st_mtime_ns
    again = ws.prepare(repo, head, Clone(git=True), [])
    assert again.path == first.path and again.path.stat().st_size == first.size
    assert ws.prepare(repo, head, Clone(git=True, depth=1), []).path != first.path
    assert first.path.stat().st_mtime_ns >= mtime


def test_clone_max_bytes_fails_with_a_reason_and_leaves_nothing(history, tmp_path):
    repo, head = history
    ws = workspaces(tmp_path, clone_max_bytes=4096)
    with pytest.raises(SourceError, match="larger than clone_max_bytes"):
        ws.prepare(repo, head, Clone(git=True), [])
    assert sorted(p.name for p in (tmp_path / "workspaces").iterdir()) == []


def test_a_tree_that_would_check_out_larger_than_clone_max_bytes_is_refused_before_the_checkout(tmp_path,
                                                                                               monkeypatch):
    # 64 MiB of zeros is a few hundred KiB in git: the checkout, not the tar, would fill the disk.
    repo, _ = make_git_repo(str(tmp_path / "repo"), {"README.md": "# app\n"})
    with open(Path(repo, "zeros.bin"), "wb") as f:
        f.truncate(64 * 1024 * 1024)
    head = add_commit(repo, {})
    ws = workspaces(tmp_path, clone_max_bytes=16 * 1024 * 1024)
    ran: list[str] = []
    real = clone_mod._run
    monkeypatch.setattr(clone_mod, "_run", lambda args, *a, **kw: ran.append(" ".join(args)) or real(args, *a, **kw))
    with pytest.raises(SourceError, match="larger than clone_max_bytes"):
        ws.prepare(repo, head, Clone(git=True), [])
    assert not any(" checkout " in f" {cmd} " or cmd.startswith("init") for cmd in ran), ran
    assert list((tmp_path / "workspaces").iterdir()) == []


def test_a_prepared_workspace_survives_its_eviction(history, tmp_path):
    repo, head = history
    ws = workspaces(tmp_path, clone_cache=1)
    first = ws.prepare(repo, head, Clone(git=True), [])
    expected = first.path.read_bytes()
    ws.prepare(repo, head, Clone(git=True, depth=1), [])  # evicts the first
    assert not first.path.exists()

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in first.stream()])

    assert asyncio.run(collect()) == expected
    assert asyncio.run(collect()) == expected  # again from the start (a retried checkout)


def test_the_cache_keeps_at_most_clone_cache_bytes(history, tmp_path):
    repo, head = history
    ws = workspaces(tmp_path, clone_cache=1)
    first = ws.prepare(repo, head, Clone(git=True), [])
    second = ws.prepare(repo, head, Clone(git=True, depth=1), [])
    assert second.path.exists() and not first.path.exists()


def test_the_stream_is_the_file(history, tmp_path):
    repo, head = history
    prepared = workspaces(tmp_path).prepare(repo, head, Clone(git=True), [])

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in prepared.stream()])

    assert asyncio.run(collect()) == prepared.path.read_bytes()


# --- submodules ------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    server = GitHttpServer(tmp_path / "served").start()
    yield server
    server.stop()


def publish(server: GitHttpServer, source: str, name: str) -> str:
    target = server.root / name
    subprocess.run(["git", "clone", "-q", "--bare", source, str(target)], env=ENV, check=True)
    subprocess.run(["git", "-C", str(target), "update-server-info"], env=ENV, check=True)
    return server.url_for(name)


def test_submodules_ship_at_the_recorded_commit_and_hostile_ones_are_refused(tmp_path, served):
    lib, first = make_git_repo(str(tmp_path / "lib"), {"lib.txt": "lib one\n"})
    add_commit(lib, {"lib.txt": "lib two\n"})  # newer than the recorded commit
    publish(served, lib, "org/lib.git")
    app, _ = make_git_repo(str(tmp_path / "app"), {"README.md": "# app\n"})
    commit = with_gitlink(app, "vendor/lib", first, "\n".join([
        '[submodule "lib"]', "\tpath = vendor/lib", "\turl = ../lib.git",
        '[submodule "etc"]', "\tpath = vendor/etc", "\turl = file:///etc",
        '[submodule "escape"]', "\tpath = ../../x", f"\turl = {served.url}/org/lib.git",
        '[submodule "option"]', "\tpath = vendor/opt", "\turl = -uhack",
        '[submodule "helper"]', "\tpath = vendor/ext", "\turl = ext::sh -c touch% /tmp/pwned",
        '[submodule "elsewhere"]', "\tpath = vendor/other", "\turl = ssh://evil.example/x.git", ""]))
    for path in ("vendor/etc", "vendor/opt", "vendor/ext", "vendor/other"):
        commit = with_gitlink(app, path, first, Path(app, ".gitmodules").read_text())
    url = publish(served, app, "org/app.git")
    served.seen.clear()
    hosts = [f"127.0.0.1:{served.port}"]
    for clone in (Clone(submodules=True), Clone(git=True, submodules=True)):
        prepared = workspaces(tmp_path / str(clone.git)).prepare(url, commit, clone, hosts)
        root = unpack(prepared.path.read_bytes(), tmp_path / f"ws-{clone.git}")
        assert (root / "vendor/lib/lib.txt").read_text() == "lib one\n"
        notes = "\n".join(prepared.notes)
        assert "submodule 'etc' not shipped: url is a path on the dispatcher" in notes
        assert "submodule 'escape' not shipped: path '../../x' has empty, '.' or '..' segments" in notes
        assert "submodule 'option' not shipped: url starts with '-'" in notes
        assert "submodule 'helper' not shipped: url refused" in notes and "remote helpers" in notes
        assert "submodule 'elsewhere' not shipped: the dispatcher does not fetch from host 'evil.example'" in notes
        assert "submodule 'lib' at vendor/lib" in notes
        assert not (root / "vendor/etc").exists() or not any((root / "vendor/etc").iterdir())
        assert not (tmp_path.parent / "x").exists()
        if clone.git:
            assert git(root / "vendor/lib", "log", "-1", "--format=%H") == first
            assert git(root, "status", "--porcelain") == ""
    assert {p.split("/")[2] for p in served.seen if p.startswith("/org/")} == {"app.git", "lib.git"}
    assert not Path("/tmp/pwned").exists()


def test_gitmodules_cannot_include_a_file_of_the_dispatcher(tmp_path, served):
    # git config --blob follows include.path unless told not to: a .gitmodules naming a
    # file on the dispatcher's disk would have it read (and its values echoed in notes).
    planted = tmp_path / "planted.conf"
    planted.write_text('[submodule "leak"]\n\tpath = vendor/lib\n\turl = ../lib-from-dispatcher-file.git\n')
    lib, first = make_git_repo(str(tmp_path / "lib"), {"lib.txt": "lib\n"})
    app, _ = make_git_repo(str(tmp_path / "app"), {"README.md": "# app\n"})
    commit = with_gitlink(app, "vendor/lib", first, f"[include]\n\tpath = {planted}\n")
    url = publish(served, app, "org/app.git")
    prepared = workspaces(tmp_path).prepare(url, commit, Clone(submodules=True), [f"127.0.0.1:{served.port}"])
    notes = "\n".join(prepared.notes)
    assert "leak" not in notes and "lib-from-dispatcher-file" not in notes
    assert "a gitlink without a .gitmodules entry" in notes


def test_a_private_repository_and_its_private_submodule_ship_without_their_token(tmp_path):
    # Both fetched with the configured token (the submodule by the same rules as any
    # repository); the workspace holds neither the token nor any spelling of it.
    import base64

    from narwhal.config.credentials import GitCredential
    from testbed import PrivateGitServer

    secret = "tok-clone-private-9f1e2d"
    header = "Basic " + base64.b64encode(f"oauth2:{secret}".encode()).decode()
    lib, first = make_git_repo(str(tmp_path / "lib"), {"lib.txt": "private lib\n"})
    app, _ = make_git_repo(str(tmp_path / "app"), {"README.md": "# app\n"})
    commit = with_gitlink(app, "vendor/lib", first, '[submodule "lib"]\n\tpath = vendor/lib\n\turl = ../lib.git\n')
    root = tmp_path / "served"
    for name, source in (("app.git", app), ("lib.git", lib)):
        subprocess.run(["git", "clone", "-q", "--bare", source, str(root / "team" / name)], env=ENV, check=True)
    server = PrivateGitServer(str(root), header).start()
    try:
        credential = GitCredential("token", "GIT_TOKEN", secret, "repos[0]", username="oauth2")
        mirror = Mirror(tmp_path / "mirrors", credentials=lambda repo: credential)
        ws = Workspaces(mirror, tmp_path / "workspaces", lambda: Settings())
        prepared = ws.prepare(server.repo_url("team/app.git"), commit, Clone(git=True, submodules=True),
                              [f"127.0.0.1:{server.port}"])
    finally:
        server.stop()
    data = prepared.path.read_bytes()
    ws_root = unpack(data, tmp_path / "ws")
    assert (ws_root / "vendor/lib/lib.txt").read_text() == "private lib\n"
    assert git(ws_root / "vendor/lib", "config", "remote.origin.url") == server.repo_url("team/lib.git")
    spellings = [secret.encode(), base64.b64encode(secret.encode()), header.split()[1].encode()]
    for path in [*(tmp_path / "workspaces").rglob("*"), *(tmp_path / "ws").rglob("*")]:
        if path.is_file():
            content = path.read_bytes()
            assert not any(s in content for s in spellings), path
