"""``narwhal report`` (the whole picture, once or ``--watch``), and the ``secrets`` and ``forges`` lists."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rich.console import RenderableType
from rich.live import Live

from narwhal.cli import report
from narwhal.cli.client import ApiError, Client
from narwhal.cli.common import (
    EXIT_OK,
    WATCH_INTERVAL,
    add_client_options,
    add_command,
    is_plain,
    make_client,
    make_console,
    positive_int,
    print_json,
    repo_filter,
    with_iso_times,
)

REPORT_EPILOG = """\
examples:
  narwhal report                      # now, runners, queue, recent jobs, totals per repository
  narwhal report --repo . --limit 50  # `.`: the repository of the current directory
  narwhal report --watch              # the screen, redrawn every 2 s; Ctrl-C to leave
  narwhal report --json | jq '.latest[] | select(.status != "passed") | {repo, branch, pipeline, reason}'
Most important first: the latest job of each repository, branch and pipeline (the running
step, or why it failed, and how long ago), then the runners (why a sick one is sick), what
waits and why, forges, recent jobs and totals. Repositories are shown by the shortest
ending of their path that tells them apart; --json has the full names. Under 120 columns
the tables are narrower; --watch fits the window's height, in that order.
"""
FORGES_EPILOG = """\
examples:
  narwhal forges
  narwhal forges --json | jq '.forges[] | select(.failed > 0) | {name, last_error}'
A status is tried again while the forge is down or busy (up to status_deadline); one the
forge refuses (a wrong token, an unknown repository) is failed at once, with its answer.
"""


def register(commands: Any) -> None:
    report_ = add_command(commands, "report", "what is green and red now, runners, the queue and recent jobs",
                          cmd_report, epilog=REPORT_EPILOG)
    report_.add_argument("--repo", metavar="R", default=None, help="only this repository (`.`: this directory's)")
    report_.add_argument("--watch", action="store_true", help=f"refresh in place every {WATCH_INTERVAL:g} s")
    report_.add_argument("--limit", metavar="N", type=positive_int, default=20, help="recent jobs shown (default 20)")
    add_client_options(report_)

    secrets = add_command(commands, "secrets", "secrets: names, sources, scopes and users (never values)",
                          cmd_secrets)
    add_client_options(secrets)

    forges = add_command(commands, "forges", "forges and their commit statuses: pending, delivered, failed, "
                         "the last error", cmd_forges, epilog=FORGES_EPILOG)
    add_client_options(forges)


def gather_report(client: Client, repo: str | None, limit: int) -> dict:
    """Everything `narwhal report` shows, as plain data (the --json output)."""
    stats = client.get("/stats")
    if repo is not None:
        stats["repos"] = [r for r in stats.get("repos", []) if r.get("repo") == repo]
    runners = client.get("/runner")["runners"]
    forges = client.get("/forges")["forges"]
    nodes = dispatchers(client)
    latest = client.get("/jobs", latest=1, repo=repo, limit=100)["jobs"]
    jobs = client.get("/jobs", repo=repo, limit=limit)["jobs"]
    queue = []
    for j in client.get("/jobs", status="queued", repo=repo, limit=limit)["jobs"]:
        detail = job_detail(client, j["id"])
        if detail is not None and detail.get("status") == "queued":
            queue.append(detail)
    # The running step of each job that runs now, and why a queued one waits.
    details = {j["id"]: j for j in queue}
    for job in latest:
        if job.get("status") == "running":
            details[job["id"]] = job_detail(client, job["id"]) or job
        job.update(details.get(job["id"], {}))
    return {"updated_at": time.time(), "url": client.url, "latest": latest, "runners": runners,
            "queue": queue, "forges": forges, "jobs": jobs, "stats": stats, "nodes": nodes}


def dispatchers(client: Client) -> dict:
    """``GET /nodes``; a dispatcher from before nodes answers 404: none known."""
    try:
        return client.get("/nodes")
    except ApiError as exc:
        if exc.status == 404:
            return {"self": None, "nodes": []}
        raise


def job_detail(client: Client, job_id: int) -> dict | None:
    """``GET /jobs/ID`` (steps, and why it waits); None when it is gone meanwhile."""
    try:
        return client.get(f"/jobs/{job_id}")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def cmd_report(args: argparse.Namespace) -> int:
    client = make_client(args)
    console = make_console()
    plain = is_plain(console)
    repo = repo_filter(args.repo)

    def fetch() -> dict:
        return gather_report(client, repo, args.limit)

    def view(data: dict, fit: bool = False) -> RenderableType:
        """The report for this console: its width picks the tables; ``fit``: its height too."""
        if plain:
            return report.report_view(data, plain=True)
        return report.report_view(data, width=console.width, height=console.height if fit else None)

    if not args.watch:
        data = fetch()
        if args.json:
            print_json(data)
        else:
            console.print(view(data))
        return EXIT_OK
    try:
        if args.json or plain:  # a pipe: print each refresh in turn (one JSON document per line)
            while True:
                data = fetch()
                if args.json:
                    print(json.dumps(with_iso_times(data)), flush=True)
                else:
                    console.print(view(data))
                    console.print()
                    sys.stdout.flush()
                time.sleep(WATCH_INTERVAL)
        # A terminal: the screen, redrawn in place; the most important sections first, the
        # rest as far as the window's height allows (read again each time: it may change).
        with Live(view(fetch(), fit=True), console=console, auto_refresh=False, screen=True) as live:
            while True:
                time.sleep(WATCH_INTERVAL)
                live.update(view(fetch(), fit=True), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_secrets(args: argparse.Namespace) -> int:
    data = make_client(args).get("/secrets")
    if args.json:
        print_json(data)
    else:
        console = make_console()
        console.print(report.secrets_table(data.get("secrets"), plain=is_plain(console)))
    return EXIT_OK


def cmd_forges(args: argparse.Namespace) -> int:
    data = make_client(args).get("/forges")
    if args.json:
        print_json(data)
    else:
        console = make_console()
        console.print(report.forges_table(data.get("forges"), plain=is_plain(console)))
    return EXIT_OK
