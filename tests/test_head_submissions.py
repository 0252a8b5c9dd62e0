"""Submitting a branch (or tag) without a commit: the dispatcher looks its head up with a fetch,
in a fetch slot like any fetch (``Fetches.head``), and builds that commit.

A real Dispatcher that is never started and real git repositories; a slow server is a
``Mirror.head`` that waits for the test to let it go.
"""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from narwhal.cli import main as cli
from narwhal.cli.gitrepo import GIT_ENV, add_commit, make_git_repo
from narwhal.config.loader import load_config
from narwhal.dispatch.dispatcher import Busy, Dispatcher, Resolving
from narwhal.errors import BadRequest, SourceError, Unprocessable

INVENTORY = "runners:\n  - name: local\n    transport: local\n"
PIPELINES = {
    "ci.yaml": "repo: '*'\nimage: narwhal-test/busybox:latest\nsteps: [{name: hello, run: echo hello}]\n",
    "release.yaml": ("repo: '*'\nbranches: [release/*]\nimage: narwhal-test/busybox:latest\n"
                     "steps: [{name: ship, run: echo ship}]\n"),
}


@pytest.fixture
def dispatcher(tmp_path: Path) -> Iterator[Dispatcher]:
    config = tmp_path / "config"
    (config / "pipelines").mkdir(parents=True)
    (config / "inventory.yaml").write_text(INVENTORY + f"settings:\n  local_roots: [{str(tmp_path)!r}]\n")
    for name, text in PIPELINES.items():
        (config / "pipelines" / name).write_text(text)
    d = Dispatcher(load_config(config), tmp_path / "state")
    yield d
    d.stop()


def limits(d: Dispatcher, **changes: object) -> None:
    d.config = dataclasses.replace(d.config, settings=dataclasses.replace(d.config.settings, **changes))


class SlowHeads:
    """Mirror.head that waits until ``release`` is set; counts the lookups."""

    def __init__(self, d: Dispatcher, monkeypatch: pytest.MonkeyPatch):
        self.release = threading.Event()
        self.calls: list[tuple[str, str]] = []
        real: Callable[[str, str], str] = d.mirror.head

        def head(repo: str, name: str) -> str:
            self.calls.append((repo, name))
            if not self.release.wait(10):
                raise SourceError("test: never released")
            return real(repo, name)

        monkeypatch.setattr(d.mirror, "head", head)


