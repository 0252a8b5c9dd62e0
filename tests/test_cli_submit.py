"""What ``narwhal submit`` posts for a local repository: its top level, the commit, the branch."""

from __future__ import annotations

import os
import subprocess

import pytest

from narwhal.api.server import UsageError
from narwhal.cli.commands.submit import resolve_submission
from narwhal.cli.common import local_repo, repo_filter
from testbed import GIT_ENV


def git(path: str, *args: str) -> str:
    return subprocess.run(["git", "-C", path, *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout.strip()


@pytest.fixture
def repo(git_repo, monkeypatch):
    os.makedirs(os.path.join(git_repo.path, "src", "deep"))
    monkeypatch.chdir(os.path.join(git_repo.path, "src", "deep"))
    return git_repo


def test_dot_in_a_subdirectory_is_the_top_level(repo):
    top = os.path.realpath(repo.path)
    assert local_repo(".") == top and repo_filter(".") == top
    assert resolve_submission(".", "HEAD") == (top, repo.commit, "main")


def test_the_branch_comes_from_the_ref_or_the_checkout(repo):
    top = os.path.realpath(repo.path)
    first = repo.commit
    git(top, "checkout", "-q", "-b", "feature/x")
    second = repo.add_commit({"f.txt": "1"})
    assert resolve_submission(".", "main") == (top, first, "main")
    assert resolve_submission(".", "HEAD") == (top, second, "feature/x")
    assert resolve_submission(".", second[:8]) == (top, second, "feature/x")  # the commit checked out
    assert resolve_submission(".", first) == (top, first, None)  # another commit: no guess
    assert resolve_submission(".", "HEAD", "release") == (top, second, "release")  # --branch wins
    git(top, "tag", "v1", first)
    assert resolve_submission(".", "v1") == (top, first, None)
    git(top, "update-ref", "refs/remotes/origin/main", first)
    assert resolve_submission(".", "origin/main") == (top, first, "main")
    git(top, "checkout", "-q", "--detach")
    assert resolve_submission(".", "HEAD") == (top, second, None)


def test_urls_and_bad_refs(repo, tmp_path):
    url = "https://git.example.com/x.git"
    assert resolve_submission(url, "a" * 40) == (url, "a" * 40, None)
    assert repo_filter(url) == url
    with pytest.raises(UsageError, match="'nope' is not a commit"):
        resolve_submission(".", "nope")
    with pytest.raises(UsageError, match="expected a commit id or ref"):
        resolve_submission(".", "--upload-pack=x")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UsageError, match="is not a git repository"):
        resolve_submission(str(plain), "HEAD")
