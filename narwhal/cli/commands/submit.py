"""``narwhal submit``: a commit to build, and following its jobs until they end."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.live import Live

from narwhal.cli import report
from narwhal.cli.client import SUBMIT_TIMEOUT, Client
from narwhal.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    FINAL,
    POLL_INTERVAL,
    UsageError,
    add_client_options,
    add_command,
    git,
    is_plain,
    local_repo,
    make_client,
    make_console,
    print_json,
)
from narwhal.errors import NarwhalError
from narwhal.job import COMMIT_RE

EPILOG = """\
examples:
  narwhal submit . HEAD --wait                    # this checkout, on its branch; refs and short ids resolved
  narwhal submit /src/app v1.2 --branch release
  narwhal submit https://git.example.com/app.git 4f0c...(40 hex) --branch main
  narwhal submit https://git.example.com/app.git --branch main   # no COMMIT: the branch's head now
  narwhal submit . --branch v1.2 --wait           # a branch or tag; the dispatcher looks up its head
Resubmitting a commit shows the jobs an earlier submission made as such; --wait follows
this submission's own jobs and those still under way, and answers for them only.
exit status with --wait: 0 every job passed (or was skipped by its conditions), 1 one did
not, 2 usage or connection error, 130 Ctrl-C (the jobs go on: narwhal logs ID -f)
"""


def register(commands: Any) -> None:
    submit = add_command(commands, "submit", "submit a commit: one job per matching pipeline", cmd_submit,
                         epilog=EPILOG)
    submit.add_argument("repo", metavar="REPO",
                        help="repository URL or path (a local directory means its git top level: `.` works "
                             "in a subdirectory)")
    submit.add_argument("commit", metavar="COMMIT", nargs="?", default=None,
                        help="40-hex commit id; a ref or short id in a local repository; "
                             "omitted: the head of --branch, looked up by the dispatcher")
    submit.add_argument("--branch", metavar="B", default=None,
                        help="branch name (pipelines may match on it); in a local repository it defaults to "
                             "the branch COMMIT names, or the checked-out one for HEAD")
    submit.add_argument("--wait", action="store_true", help="follow the jobs live until they end")
    add_client_options(submit)


def resolve_submission(repo: str, commit: str, branch: str | None = None) -> tuple[str, str, str | None]:
    """(repo, commit, branch) to post. A local directory is its repository's top level, COMMIT
    there may be any revision, and without ``--branch`` the branch is the one COMMIT names
    (``main``, ``origin/main``) or, for ``HEAD`` or the commit checked out, the checkout's."""
    if commit.startswith("-"):
        raise UsageError(f"COMMIT: expected a commit id or ref, got {commit!r}")
    top = local_repo(repo)
    if top is None:
        return repo, commit, branch
    done = git(top, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{commit}^{{commit}}")
    sha = done.stdout.strip()
    if done.returncode != 0 or not COMMIT_RE.fullmatch(sha):
        if git(top, "rev-parse", "--git-dir").returncode != 0:
            raise UsageError(f"{top} is not a git repository")
        raise UsageError(f"{commit!r} is not a commit in {top}")
    return top, sha, branch if branch is not None else infer_branch(top, commit, sha)


def infer_branch(top: str, ref: str, sha: str) -> str | None:
    """The branch REF names in the repository at TOP, or the checked-out branch when REF is
    ``HEAD`` or the commit checked out; None for a tag, a detached HEAD or another commit."""
    def branch_of(name: str) -> str | None:
        full = git(top, "rev-parse", "--symbolic-full-name", name).stdout.strip()
        if full.startswith("refs/heads/"):
            return full.removeprefix("refs/heads/")
        if full.startswith("refs/remotes/") and full.count("/") >= 3 and not full.endswith("/HEAD"):
            return full.split("/", 3)[3]  # refs/remotes/origin/main: main
        return None

    named = branch_of(ref)
    if named is not None or ref == "HEAD":
        return named
    head = git(top, "rev-parse", "--verify", "--quiet", "HEAD").stdout.strip()
    return branch_of("HEAD") if head == sha else None


def cmd_submit(args: argparse.Namespace) -> int:
    if args.commit is None:
        if not args.branch:
            raise UsageError("give a COMMIT, or --branch B to build the head of branch (or tag) B")
        repo, commit, branch = (local_repo(args.repo) or args.repo), None, args.branch
        body = {"repo": repo, "branch": branch}
    else:
        repo, commit, branch = resolve_submission(args.repo, args.commit, args.branch)
        body = {"repo": repo, "commit": commit}
        if branch:
            body["branch"] = branch
    client = make_client(args)
    answer = client.post("/commit", body, timeout=SUBMIT_TIMEOUT)
    commit = commit or (answer.get("commit") or {}).get("commit") or "?"  # the head the dispatcher found
    jobs = answer.get("jobs", [])
    # What this submission asked for: the jobs it created, and earlier ones still under way.
    # A job an earlier submission made and that has ended is shown as such, not waited for
    # and not counted in the exit status (`narwhal retry ID` runs it again).
    ids = [j["id"] for j in jobs if j.get("created", True) or j.get("status") not in FINAL]
    if args.json:
        if args.wait:
            try:
                followed = {j["id"]: j for j in wait_jobs_quietly(client, ids)}
            except KeyboardInterrupt:
                for i in ids:
                    print(report.continues_line({"id": i}), file=sys.stderr)
                return EXIT_INTERRUPTED
            answer["jobs"] = [{**j, **followed.get(j["id"], {})} for j in jobs]
            print_json(answer)
            return exit_status(followed.values())
        print_json(answer)
        return EXIT_OK
    console = make_console()
    for j in jobs:
        console.print(report.submitted_line(j, repo, commit, branch))
    if not jobs and answer.get("status") == "resolving":
        console.print(report.resolving_line(answer))
    if not args.wait:
        return EXIT_OK
    if not ids:
        console.print(report.nothing_new_line(jobs))
        return EXIT_OK
    try:
        return exit_status(follow_jobs(client, ids, console))
    except FollowInterrupted:
        return EXIT_INTERRUPTED


def exit_status(jobs: Iterable[dict]) -> int:
    """0 when every job passed (or was skipped: its conditions said not to run), else 1."""
    return EXIT_OK if all(j.get("status") in ("passed", "skipped") for j in jobs) else EXIT_FAILED


def wait_jobs_quietly(client: Client, ids: list[int]) -> list[dict]:
    jobs = {i: client.get(f"/jobs/{i}") for i in ids}
    while any(j.get("status") not in FINAL for j in jobs.values()):
        time.sleep(POLL_INTERVAL)
        for i, j in jobs.items():
            if j.get("status") not in FINAL:
                jobs[i] = client.get(f"/jobs/{i}")
    return [jobs[i] for i in ids]


class FollowInterrupted(Exception):  # noqa: N818 - Ctrl-C while following, already told
    """Ctrl-C while following jobs: each unfinished one was named with how to follow it again."""


def follow_jobs(client: Client, ids: list[int], console: Console) -> list[dict]:
    """Watch jobs until every one ends: a live view on a terminal, one line per event otherwise.

    A job that ends is told at once (its result, and the tail of its log when it failed),
    not after the others. Ctrl-C leaves the jobs running, says how to follow each one on,
    and raises FollowInterrupted."""
    jobs = {i: client.get(f"/jobs/{i}") for i in ids}
    plain = is_plain(console)
    events = report.JobEvents()
    pending = list(ids)  # not told yet; the live view shows these

    def poll() -> None:
        for i, j in jobs.items():
            if j.get("status") not in FINAL:
                jobs[i] = client.get(f"/jobs/{i}")

    def tell_finished() -> None:
        for i in [i for i in pending if jobs[i].get("status") in FINAL]:
            pending.remove(i)
            console.print(report.job_panel(jobs[i], plain=plain))
            console.print(report.result_line(jobs[i]))
            if jobs[i].get("status") in ("failed", "error"):
                print_log_tail(client, i, console)

    try:
        if plain:
            while True:
                for i in ids:
                    for line in events.changes(jobs[i]):
                        console.print(line, soft_wrap=True)
                tell_finished()
                if not pending:
                    break
                time.sleep(POLL_INTERVAL)
                poll()
        else:
            with Live(report.LiveJobs(jobs, pending, plain=plain), console=console, refresh_per_second=4,
                      transient=True):
                tell_finished()
                while pending:
                    time.sleep(POLL_INTERVAL)
                    poll()
                    tell_finished()
    except KeyboardInterrupt:
        for i in pending:
            console.print(report.continues_line(jobs[i]))
        raise FollowInterrupted from None
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
