"""The ``narwhal`` command.

One function per subcommand (``cmd_<name>(args) -> int``), registered in
``build_parser``. ``main`` is the only place that turns a :class:`NarwhalError`
into an exit status and a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.live import Live
from rich.text import Text

from narwhal import __version__
from narwhal.api.server import UsageError, free_port, parse_listen, port_free, serve
from narwhal.cli import demo as demo_mod
from narwhal.cli import report
from narwhal.cli.client import (
    DEFAULT_URL,
    SUBMIT_TIMEOUT,
    ApiError,
    Client,
    DispatcherUnreachable,
)
from narwhal.cli.engine import EngineUnavailable
from narwhal.config.loader import default_config_dir, load_config, summarize
from narwhal.config.settings import DEFAULT_LISTEN
from narwhal.errors import ConfigError, NarwhalError
from narwhal.job import COMMIT_RE, FINAL_STATUSES, JobStatus
from narwhal.text import log_text_line, printable

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and the answer is "no" / an operation failed
EXIT_USAGE = 2  # bad configuration or command line
EXIT_INTERRUPTED = 130  # Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="narwhal", description="Agentless CI: pipelines as YAML, runners over SSH, steps in Docker.",
                                     epilog=ROOT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"narwhal {__version__}")
    add_client_options(parser, json_option=False, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    check = commands.add_parser("check", help="validate the inventory and pipelines", description="Validate inventory.yaml and pipelines/*.yaml and show which runners can take each pipeline.")
    add_config_option(check)
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.set_defaults(func=cmd_check)
    add_client_commands(commands)
    return parser


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config DIR`` for every subcommand that reads the config directory."""
    parser.add_argument(
        "--config",
        metavar="DIR",
        type=Path,
        default=None,
        help="config directory with inventory.yaml and pipelines/ (default: $NARWHAL_CONFIG or the current directory)",
    )


def config_dir(args: argparse.Namespace) -> Path:
    return args.config if args.config is not None else default_config_dir()


# --- subcommands -------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config directory; print a summary (problems raise ConfigError)."""
    summary = summarize(load_config(config_dir(args)))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console = Console()
        console.print(report.check_runners(summary))
        console.print(report.check_pipelines(summary))
        if summary["secrets"]:
            console.print(report.secrets_table(summary["secrets"]))
        for warning in summary["warnings"]:
            console.print(report.check_warning(warning), soft_wrap=True)
        console.print(report.check_footer(summary))
    return EXIT_OK


# --- the dispatcher's client commands ------------------------------------------------

ROOT_EPILOG = """\
examples:
  narwhal demo                                # try it: dispatcher + local runner + example pipeline
  narwhal serve --config ./ci                 # run a dispatcher on 127.0.0.1:8080
  narwhal submit . HEAD --branch main --wait  # build this repository's HEAD and watch it
  narwhal report --watch                      # what is green, what is red, which runner is sick
  narwhal logs 42 -f                          # follow a job's output

Commands that talk to a dispatcher take --url (or NARWHAL_URL, default
http://127.0.0.1:8080) and --token (or NARWHAL_TOKEN); read commands take --json.
"""

