"""Mirror.head (a branch or tag's commit on the server now) and Mirror.changed_files (what a push
or pull request changes), on real git repositories."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from narwhal.errors import SourceError
from narwhal.execution import source
from narwhal.execution.source import Mirror
from testbed import GIT_ENV


def git(repo: str, *args: str) -> str:
    done = subprocess.run(["git", "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args], cwd=repo,
                          env={**os.environ, **GIT_ENV}, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def mirror(tmp_path) -> Mirror:
    m = Mirror(tmp_path / "cache")
    yield m
    m.close()


# --- head -----------------------------------------------------------------------------------


def test_head_of_a_branch_follows_the_server(git_repo, mirror):
    assert mirror.head(git_repo.path, "main") == git_repo.commit
    newer = git_repo.add_commit({"new.txt": "new\n"})
    assert mirror.head(git_repo.path, "main") == newer  # fetched again: not the mirror's old idea
    assert mirror.present(git_repo.path, newer)


def test_head_of_a_branch_with_slashes(git_repo, mirror):
    git(git_repo.path, "checkout", "-q", "-b", "feature/x")
    commit = git_repo.add_commit({"f.txt": "f\n"})
    assert mirror.head(git_repo.path, "feature/x") == commit
    assert mirror.head(git_repo.path, "main") != commit


def test_tags_lightweight_and_annotated_are_peeled_to_the_commit(git_repo, mirror):
    git(git_repo.path, "tag", "v1")
    git(git_repo.path, "tag", "-a", "-m", "release", "v2")
    git(git_repo.path, "tag", "-a", "-m", "tag of a tag", "v3", "v2")
    for tag in ("v1", "v2", "v3"):
        assert mirror.head(git_repo.path, tag) == git_repo.commit


def test_a_branch_wins_over_a_tag_of_the_same_name(git_repo, mirror):
    git(git_repo.path, "tag", "same")
    git(git_repo.path, "branch", "same")
    git(git_repo.path, "checkout", "-q", "same")
    moved = git_repo.add_commit({"b.txt": "b\n"})
    assert mirror.head(git_repo.path, "same") == moved


def test_a_name_is_exact_not_a_prefix_or_a_guess(git_repo, mirror):
    git(git_repo.path, "branch", "release/1")
    for name in ("release", "heads/main", "refs/heads/main", "ain", "HEAD"):
        with pytest.raises(SourceError, match="no branch or tag"):
            mirror.head(git_repo.path, name)


def test_a_tag_of_a_tree_is_not_a_commit(git_repo, mirror):
    tree = git(git_repo.path, "rev-parse", "HEAD^{tree}")
    git(git_repo.path, "tag", "tree-tag", tree)
    with pytest.raises(SourceError, match="does not point to a commit"):
        mirror.head(git_repo.path, "tree-tag")


def test_a_deleted_branch_is_gone_after_the_fetch(git_repo, mirror):
    git(git_repo.path, "branch", "short-lived")
    assert mirror.head(git_repo.path, "short-lived") == git_repo.commit
    git(git_repo.path, "branch", "-D", "short-lived")
    with pytest.raises(SourceError, match="no branch or tag 'short-lived'"):
        mirror.head(git_repo.path, "short-lived")


def test_a_failed_fetch_is_an_error_not_the_old_head(git_repo, tmp_path, mirror):
    assert mirror.head(git_repo.path, "main") == git_repo.commit
    os.rename(git_repo.path, str(tmp_path / "moved"))
    with pytest.raises(SourceError, match="cannot fetch"):
        mirror.head(git_repo.path, "main")


@pytest.mark.parametrize("name", ["--upload-pack=touch /tmp/pwned", "-x", "main\n", "a..b", "main^", "main~1",
                                  "@{-1}", "a:b", "HEAD@{1}", "x.lock", "", "ma in", "*"])
def test_unsafe_names_are_refused_before_git_runs(git_repo, mirror, tmp_path, name):
    with pytest.raises(SourceError, match="invalid branch or tag"):
        mirror.head(git_repo.path, name)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing was cloned


def test_a_name_never_reaches_git_as_an_option(git_repo, mirror, monkeypatch):
    seen: list[list[str]] = []
    real = source._git_read

    def spy(args, *rest):
        seen.append(args)
        return real(args, *rest)

    monkeypatch.setattr(source, "_git_read", spy)
    git(git_repo.path, "branch", "+x")
    assert mirror.head(git_repo.path, "+x") == git_repo.commit
    assert seen and all(not a.startswith("-") or a.startswith(("--git-dir", "--format", "--verify", "--quiet",
                                                                "--end-of-options"))
                        for args in seen for a in args)
    assert any("refs/heads/+x" in args for args in seen)


def test_head_fetch_is_bounded_by_the_fetch_timeout(tmp_path):
    """A git server that never answers: the clone is stopped after the mirror's timeout."""
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        m = Mirror(tmp_path / "cache", timeout=1.5)
        started = time.monotonic()
        with pytest.raises(SourceError, match="within 1.5s"):
            m.head(f"http://127.0.0.1:{port}/silent.git", "main")
        assert time.monotonic() - started < 10
    finally:
        listener.close()