def wait_until(condition: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_the_head_is_built_and_named(dispatcher, tmp_path):
    path, first = make_git_repo(str(tmp_path / "app"))
    commit, created = dispatcher.submit_head(path, "main")
    assert commit == first and [(j.pipeline, j.commit, j.branch, j.event, new) for j, new in created] == [
        ("ci", first, "main", "api", True)]
    newer = add_commit(path, {"x": "x"})
    subprocess.run(["git", "branch", "release/2"], cwd=path, env=GIT_ENV, check=True)
    commit, created = dispatcher.submit_head(path, "release/2")
    assert commit == newer
    assert sorted(j.pipeline for j, _ in created) == ["ci", "release"]  # branches: matches the name given


def test_a_late_lookup_queues_the_jobs_at_the_head_it_found(dispatcher, tmp_path, monkeypatch):
    limits(dispatcher, fetch_wait=0.05)
    path, first = make_git_repo(str(tmp_path / "app"))
    slow = SlowHeads(dispatcher, monkeypatch)
    with pytest.raises(Resolving, match="the jobs are queued when the head of 'main' is known"):
        dispatcher.submit_head(path, "main")
    with pytest.raises(Resolving):  # a second submission joins the lookup running
        dispatcher.submit_head(path, "main")
    assert slow.calls == [(path, "main")]
    slow.release.set()
    wait_until(lambda: dispatcher.jobs(None, path, 10))
    wait_until(lambda: not dispatcher.fetches.running())
    assert [(j["commit"], j["branch"], j["status"]) for j in dispatcher.jobs(None, path, 10)] == [
        (first, "main", "queued")]


def test_a_head_lookup_takes_a_fetch_slot(dispatcher, tmp_path, monkeypatch):
    limits(dispatcher, fetch_wait=0.05, max_fetches_per_host=1, max_fetches=2)
    a, _ = make_git_repo(str(tmp_path / "a"))
    b, b_head = make_git_repo(str(tmp_path / "b"))
    slow = SlowHeads(dispatcher, monkeypatch)
    with pytest.raises(Resolving):
        dispatcher.submit_head(a, "main")
    # The one slot for local paths is the lookup's: a commit fetch from there waits its turn,
    with pytest.raises(Busy, match="max_fetches_per_host"):
        dispatcher.submit(b, b_head, "main")
    # and so does another lookup.
    with pytest.raises(Busy, match="max_fetches_per_host"):
        dispatcher.submit_head(b, "main")
    limits(dispatcher, max_fetches=1, max_fetches_per_host=5)
    with pytest.raises(Busy, match=r"\(max_fetches\)"):
        dispatcher.submit_head(b, "main")
    slow.release.set()
    wait_until(lambda: not dispatcher.fetches.running())
    limits(dispatcher, fetch_wait=30)  # a real fetch now, however busy the machine
    assert dispatcher.submit_head(b, "main")[0] == b_head


def test_a_failed_late_lookup_is_told_to_the_next_submission(dispatcher, tmp_path, monkeypatch):
    limits(dispatcher, fetch_wait=0.05)
    path, _ = make_git_repo(str(tmp_path / "app"))
    slow = SlowHeads(dispatcher, monkeypatch)
    with pytest.raises(Resolving):
        dispatcher.submit_head(path, "no-such-branch")
    slow.release.set()
    wait_until(lambda: not dispatcher.fetches.running())
    with pytest.raises(SourceError, match="no branch or tag 'no-such-branch'"):
        dispatcher.submit_head(path, "no-such-branch")
    assert dispatcher.jobs(None, path, 10) == []


def test_what_is_refused_is_refused_before_any_fetch(dispatcher, tmp_path, monkeypatch):
    path, _ = make_git_repo(str(tmp_path / "app"))
    slow = SlowHeads(dispatcher, monkeypatch)
    slow.release.set()
    with pytest.raises(BadRequest, match="commit: required unless a branch"):
        dispatcher.submit_head(path, None)
    with pytest.raises(BadRequest, match="invalid branch"):
        dispatcher.submit_head(path, "-x")
    with pytest.raises(BadRequest, match="outside the allowed local roots"):
        dispatcher.submit_head("/etc", "main")
    config = dispatcher.config
    dispatcher.config = dataclasses.replace(config, pipelines=[p for p in config.pipelines if p.name == "release"])
    with pytest.raises(Unprocessable, match="no pipeline matches repository .* on branch 'main'"):
        dispatcher.submit_head(path, "main")
    assert slow.calls == []


def test_the_cli_sends_a_branch_without_a_commit(monkeypatch, tmp_path, capsys):
    path, head = make_git_repo(str(tmp_path / "app"))
    sent: list[dict] = []

    class Client:
        def post(self, route: str, body: dict, timeout: float) -> dict:
            sent.append(body)
            return {"commit": {"repo": body["repo"], "commit": head, "branch": body["branch"]},
                    "jobs": [{"id": 7, "pipeline": "ci", "status": "queued", "url": "/jobs/7"}]}

    from narwhal.cli.commands import submit as submit_command

    monkeypatch.setattr(submit_command, "make_client", lambda args: Client())
    monkeypatch.chdir(path)
    assert cli.main(["submit", ".", "--branch", "main"]) == 0
    assert sent == [{"repo": path, "branch": "main"}]
    assert f"job 7 ci {path} {head[:10]} on main: queued" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["submit", ".", "--json"]) == 2  # neither a commit nor a branch
    assert "give a COMMIT, or --branch" in capsys.readouterr().err
