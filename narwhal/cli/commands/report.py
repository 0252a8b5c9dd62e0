"""``narwhal report`` (the whole picture, once or ``--watch``), and the ``secrets`` and ``forges`` lists."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

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
)

REPORT_EPILOG = """\
examples:
  narwhal report                      # repositories, runners, recent jobs, the queue
  narwhal report --repo /src/app --limit 50
  narwhal report --watch              # refresh every 2 s; Ctrl-C to leave
  narwhal report --json | jq '.stats.repos[] | {repo, pct_passed}'
"""
FORGES_EPILOG = """\
examples:
  narwhal forges
  narwhal forges --json | jq '.forges[] | select(.failed > 0) | {name, last_error}'
A status is tried again while the forge is down or busy (up to status_deadline); one the
forge refuses (a wrong token, an unknown repository) is failed at once, with its answer.
"""


def register(commands: Any) -> None:
    report_ = add_command(commands, "report", "repositories, runners, recent jobs and the queue at a glance",
                          cmd_report, epilog=REPORT_EPILOG)
    report_.add_argument("--repo", metavar="R", default=None, help="only this repository")
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
    jobs = client.get("/jobs", repo=repo, limit=limit)["jobs"]
    queue = []
    for j in client.get("/jobs", status="queued", repo=repo, limit=limit)["jobs"]:
        try:
            detail = client.get(f"/jobs/{j['id']}")
        except ApiError as exc:
            if exc.status == 404:
                continue
            raise
        if detail.get("status") == "queued":
            queue.append(detail)
    return {"stats": stats, "runners": runners, "forges": forges, "jobs": jobs, "queue": queue}


def cmd_report(args: argparse.Namespace) -> int:
    client = make_client(args)
    console = make_console()
    plain = is_plain(console)
    repo = repo_filter(args.repo)

    def fetch() -> dict:
        return gather_report(client, repo, args.limit)

    if not args.watch:
        data = fetch()
        if args.json:
            print_json(data)
        else:
            console.print(report.report_view(data, plain=plain))
        return EXIT_OK
    try:
        if args.json or plain:  # a pipe: print each refresh in turn (one JSON document per line)
            while True:
                data = fetch()
                if args.json:
                    print(json.dumps(data), flush=True)
                else:
                    console.print(report.report_view(data, plain=True))
                    console.print()
                    sys.stdout.flush()
                time.sleep(WATCH_INTERVAL)
        with Live(report.report_view(fetch(), plain=False), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(WATCH_INTERVAL)
                live.update(report.report_view(fetch(), plain=False), refresh=True)
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