# --- changed_files ----------------------------------------------------------------------------


def test_a_push_lists_what_changed_between_before_and_after(git_repo, mirror):
    before = git_repo.commit
    git_repo.add_commit({"src/a.py": "a\n"})
    after = git_repo.add_commit({"docs/b.md": "b\n", "README.md": None})
    mirror.resolve(git_repo.path, after)
    assert sorted(mirror.changed_files(git_repo.path, after, None, before)) == ["README.md", "docs/b.md", "src/a.py"]


def test_a_pull_request_lists_its_own_changes_from_the_merge_base(git_repo, mirror):
    git(git_repo.path, "checkout", "-q", "-b", "topic")
    topic = git_repo.add_commit({"topic.txt": "t\n"})
    git(git_repo.path, "checkout", "-q", "main")
    git_repo.add_commit({"main-only.txt": "m\n"})  # the base moved on: not the pull request's change
    mirror.resolve(git_repo.path, topic)
    assert mirror.changed_files(git_repo.path, topic, "main") == ["topic.txt"]


def test_renames_count_as_both_paths(git_repo, mirror):
    before = git_repo.commit
    after = git_repo.add_commit({"build.sh": None, "scripts/build.sh": "#!/bin/sh\necho building\n"}, "move")
    assert "rename build.sh" in git(git_repo.path, "show", "--stat", "-M", "--summary", after)
    mirror.resolve(git_repo.path, after)
    assert sorted(mirror.changed_files(git_repo.path, after, None, before)) == ["build.sh", "scripts/build.sh"]


def test_odd_paths_come_through_exactly(git_repo, mirror):
    before = git_repo.commit
    names = ["with space.txt", "quote\"d.txt", "new\nline.txt", "tab\there.txt", "ünïcode/ß.txt", "-dash.txt"]
    after = git_repo.add_commit({n: "x\n" for n in names})
    mirror.resolve(git_repo.path, after)
    assert sorted(mirror.changed_files(git_repo.path, after, None, before)) == sorted(names)


def test_unknown_is_none(git_repo, mirror):
    commit = git_repo.commit
    assert mirror.changed_files(git_repo.path, commit, "main") is None  # no mirror yet: nothing fetched
    mirror.resolve(git_repo.path, commit)
    assert mirror.changed_files(git_repo.path, commit, None) is None  # neither before nor a base
    assert mirror.changed_files(git_repo.path, commit, None, "0" * 40) is None  # a new branch
    assert mirror.changed_files(git_repo.path, commit, None, "e" * 40) is None  # before not in the mirror
    assert mirror.changed_files(git_repo.path, commit, "no-such-branch") is None
    assert mirror.changed_files(git_repo.path, "f" * 40, "main") is None  # commit not in the mirror


def test_a_new_branch_falls_back_to_its_base(git_repo, mirror):
    git(git_repo.path, "checkout", "-q", "-b", "fresh")
    commit = git_repo.add_commit({"fresh.txt": "f\n"})
    mirror.resolve(git_repo.path, commit)
    assert mirror.changed_files(git_repo.path, commit, "main", "0" * 40) == ["fresh.txt"]


