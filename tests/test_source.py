"""source.py on real git: mirrors, commit resolution, archive streams, hostile input."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import threading
import uuid

import pytest

from narwhal.errors import SourceError
from narwhal.execution.source import Mirror, validate_commit, validate_repo


async def collect(stream) -> bytes:
    return b"".join([chunk async for chunk in stream])


def tar_files(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_resolve_clones_a_mirror_named_by_hash(git_repo, tmp_path):
    mirror = Mirror(tmp_path / "cache")
    assert mirror.resolve(git_repo.path, git_repo.commit) == git_repo.commit
    path = mirror.path_for(git_repo.path)
    assert path.name == hashlib.sha256(git_repo.path.encode()).hexdigest()
    assert (path / "HEAD").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temp dirs left


def test_resolve_fetches_a_new_commit_on_demand(git_repo, tmp_path):
    mirror = Mirror(tmp_path / "cache")
    mirror.resolve(git_repo.path, git_repo.commit)
    newer = git_repo.add_commit({"new.txt": "new\n"})
    assert mirror.resolve(git_repo.path, newer) == newer
    assert tar_files(asyncio.run(collect(mirror.archive(git_repo.path, newer))))["new.txt"] == b"new\n"


def test_file_url_works(git_repo, tmp_path):
    mirror = Mirror(tmp_path / "cache")
    url = "file://" + git_repo.path
    assert mirror.resolve(url, git_repo.commit) == git_repo.commit


def test_unknown_commit(git_repo, tmp_path):
    with pytest.raises(SourceError, match=f"commit {'f' * 40} not found in"):
        Mirror(tmp_path / "cache").resolve(git_repo.path, "f" * 40)


def test_a_tree_id_is_not_a_commit(git_repo, tmp_path):
    import subprocess

    tree = subprocess.run(["git", "-C", git_repo.path, "rev-parse", "HEAD^{tree}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with pytest.raises(SourceError, match="not found"):
        Mirror(tmp_path / "cache").resolve(git_repo.path, tree)


@pytest.mark.parametrize("commit", ["HEAD", "main", "abc", "A" * 40, "g" * 40, "a" * 41,
                                    "-" + "a" * 39, "$(touch /tmp/pwned)", "a" * 40 + "\n", None])
def test_commit_must_be_40_hex(commit):
    with pytest.raises(SourceError, match="expected a 40-hex commit id"):
        validate_commit(commit)


@pytest.mark.parametrize("repo,message", [
    ("-uhelp", "must not start with '-'"),
    ("--upload-pack=touch /tmp/pwned", "must not start with '-'"),
    ("/tmp/repo\n--upload-pack=x", "control characters"),
    ("ext::sh -c touch% /tmp/pwned", "remote helpers"),
    ("fd::17", "remote helpers"),
    ("ftp://example.com/repo.git", "unsupported scheme"),
    ("ssh://-oProxyCommand=touch/x", "bad host name"),
    ("", "empty"),
])
def test_hostile_repos_are_refused(repo, message):
    with pytest.raises(SourceError, match=message):
        validate_repo(repo)


def test_shell_syntax_in_a_repo_is_inert(tmp_path):
    canary = f"/tmp/narwhal-canary-{uuid.uuid4().hex}"
    mirror = Mirror(tmp_path / "cache")
    for repo in (f"$(touch {canary})", f"/tmp; touch {canary}", f"`touch {canary}`"):
        with pytest.raises(SourceError, match="cannot clone|must be absolute"):
            mirror.resolve(repo, "a" * 40)
    assert not os.path.exists(canary)
    assert list((tmp_path / "cache").iterdir()) == []  # a failed clone leaves nothing behind


def test_archive_streams_the_tree_in_chunks(git_repo, tmp_path):
    big = "x" * 300_000
    commit = git_repo.add_commit({"big.txt": big})
    chunks = []

    async def main():
        async for chunk in Mirror(tmp_path / "cache").archive(git_repo.path, commit):
            chunks.append(chunk)

    asyncio.run(main())
    assert len(chunks) > 1
    files = tar_files(b"".join(chunks))
    assert files["big.txt"] == big.encode()
    assert files["README.md"] == b"# demo\n"


def test_archive_of_a_missing_commit_raises(git_repo, tmp_path):
    with pytest.raises(SourceError, match="not found"):
        asyncio.run(collect(Mirror(tmp_path / "cache").archive(git_repo.path, "e" * 40)))


def test_concurrent_resolve_from_threads_and_the_loop(git_repo, tmp_path):
    mirror = Mirror(tmp_path / "cache")
    commits = [git_repo.commit] + [git_repo.add_commit({f"f{i}.txt": str(i)}) for i in range(3)]
    errors: list[BaseException] = []

    def resolve_all():
        try:
            for commit in commits:
                mirror.resolve(git_repo.path, commit)
        except BaseException as exc:  # noqa: BLE001 - reported below, from the main thread
            errors.append(exc)

    threads = [threading.Thread(target=resolve_all) for _ in range(4)]
    for thread in threads:
        thread.start()

    async def archives():
        return await asyncio.gather(*[collect(mirror.archive(git_repo.path, c)) for c in commits])

    tars = asyncio.run(archives())
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert "f2.txt" in tar_files(tars[-1])


def test_commit_checks_share_one_git_process_and_survive_its_death(git_repo, tmp_path):
    mirror = Mirror(tmp_path / "mirrors")
    mirror.resolve(git_repo.path, git_repo.commit)
    checker = mirror._checkers[mirror.path_for(git_repo.path)]
    first = checker.proc.pid
    second_commit = git_repo.add_commit({"b.txt": "b"})
    mirror.resolve(git_repo.path, second_commit)  # fetched, then found by a fresh checker
    checker = mirror._checkers[mirror.path_for(git_repo.path)]
    checker.proc.kill()
    checker.proc.wait()
    assert checker._process().pid != first
    mirror._known.clear()
    assert mirror.resolve(git_repo.path, second_commit) == second_commit
    assert not mirror._has_commit(mirror.path_for(git_repo.path), "f" * 40)
    mirror.close()
