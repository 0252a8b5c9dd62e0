"""``narwhal jobs``, ``job``, ``logs``, ``cancel`` and ``retry``: one job or many."""

from __future__ import annotations

import argparse
import bisect
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
    FINAL,
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
  narwhal logs 42 -f -t           # each line with the time it was written
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
    logs.add_argument("-t", "--timestamps", action="store_true",
                      help="the time each line was written before it (local time; with --json, `at`)")
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


class LineTimes:
    """When each line of a job's log was written, fetched as needed (``GET /jobs/ID/log/times``)."""

    def __init__(self, client: Client, job_id: int):
        self.client, self.job_id = client, job_id
        self.starts: list[int] = []  # first line of each run, ascending
        self.runs: list[tuple[int, int, float | None]] = []  # (first, last, at)
        self.known = 0  # every line up to here has its run

    def at(self, line: int) -> float | None:
        if line > self.known:
            self._fetch()
        i = bisect.bisect_right(self.starts, line) - 1
        if i >= 0 and self.runs[i][0] <= line <= self.runs[i][1]:
            return self.runs[i][2]
        return None

    def _fetch(self) -> None:
        while True:
            runs = self.client.log_times(self.job_id, after=self.known)
            for run in runs:
                first, last = int(run["first"]), int(run["first"]) + int(run["lines"]) - 1
                if last > self.known:
                    self.starts.append(first)
                    self.runs.append((first, last, run.get("at")))
                    self.known = last
            if len(runs) < 5000:  # the server's page
                return


def cmd_logs(args: argparse.Namespace) -> int:
    """A job's log: inert for a terminal by default, unchanged with --raw, as data with --json."""
    client = make_client(args)
    if args.raw and args.json:
        raise UsageError("logs: --raw and --json exclude each other")
    if args.raw and args.timestamps:
        raise UsageError("logs: --raw is the log as the dispatcher keeps it; --timestamps needs the text form")
    times = LineTimes(client, args.id) if args.timestamps else None
    if not args.follow:
        if args.raw:
            sys.stdout.buffer.write(client.log_bytes(args.id))
            sys.stdout.flush()
            return EXIT_OK
        text = client.log_text(args.id)
        entries = report.log_text_entries(text)
        if args.json:
            data: dict[str, Any] = {"id": args.id, "lines": text.splitlines()}
            if times is not None:
                data["at"] = [times.at(n) for n in range(1, len(entries) + 1)]
            print_json(data)
        else:
            style = log_style(sys.stdout)
            sys.stdout.write("".join(stamped(report.log_entry(line, kind, style=style), times, n, style) + "\n"
                                     for n, (line, kind) in enumerate(entries, 1)))
        return EXIT_OK
    try:
        end = stream_log(client, args.id, sys.stdout, mode="json" if args.json else "raw" if args.raw else "text",
                         times=times)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK if end.get("status") == "passed" else EXIT_FAILED


def stamped(line: str, times: LineTimes | None, number: int, style: bool) -> str:
    """LINE with its time before it, when ``--timestamps`` asked for it (dim on a terminal)."""
    if times is None:
        return line
    stamp = report.log_stamp(times.at(number))
    return f"{report.STAMP_SGR}{stamp}{report.RESET} {line}" if style else f"{stamp} {line}"


def stream_log(client: Client, job_id: int, out: Any, *, mode: str = "text", times: LineTimes | None = None) -> dict:
    """Write a job's log as it is written until the job ends; return how it ended.

    ``mode``: "text" (inert, narwhal's lines marked and styled on a terminal, each step
    under its header), "raw" (the plain-text form ``GET /jobs/ID/log`` sends) or "json"
    (one object per line). The last line says how the job ended. ``times``: each line's
    time before it (with "json", as ``at``)."""
    style = log_style(out)
    for item in client.follow_log(job_id):
        if isinstance(item, dict):
            out.write((json.dumps({"end": item}) if mode == "json" else report.log_end_line(job_id, item)) + "\n")
            out.flush()
            return item
        lineno, text, kind = item
        if mode == "json":
            row: dict[str, Any] = {"line": lineno, "text": text, "kind": kind}
            if times is not None:
                row["at"] = times.at(lineno)
            out.write(json.dumps(row) + "\n")
        elif mode == "raw":
            out.flush()
            out.buffer.write(log_text_line(text, kind).encode("utf-8", errors="surrogateescape") + b"\n")
        else:
            out.write(stamped(report.log_entry(text, kind, style=style), times, lineno, style) + "\n")
        out.flush()
    return {"id": job_id, "status": "unknown", "reason": None}  # not reached: follow_log ends with the end


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a queued or running job; one that has ended is left as it is, and said so."""
    client = make_client(args)
    job = client.get(f"/jobs/{args.id}")
    if job.get("status") in FINAL:
        if args.json:
            print_json({**job, "already_finished": True})
        else:
            make_console().print(report.already_finished_line(job))
        return EXIT_OK
    return show_job(args, client.post(f"/jobs/{args.id}/cancel"))


def cmd_retry(args: argparse.Namespace) -> int:
    return show_job(args, make_client(args).post(f"/jobs/{args.id}/retry"))


def show_job(args: argparse.Namespace, job: dict) -> int:
    if args.json:
        print_json(job)
    else:
        make_console().print(report.changed_job_line(job))
    return EXIT_OK