def test_a_merged_pull_request_changes_nothing(git_repo, mirror):
    mirror.resolve(git_repo.path, git_repo.commit)
    assert mirror.changed_files(git_repo.path, git_repo.commit, "main") == []


def test_too_many_paths_is_unknown(git_repo, mirror, monkeypatch):
    before = git_repo.commit
    after = git_repo.add_commit({f"many/{i}.txt": "x" for i in range(12)})
    mirror.resolve(git_repo.path, after)
    monkeypatch.setattr(source, "MAX_CHANGED", 11)
    assert mirror.changed_files(git_repo.path, after, None, before) is None
    monkeypatch.setattr(source, "MAX_CHANGED", 12)
    assert len(mirror.changed_files(git_repo.path, after, None, before)) == 12
    monkeypatch.setattr(source, "MAX_CHANGED_BYTES", 100)  # the output is cut short: unknown too
    assert mirror.changed_files(git_repo.path, after, None, before) is None


def test_a_slow_diff_is_unknown(git_repo, mirror, monkeypatch):
    before = git_repo.commit
    after = git_repo.add_commit({"a.txt": "a"})
    mirror.resolve(git_repo.path, after)
    monkeypatch.setattr(source, "LOCAL_TIMEOUT", 0.0)
    assert mirror.changed_files(git_repo.path, after, None, before) is None


@pytest.mark.parametrize("kwargs", [{"commit": "HEAD"}, {"commit": "a" * 40, "before": "main"},
                                    {"commit": "a" * 40, "base_branch": "--output=/tmp/x"}])
def test_bad_arguments_are_refused(git_repo, mirror, kwargs):
    args = {"base_branch": None, **kwargs}
    with pytest.raises(SourceError, match="invalid"):
        mirror.changed_files(git_repo.path, **args)


def test_git_read_kills_the_whole_process_group_past_its_time(tmp_path):
    import time

    canary = tmp_path / f"late-{uuid.uuid4().hex}"
    with pytest.raises(SourceError, match="within 0.3s"):
        source._git_read(["-c", f"alias.slow=!sleep 0.8; touch {canary}", "slow"], "slow", 0.3, 1000)
    time.sleep(1.2)
    assert not canary.exists()  # the shell git started went too


# --- over HTTP ---------------------------------------------------------------------------------


def test_head_and_changed_files_over_plain_http(git_repo, tmp_path, mirror):
    """A repository served as static files (git's dumb HTTP protocol), as in the end-to-end tests."""
    from testbed import GitHttpServer

    with GitHttpServer(tmp_path / "served") as server:
        url = server.publish(git_repo.path, "app.git")
        assert mirror.head(url, "main") == git_repo.commit
        before = git_repo.commit
        git(git_repo.path, "tag", "-a", "-m", "one", "v1")
        after = git_repo.add_commit({"lib/x.py": "x\n"})
        server.publish(git_repo.path, "app.git")
        assert mirror.head(url, "main") == after
        assert mirror.head(url, "v1") == before
        assert mirror.changed_files(url, after, None, before) == ["lib/x.py"]
        assert any(path.startswith("/app.git/info/refs") for path in server.seen)


# --- contains: is a commit on a branch (attack pass: a branch named with a commit) ------------


def test_attack_contains_asks_the_server_when_the_mirror_says_no(git_repo, mirror):
    """The mirror's idea of a branch may be old: a commit merged into main after the last fetch
    is on main once the server is asked again; a commit on another branch only is not."""
    first = git_repo.commit
    git(git_repo.path, "checkout", "-q", "-b", "feature")
    feature = git_repo.add_commit({"f.txt": "f\n"})
    git(git_repo.path, "checkout", "-q", "main")
    assert mirror.contains(git_repo.path, "main", first)
    assert mirror.contains(git_repo.path, "feature", first)
    assert not mirror.contains(git_repo.path, "main", feature)  # in the mirror, on feature only
    git(git_repo.path, "merge", "-q", "--ff-only", "feature")
    assert mirror.contains(git_repo.path, "main", feature)  # fetched again
    git(git_repo.path, "tag", "v1", first)
    assert not mirror.contains(git_repo.path, "v1", first)  # a tag is no branch
    assert not mirror.contains(git_repo.path, "nowhere", feature)
