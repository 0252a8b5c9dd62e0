"""``narwhal demo``: narwhal end to end on this machine, then the report."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.text import Text

from narwhal.api.server import free_port, parse_listen, port_free
from narwhal.cli import demo as demo_mod
from narwhal.cli import report
from narwhal.cli.client import SUBMIT_TIMEOUT, Client
from narwhal.cli.commands.jobs import stream_log
from narwhal.cli.commands.report import gather_report
from narwhal.cli.common import EXIT_FAILED, EXIT_OK, add_command, is_plain, make_console, positive_int
from narwhal.config.settings import DEFAULT_LISTEN

EPILOG = """\
examples:
  narwhal demo                          # writes ./narwhal-demo, picks port 8080 (or a free one)
  narwhal demo --dir /tmp/nw --port 9090
What it does: makes sure Docker and the small test image exist (installing and starting
them as root on Debian), writes DIR/config (one `local` runner and the README's
pipelines/example.yaml), starts a dispatcher on 127.0.0.1:PORT, builds a fresh git
repository DIR/repo, shows the job's log as it runs, prints the report, stops the
dispatcher and says how to start it again. Exit 0 when the job passed.
"""


def register(commands: Any) -> None:
    demo = add_command(commands, "demo", "run narwhal end to end on this machine, then show the report",
                       cmd_demo, epilog=EPILOG)
    demo.add_argument("--dir", metavar="DIR", default=demo_mod.DEFAULT_DIR,
                      help=f"where the demo writes config, state and repository (default ./{demo_mod.DEFAULT_DIR})")
    demo.add_argument("--port", type=positive_int, default=None, metavar="P",
                      help="dispatcher port on 127.0.0.1 (default 8080, or a free one when taken)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Docker + test image, a config, a dispatcher, a repository, one job's log live, the report."""
    console = make_console()
    root = Path(args.dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    default_host, default_port = parse_listen(DEFAULT_LISTEN)
    port = args.port or (default_port if port_free(default_host, default_port) else free_port())
    console.print(Text("narwhal demo: checking Docker and the test image (installing what is missing)...",
                       style="bold"))
    image = demo_mod.prepare_engine(lambda text: console.print(Text(f"  {text}")))
    config = demo_mod.write_config(root, image)
    console.print(Text(f"config: {config} (inventory.yaml: one local runner; pipelines/example.yaml, "
                       "the README's example)"))
    repo, commit = demo_mod.make_repo(root)
    console.print(Text(f"repository: {repo} at {commit[:10]}"))
    server = demo_mod.dispatcher(root, config, port)
    server.start()
    jobs: list[dict] = []
    try:
        console.print(Text(f"dispatcher: {server.url} (log: {server.log_path})"))
        client = Client(server.url)
        answer = client.post("/commit", {"repo": repo, "commit": commit, "branch": "main"}, timeout=SUBMIT_TIMEOUT)
        for job in answer["jobs"]:
            console.print(report.submitted_line(job, repo, commit, "main"))
            console.file.flush()
            stream_log(client, job["id"], sys.stdout)  # the steps' output as it is written
            jobs.append(client.get(f"/jobs/{job['id']}"))
            console.print(report.result_line(jobs[-1]))
        console.print()
        data = gather_report(client, None, 20)
        console.print(report.report_view(data, plain=is_plain(console)))
    finally:
        server.stop()
    passed = bool(jobs) and all(j.get("status") == "passed" for j in jobs)
    console.print(Text.assemble(
        ("\ndispatcher stopped. To run it again with the demo's config and its jobs so far:\n", "dim"),
        f"  {serve_command(config, server.state_dir, port)}\n",
        ("and, in another terminal:\n", "dim"),
        f"  narwhal report --url {server.url}"), soft_wrap=True)
    return EXIT_OK if passed else EXIT_FAILED


def serve_command(config: Path, state: Path, port: int) -> str:
    """The ``narwhal serve`` line that brings the demo's dispatcher back: same config, state, port."""
    return shlex.join(["narwhal", "serve", "--config", str(config), "--state", str(state),
                       "--listen", f"127.0.0.1:{port}"])