EPILOGS = {
    "serve": """\
examples:
  narwhal serve                                   # config from $NARWHAL_CONFIG or the current directory
  narwhal serve --config /etc/narwhal --state /var/lib/narwhal
  narwhal serve --listen 0.0.0.0:8080 --token-file /etc/narwhal/token   # non-loopback needs a token
""",
    "submit": """\
examples:
  narwhal submit . HEAD --wait                    # a local repository: refs and short ids are resolved
  narwhal submit /src/app v1.2 --branch release
  narwhal submit https://git.example.com/app.git 4f0c...(40 hex) --branch main
  narwhal submit https://git.example.com/app.git --branch main   # no COMMIT: the branch's head now
  narwhal submit . --branch v1.2 --wait           # a branch or tag; the dispatcher looks up its head
exit status with --wait: 0 every job passed, 1 one did not, 2 usage or connection error
""",
    "report": """\
examples:
  narwhal report                      # repositories, runners, recent jobs, the queue
  narwhal report --repo /src/app --limit 50
  narwhal report --watch              # refresh every 2 s; Ctrl-C to leave
  narwhal report --json | jq '.stats.repos[] | {repo, pct_passed}'
""",
    "runners": """\
examples:
  narwhal runners
  narwhal runners --json | jq -r '.runners[] | select(.health.state != "healthy") | .name'
""",
    "forges": """\
examples:
  narwhal forges
  narwhal forges --json | jq '.forges[] | select(.failed > 0) | {name, last_error}'
A status is tried again while the forge is down or busy (up to status_deadline); one the
forge refuses (a wrong token, an unknown repository) is failed at once, with its answer.
""",
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
    "runner": """\
examples:
  narwhal runner add build-3 --host 10.0.0.3 --user narwhal --key ~/.ssh/narwhal --label linux --capacity 4
  narwhal runner add here --transport local
  narwhal runner drain build-3    # finish running jobs, take no new ones
  narwhal runner resume build-3
  narwhal runner remove build-3   # runners added over the API only; inventory ones live in inventory.yaml
""",
    "demo": """\
examples:
  narwhal demo                          # writes ./narwhal-demo, picks port 8080 (or a free one)
  narwhal demo --dir /tmp/nw --port 9090
What it does: makes sure Docker and the small test image exist (installing and starting
them as root on Debian), writes DIR/config (one `local` runner, the example pipeline),
starts a dispatcher on 127.0.0.1:PORT, builds a fresh git repository DIR/repo, follows the
job live, prints the report and stops the dispatcher. Exit 0 when the job passed.
""",
}

WATCH_INTERVAL = 2.0
POLL_INTERVAL = 0.5
FINAL = tuple(sorted(s.value for s in FINAL_STATUSES))
TOKEN_HINT = " (pass --token or set NARWHAL_TOKEN)"


def add_command(commands: Any, name: str, help: str, func: Any, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand with its examples epilog, kept as written."""
    parser = commands.add_parser(name, help=help, description=description or help, epilog=EPILOGS.get(name),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def add_client_options(parser: argparse.ArgumentParser, *, json_option: bool = True, top: bool = False) -> None:
    """--url/--token (accepted before or after the subcommand) and --json."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--url", default=default, metavar="URL",
                        help=f"dispatcher URL (default: $NARWHAL_URL or {DEFAULT_URL})")
    parser.add_argument("--token", default=default, metavar="TOKEN",
                        help="API token for changes (default: $NARWHAL_TOKEN)")
    if json_option:
        parser.add_argument("--json", action="store_true", help="print the data as JSON (for scripts)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def job_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a job id (a positive integer), got {text!r}")
    return int(text)


