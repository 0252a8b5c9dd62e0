"""``narwhal jobs``, ``job``, ``logs``, ``cancel`` and ``retry``: one job or many."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from narwhal.cli import report
from narwhal.cli.client import Client
from narwhal.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    add_client_options,
    add_command,
    is_plain,
    job_id,
    make_client,
    make_console,
    positive_int,
    print_json,
    repo_filter,
)
from narwhal.job import JobStatus
from narwhal.text import log_text_line

EPILOGS = {
    "jobs": """\
examples:
  narwhal jobs
  narwhal jobs --status failed --repo /src/app --limit 10
  narwhal jobs --status queued --json
""",
    "job": """\
examples:
  narwhal job 42
  narwhal job 42 --json | jq .steps
""",
    "logs": """\
examples:
  narwhal logs 42                 # the log so far
  narwhal logs 42 -f              # follow until the job ends; exit 0 if it passed, else 1
  narwhal logs 42 --raw > out.log # the plain-text log, as the dispatcher sends it
Ctrl-C while following leaves the job running (exit 130). Without --raw, a step's colour
is kept but every other terminal control sequence (titles, cursor moves, hyperlinks,
clear screen) is dropped and control characters are shown as \\xNN.
narwhal's own lines read "[narwhal] ..." (dim cyan on a terminal); a step line that would
look like one is shown "[step] [narwhal] ...". --raw prints the dispatcher's plain-text
form (the same marks, no styling).
""",
    "cancel": "examples:\n  narwhal cancel 42\n",
    "retry": "examples:\n  narwhal retry 42                # a new attempt of a finished job\n",
}


def register(commands: Any) -> None:
    jobs = add_command(commands, "jobs", "list jobs, newest first", cmd_jobs, epilog=EPILOGS["jobs"])
    jobs.add_argument("--status", metavar="S", default=None, choices=[s.value for s in JobStatus],
                      help="queued, running, passed, failed, error or cancelled")
    jobs.add_argument("--repo", metavar="R", default=None, help="only this repository")
    jobs.add_argument("--limit", metavar="N", type=positive_int, default=50, help="default 50")
    add_client_options(jobs)

    job = add_command(commands, "job", "one job with its steps", cmd_job, epilog=EPILOGS["job"])
    job.add_argument("id", metavar="ID", type=job_id)
    add_client_options(job)

    logs = add_command(commands, "logs", "a job's output", cmd_logs, epilog=EPILOGS["logs"])
    logs.add_argument("id", metavar="JOB", type=job_id)
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    logs.add_argument("--raw", action="store_true",
                      help="write the plain-text log, escape sequences included (for files and pipes)")
    add_client_options(logs)

    for name, func, text in (("cancel", cmd_cancel, "cancel a queued or running job"),
                             ("retry", cmd_retry, "run a finished job again (a new attempt)")):
        p = add_command(commands, name, text, func, epilog=EPILOGS[name])
        p.add_argument("id", metavar="JOB", type=job_id)
        add_client_options(p)


def cmd_jobs(args: argparse.Namespace) -> int:
    data = make_client(args).get("/jobs", status=args.status, repo=repo_filter(args.repo), limit=args.limit)
    if args.json:
        print_json(data)
    else:
        console = make_console()
        console.print(report.jobs_table(data.get("jobs"), title="Jobs", plain=is_plain(console)))
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    data = make_client(args).get(f"/jobs/{args.id}")
    if args.json:
        print_json(data)
    else:
        console = make_console()
        console.print(report.job_panel(data, plain=is_plain(console)))
    return EXIT_OK


def log_style(out: Any) -> bool:
    """Whether ``narwhal logs`` styles narwhal's lines: on a terminal, unless NO_COLOR is set."""
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def cmd_logs(args: argparse.Namespace) -> int:
    """A job's log: inert for a terminal by default, unchanged with --raw, as data with --json."""
    client = make_client(args)
    if args.raw and args.json:
        raise UsageError("logs: --raw and --json exclude each other")
    if not args.follow:
        if args.raw:
            sys.stdout.buffer.write(client.log_bytes(args.id))
            sys.stdout.flush()
            return EXIT_OK
        text = client.log_text(args.id)
        if args.json:
            print_json({"id": args.id, "lines": text.splitlines()})
        else:
            style = log_style(sys.stdout)
            sys.stdout.write("".join(report.log_entry(line, kind, style=style) + "\n"
                                     for line, kind in report.log_text_entries(text)))
        return EXIT_OK
    try:
        end = stream_log(client, args.id, sys.stdout, mode="json" if args.json else "raw" if args.raw else "text")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK if end.get("status") == "passed" else EXIT_FAILED


def stream_log(client: Client, job_id: int, out: Any, *, mode: str = "text") -> dict:
    """Write a job's log as it is written until the job ends; return how it ended.

    ``mode``: "text" (inert, narwhal's lines marked and styled on a terminal, each step
    under its header), "raw" (the plain-text form ``GET /jobs/ID/log`` sends) or "json"
    (one object per line). The last line says how the job ended."""
    style = log_style(out)
    for item in client.follow_log(job_id):
        if isinstance(item, dict):
            out.write((json.dumps({"end": item}) if mode == "json" else report.log_end_line(job_id, item)) + "\n")
            out.flush()
            return item
        lineno, text, kind = item
        if mode == "json":
            out.write(json.dumps({"line": lineno, "text": text, "kind": kind}) + "\n")
        elif mode == "raw":
            out.flush()
            out.buffer.write(log_text_line(text, kind).encode("utf-8", errors="surrogateescape") + b"\n")
        else:
            out.write(report.log_entry(text, kind, style=style) + "\n")
        out.flush()
    return {"id": job_id, "status": "unknown", "reason": None}  # not reached: follow_log ends with the end


def cmd_cancel(args: argparse.Namespace) -> int:
    return show_job(args, make_client(args).post(f"/jobs/{args.id}/cancel"))


def cmd_retry(args: argparse.Namespace) -> int:
    return show_job(args, make_client(args).post(f"/jobs/{args.id}/retry"))


def show_job(args: argparse.Namespace, job: dict) -> int:
    if args.json:
        print_json(job)
    else:
        make_console().print(report.changed_job_line(job))
    return EXIT_OK
