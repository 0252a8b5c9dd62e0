"""``narwhal submit``: a commit to build, and following its jobs until they end."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from typing import Any

from rich.console import Console
from rich.live import Live

from narwhal.cli import report
from narwhal.cli.client import SUBMIT_TIMEOUT, Client
from narwhal.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    FINAL,
    POLL_INTERVAL,
    UsageError,
    add_client_options,
    add_command,
    is_plain,
    make_client,
    make_console,
    print_json,
)
from narwhal.errors import NarwhalError
from narwhal.job import COMMIT_RE

EPILOG = """\
examples:
  narwhal submit . HEAD --wait                    # a local repository: refs and short ids are resolved
  narwhal submit /src/app v1.2 --branch release
  narwhal submit https://git.example.com/app.git 4f0c...(40 hex) --branch main
exit status with --wait: 0 every job passed, 1 one did not, 2 usage or connection error
"""


def register(commands: Any) -> None:
    submit = add_command(commands, "submit", "submit a commit: one job per matching pipeline", cmd_submit,
                         epilog=EPILOG)
    submit.add_argument("repo", metavar="REPO", help="repository URL or path (a local directory is made absolute)")
    submit.add_argument("commit", metavar="COMMIT", help="40-hex commit id; a ref or short id in a local repository")
    submit.add_argument("--branch", metavar="B", default=None, help="branch name (pipelines may match on it)")
    submit.add_argument("--wait", action="store_true", help="follow the jobs live until they end")
    add_client_options(submit)


def resolve_submission(repo: str, commit: str) -> tuple[str, str]:
    """A local directory becomes absolute; in a local git repository COMMIT may be any revision."""
    if commit.startswith("-"):
        raise UsageError(f"COMMIT: expected a commit id or ref, got {commit!r}")
    expanded = os.path.expanduser(repo)
    if not os.path.isdir(expanded):
        return repo, commit
    repo = os.path.abspath(expanded)
    try:
        done = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", "--end-of-options",
                               f"{commit}^{{commit}}"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise UsageError("git is not installed: cannot resolve COMMIT in a local repository") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"git rev-parse in {repo} did not answer within 60 s") from None
    sha = done.stdout.strip()
    if done.returncode != 0 or not COMMIT_RE.fullmatch(sha):
        if subprocess.run(["git", "-C", repo, "rev-parse", "--git-dir"], capture_output=True,
                          stdin=subprocess.DEVNULL).returncode != 0:
            raise UsageError(f"{repo} is not a git repository")
        raise UsageError(f"{commit!r} is not a commit in {repo}")
    return repo, sha


def cmd_submit(args: argparse.Namespace) -> int:
    repo, commit = resolve_submission(args.repo, args.commit)
    client = make_client(args)
    body = {"repo": repo, "commit": commit}
    if args.branch:
        body["branch"] = args.branch
    answer = client.post("/commit", body, timeout=SUBMIT_TIMEOUT)
    ids = [j["id"] for j in answer.get("jobs", [])]
    if args.json:
        if args.wait:
            answer["jobs"] = wait_jobs_quietly(client, ids)
            print_json(answer)
            return EXIT_OK if all(j["status"] == "passed" for j in answer["jobs"]) else EXIT_FAILED
        print_json(answer)
        return EXIT_OK
    console = make_console()
    for j in answer.get("jobs", []):
        console.print(report.submitted_line(j, repo, commit))
    if not args.wait:
        return EXIT_OK
    jobs = follow_jobs(client, ids, console)
    return EXIT_OK if all(j.get("status") == "passed" for j in jobs) else EXIT_FAILED


def wait_jobs_quietly(client: Client, ids: list[int]) -> list[dict]:
    jobs = {i: client.get(f"/jobs/{i}") for i in ids}
    while any(j.get("status") not in FINAL for j in jobs.values()):
        time.sleep(POLL_INTERVAL)
        for i, j in jobs.items():
            if j.get("status") not in FINAL:
                jobs[i] = client.get(f"/jobs/{i}")
    return [jobs[i] for i in ids]


def follow_jobs(client: Client, ids: list[int], console: Console) -> list[dict]:
    """Watch jobs until every one ends: a live view on a terminal, one line per event otherwise."""
    jobs = {i: client.get(f"/jobs/{i}") for i in ids}
    plain = is_plain(console)
    events = report.JobEvents()

    def poll() -> None:
        for i, j in jobs.items():
            if j.get("status") not in FINAL:
                jobs[i] = client.get(f"/jobs/{i}")

    def done() -> bool:
        return all(j.get("status") in FINAL for j in jobs.values())

    if plain:
        while True:
            for i in ids:
                for line in events.changes(jobs[i]):
                    console.print(line, soft_wrap=True)
            if done():
                break
            time.sleep(POLL_INTERVAL)
            poll()
        for i in ids:
            console.print(report.job_panel(jobs[i], plain=True))
    else:
        with Live(report.LiveJobs(jobs, ids, plain=plain), console=console, refresh_per_second=4, transient=False):
            while not done():
                time.sleep(POLL_INTERVAL)
                poll()
    for i in ids:
        console.print(report.result_line(jobs[i]))
        if jobs[i].get("status") in ("failed", "error"):
            print_log_tail(client, i, console)
    return [jobs[i] for i in ids]


def print_log_tail(client: Client, job: int, console: Console, lines: int = 15) -> None:
    try:
        text = client.log_text(job)
    except NarwhalError:
        return
    tail = report.log_tail(job, text, lines)
    if tail is not None:
        heading, lines_ = tail
        console.print(heading)
        for line in lines_:
            console.print(line, soft_wrap=True)