def add_client_commands(commands: Any) -> None:
    serve = add_command(commands, "serve", "run the dispatcher (REST API + scheduler)", cmd_serve)
    add_config_option(serve)
    serve.add_argument("--state", metavar="DIR", default=None, help="state directory (default: CONFIG/.narwhal)")
    serve.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN, help=f"default {DEFAULT_LISTEN}")
    serve.add_argument("--token-file", metavar="F", default=None,
                       help="file holding the API token (else $NARWHAL_TOKEN; required off loopback)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       type=str.lower, help="default info")

    submit = add_command(commands, "submit", "submit a commit: one job per matching pipeline", cmd_submit)
    submit.add_argument("repo", metavar="REPO", help="repository URL or path (a local directory is made absolute)")
    submit.add_argument("commit", metavar="COMMIT", nargs="?", default=None,
                        help="40-hex commit id; a ref or short id in a local repository; "
                             "omitted: the head of --branch, looked up by the dispatcher")
    submit.add_argument("--branch", metavar="B", default=None,
                        help="branch name (pipelines may match on it); without COMMIT, the branch or tag to build")
    submit.add_argument("--wait", action="store_true", help="follow the jobs live until they end")
    add_client_options(submit)

    report_ = add_command(commands, "report", "repositories, runners, recent jobs and the queue at a glance",
                          cmd_report)
    report_.add_argument("--repo", metavar="R", default=None, help="only this repository")
    report_.add_argument("--watch", action="store_true", help=f"refresh in place every {WATCH_INTERVAL:g} s")
    report_.add_argument("--limit", metavar="N", type=positive_int, default=20, help="recent jobs shown (default 20)")
    add_client_options(report_)

    runners = add_command(commands, "runners", "runners with health, labels and load", cmd_runners)
    add_client_options(runners)

    secrets = add_command(commands, "secrets", "secrets: names, sources, scopes and users (never values)",
                          cmd_secrets)
    add_client_options(secrets)

    forges = add_command(commands, "forges", "forges and their commit statuses: pending, delivered, failed, "
                         "the last error", cmd_forges)
    add_client_options(forges)

    jobs = add_command(commands, "jobs", "list jobs, newest first", cmd_jobs)
    jobs.add_argument("--status", metavar="S", default=None, choices=[s.value for s in JobStatus],
                      help="queued, running, passed, failed, error or cancelled")
    jobs.add_argument("--repo", metavar="R", default=None, help="only this repository")
    jobs.add_argument("--limit", metavar="N", type=positive_int, default=50, help="default 50")
    add_client_options(jobs)

    job = add_command(commands, "job", "one job with its steps", cmd_job)
    job.add_argument("id", metavar="ID", type=job_id)
    add_client_options(job)

    logs = add_command(commands, "logs", "a job's output", cmd_logs)
    logs.add_argument("id", metavar="JOB", type=job_id)
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    logs.add_argument("--raw", action="store_true",
                      help="write the plain-text log, escape sequences included (for files and pipes)")
    add_client_options(logs)

    for name, func, text in (("cancel", cmd_cancel, "cancel a queued or running job"),
                             ("retry", cmd_retry, "run a finished job again (a new attempt)")):
        p = add_command(commands, name, text, func)
        p.add_argument("id", metavar="JOB", type=job_id)
        add_client_options(p)

    runner = add_command(commands, "runner", "add, remove, drain or resume a runner", None)
    actions = runner.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    add = add_command(actions, "add", "register a runner at run time", cmd_runner_add)
    add.add_argument("name", metavar="NAME")
    add.add_argument("--host", metavar="H", default=None, help="address of the runner (not for --transport local)")
    add.add_argument("--port", type=positive_int, default=None, help="SSH port (default 22)")
    add.add_argument("--user", default=None, help="SSH user (default narwhal)")
    add.add_argument("--key", default=None, metavar="PATH", help="private key file on the dispatcher's host")
    add.add_argument("--known-hosts", default=None, metavar="PATH", help="known_hosts file on the dispatcher's host")
    add.add_argument("--label", action="append", default=None, metavar="L", help="a label (repeat for more)")
    add.add_argument("--capacity", type=positive_int, default=None, metavar="N", help="jobs at once (default 1)")
    add.add_argument("--transport", choices=["ssh", "local"], default=None, help="default ssh")
    add_client_options(add)
    for name, func, text in (("remove", cmd_runner_remove, "remove a runner added over the API"),
                             ("drain", cmd_runner_drain, "finish running jobs, take no new ones"),
                             ("resume", cmd_runner_resume, "take jobs again after a drain")):
        p = add_command(actions, name, text, func)
        p.add_argument("name", metavar="NAME")
        add_client_options(p)

    demo = add_command(commands, "demo", "run narwhal end to end on this machine, then show the report", cmd_demo)
    demo.add_argument("--dir", metavar="DIR", default=demo_mod.DEFAULT_DIR,
                      help=f"where the demo writes config, state and repository (default ./{demo_mod.DEFAULT_DIR})")
    demo.add_argument("--port", type=positive_int, default=None, metavar="P",
                      help="dispatcher port on 127.0.0.1 (default 8080, or a free one when taken)")


# --- helpers -----------------------------------------------------------------------


def make_client(args: argparse.Namespace) -> Client:
    url = getattr(args, "url", None) or os.environ.get("NARWHAL_URL") or DEFAULT_URL
    token = getattr(args, "token", None) or os.environ.get("NARWHAL_TOKEN") or None
    return Client(url, token)


def make_console() -> Console:
    """A terminal gets colour and boxes; a pipe or file gets plain text, wide enough not to wrap."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 250), no_color=True)
    return console


def is_plain(console: Console) -> bool:
    return not console.is_terminal


def repo_filter(repo: str | None) -> str | None:
    """``--repo .`` means this directory, spelled the way ``submit`` sent it (absolute)."""
    if repo is None:
        return None
    expanded = os.path.expanduser(repo)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else repo


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


# --- serve -------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the dispatcher until SIGTERM/SIGINT."""
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from narwhal import web  # the dashboard, mounted into the API's app

    return serve(str(config_dir(args)), args.state, args.listen, args.token_file, pages=web.mount)


# --- submit ------------------------------------------------------------------------


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


def head_submission(repo: str) -> str:
    """A local directory becomes absolute; the dispatcher looks the branch's head up in its mirror."""
    expanded = os.path.expanduser(repo)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else repo


def cmd_submit(args: argparse.Namespace) -> int:
    if args.commit is None:
        if not args.branch:
            raise UsageError("give a COMMIT, or --branch B to build the head of branch (or tag) B")
        repo, commit = head_submission(args.repo), None
        body = {"repo": repo, "branch": args.branch}
    else:
        repo, commit = resolve_submission(args.repo, args.commit)
        body = {"repo": repo, "commit": commit}
        if args.branch:
            body["branch"] = args.branch
    client = make_client(args)
    answer = client.post("/commit", body, timeout=SUBMIT_TIMEOUT)
    commit = commit or (answer.get("commit") or {}).get("commit") or "?"  # the head the dispatcher found
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


# --- report and the read commands --------------------------------------------------


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


def cmd_runners(args: argparse.Namespace) -> int:
    data = make_client(args).get("/runner")
    if args.json:
        print_json(data)
    else:
        console = make_console()
        console.print(report.runners_table(data.get("runners"), plain=is_plain(console)))
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
    out = sys.stdout
    style = log_style(out)
    try:
        for item in client.follow_log(args.id):
            if isinstance(item, dict):
                if args.json:
                    out.write(json.dumps({"end": item}) + "\n")
                else:
                    out.write(report.log_end_line(args.id, item) + "\n")
                out.flush()
                return EXIT_OK if item.get("status") == "passed" else EXIT_FAILED
            lineno, text, kind = item
            if args.json:
                out.write(json.dumps({"line": lineno, "text": text, "kind": kind}) + "\n")
            elif args.raw:  # the plain-text form, as GET /jobs/ID/log sends it
                out.flush()
                out.buffer.write(log_text_line(text, kind).encode("utf-8", errors="surrogateescape") + b"\n")
            else:
                out.write(report.log_entry(text, kind, style=style) + "\n")
            out.flush()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_FAILED  # not reached: follow_log ends with the end event or raises


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


# --- runner ------------------------------------------------------------------------


def local_path(path: str | None) -> str | None:
    """Key and known_hosts paths that exist here are made absolute; others go as given."""
    if path is None:
        return None
    expanded = os.path.expanduser(path)
    return os.path.abspath(expanded) if os.path.exists(expanded) else path


def cmd_runner_add(args: argparse.Namespace) -> int:
    if args.transport != "local" and not args.host:
        raise UsageError("runner add: --host is required (except with --transport local)")
    body: dict[str, Any] = {"name": args.name}
    for key, value in (("host", args.host), ("port", args.port), ("user", args.user),
                       ("key", local_path(args.key)), ("known_hosts", local_path(args.known_hosts)),
                       ("labels", args.label), ("capacity", args.capacity), ("transport", args.transport)):
        if value is not None:
            body[key] = value
    return show_runner(args, make_client(args).post("/runner", body))


def cmd_runner_remove(args: argparse.Namespace) -> int:
    data = make_client(args).delete(f"/runner/{quote(args.name, safe='')}")
    if args.json:
        print_json(data)
    else:
        make_console().print(report.removed_line(data.get("removed", args.name)))
    return EXIT_OK


def cmd_runner_drain(args: argparse.Namespace) -> int:
    return show_runner(args, make_client(args).post(f"/runner/{quote(args.name, safe='')}/drain"))


def cmd_runner_resume(args: argparse.Namespace) -> int:
    return show_runner(args, make_client(args).post(f"/runner/{quote(args.name, safe='')}/resume"))


def show_runner(args: argparse.Namespace, runner: dict) -> int:
    if args.json:
        print_json(runner)
    else:
        console = make_console()
        console.print(report.runners_table([runner], plain=is_plain(console)))
    return EXIT_OK


# --- demo --------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Docker + test image, a config, a dispatcher, a repository, one job followed live, the report."""
    console = make_console()
    root = Path(args.dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    default_host, default_port = parse_listen(DEFAULT_LISTEN)
    port = args.port or (default_port if port_free(default_host, default_port) else free_port())
    console.print(Text("narwhal demo: checking Docker and the test image (installing what is missing)...",
                       style="bold"))
    image = demo_mod.prepare_engine(lambda text: console.print(Text(f"  {text}")))
    config = demo_mod.write_config(root, image)
    console.print(Text(f"config: {config} (inventory.yaml: one local runner; pipelines/example.yaml)"))
    repo, commit = demo_mod.make_repo(root)
    console.print(Text(f"repository: {repo} at {commit[:10]}"))
    server = demo_mod.dispatcher(root, config, port)
    server.start()
    try:
        console.print(Text(f"dispatcher: {server.url} (log: {server.log_path})"))
        client = Client(server.url)
        answer = client.post("/commit", {"repo": repo, "commit": commit, "branch": "main"}, timeout=SUBMIT_TIMEOUT)
        ids = [j["id"] for j in answer["jobs"]]
        jobs = follow_jobs(client, ids, console)
        console.print()
        data = gather_report(client, None, 20)
        console.print(report.report_view(data, plain=is_plain(console)))
    finally:
        server.stop()
    passed = all(j.get("status") == "passed" for j in jobs)
    console.print(Text(f"\ndispatcher stopped. Run your own: narwhal serve --config {config}", style="dim"))
    return EXIT_OK if passed else EXIT_FAILED


# --- entry point -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; domain errors become a message on stderr and an exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage or help already
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except DispatcherUnreachable as e:
        print(f"narwhal: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as e:
        return report_api_error(e)
    except (UsageError, EngineUnavailable) as e:
        print(f"narwhal: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `narwhal report | head`: the reader left; say nothing
        quiet_stdout()
        return EXIT_FAILED
    except NarwhalError as e:
        print(f"narwhal: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("narwhal: interrupted", file=sys.stderr)
        return 130


def report_api_error(e: ApiError) -> int:
    """The server's message (and problems); 404/409 exit 1, bad input or auth exit 2."""
    message = printable(e)
    if e.status == 401:
        message += TOKEN_HINT
    print(f"narwhal: error: {message}", file=sys.stderr)
    for problem in e.problems:
        print(f"  {printable(problem)}", file=sys.stderr)
    return EXIT_USAGE if e.status in (400, 401, 413, 422) else EXIT_FAILED


def quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
