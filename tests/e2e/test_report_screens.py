"""``narwhal report`` as a person sees it: on a pseudo-terminal of 80x24 and 160x50, against a
real dispatcher with a passed, a failed, a running and a queued job, two repositories and a
sick runner. The screens are checked line by line (and written to $NARWHAL_SCREENS, when set,
for people to read)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import testbed
from narwhal.api.server import free_port
from testbed.terminal import Screen, run_in_pty
from tests.e2e.cli import CLI, cli_env, run, run_json
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow
SIZES = [(80, 24), (160, 50)]


@pytest.fixture
def busy(dispatcher, git_repo, tmp_path):
    """A dispatcher in the middle of things: what the report is for."""
    other, _ = testbed.make_git_repo(str(tmp_path / "tools"), {"README.md": "tools\n"})
    d = dispatcher([{"name": "local", "transport": "local", "capacity": 1}], {
        "ci": simple_pipeline([{"name": "check", "run": 'test "$NARWHAL_BRANCH" != feature/login'}]),
        "slow": simple_pipeline([{"name": "build", "run": "echo building"},
                                 {"name": "integration", "run": "sleep 300"}],
                                repo=git_repo.path, branches=["main"]),
    })
    url = ["--url", d.url]
    feature = run_json("submit", git_repo.path, "HEAD", "--branch", "feature/login", *url)["jobs"]
    assert d.wait_job(feature[0]["id"])["status"] == "failed"
    git_repo.add_commit({"main.txt": "1"})
    main = {j["pipeline"]: j["id"] for j in run_json("submit", git_repo.path, "HEAD", *url)["jobs"]}
    d.wait_for(lambda: any(s["name"] == "integration" and s["status"] == "running"
                           for s in d.get(f"/jobs/{main['slow']}").json()["steps"]), what="the slow step")
    queued = run_json("submit", other, "HEAD", *url)["jobs"]
    assert run("runner", "add", "ssh-worker-unreachable", "--host", "127.0.0.1", "--port", str(free_port()),
               *url).returncode == 0
    d.wait_for(lambda: any(r["health"]["state"] == "unhealthy" for r in d.get("/runner").json()["runners"]),
               what="the unreachable runner found sick")
    yield d
    for job_id in [*main.values(), queued[0]["id"]]:
        d.post(f"/jobs/{job_id}/cancel")


def keep(name: str, lines: list[str]) -> None:
    folder = os.environ.get("NARWHAL_SCREENS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, name).write_text("\n".join(lines) + "\n")


def check_screen(lines: list[str], cols: int) -> str:
    """Every line within the width; the facts a person looks for, on the screen."""
    text = "\n".join(lines)
    assert all(len(line) <= cols for line in lines), text
    assert re.match(r"narwhal · updated \d\d:\d\d:\d\d · queue: 1 · runners: 1/2 healthy", lines[0]), text
    now = text[text.index("Now: the latest job"):text.index("Runners")]
    assert re.search(r"^repo +feature/login +ci +failed ", now, re.M), now
    assert re.search(r"^ +main +slow +running ", now, re.M), now  # the same repository: its name once
    assert "step integration" in now and "exit 1 in step check" in now
    assert "tools" in now and "queued" in now
    sick = next(line for line in lines if line.startswith("ssh-worker-unreachable "))  # its name whole
    assert "unhealthy" in sick and "cannot verify the host key" in sick
    assert "Queue" in text and "capacity" in text
    return text


@pytest.mark.parametrize("cols, rows", SIZES)
def test_report_watch_fills_the_screen_most_important_first(busy, cols, rows):
    session = run_in_pty([*CLI, "--url", busy.url, "report", "--watch"], cols, rows,
                         cli_env(TERM="xterm-256color"))
    try:
        session.wait_for(lambda out: out.count("· updated") >= 2)  # drawn, then drawn again
    finally:
        session.interrupt()
        code = session.finish()
    assert code == 0, session.text()[-2000:]
    screen: Screen = session.screen(cols, rows)
    lines = screen.alternate_seen
    assert lines is not None, session.text()[-2000:]
    keep(f"report-watch-{cols}x{rows}.txt", lines)
    assert len(lines) == rows and screen.wrapped == 0
    text = check_screen(lines, cols)
    assert "Traceback" not in session.text()
    if rows >= 50:  # room for everything: recent jobs and the totals too
        assert "Recent jobs" in text and "Repositories: all jobs" in text
    assert "\x1b[" in session.text()  # colour on a terminal


@pytest.mark.parametrize("cols, rows", SIZES)
def test_report_once_fits_the_width(busy, cols, rows):
    session = run_in_pty([*CLI, "--url", busy.url, "report"], cols, rows, cli_env(TERM="xterm-256color"))
    assert session.finish() == 0, session.text()[-2000:]
    screen = session.screen(cols, rows)
    lines = screen.transcript()
    keep(f"report-{cols}x{rows}.txt", lines)
    assert screen.wrapped == 0
    text = check_screen(lines, cols)
    order = [text.index(title) for title in ("Now: the latest job", "Runners", "Queue", "Recent jobs",
                                             "Repositories: all jobs")]
    assert order == sorted(order)
    assert not any(ch in text for ch in "╭╮╰╯│")
