"""``narwhal runners`` and ``narwhal runner add|remove|drain|resume``."""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import quote

from narwhal.cli import report
from narwhal.cli.common import (
    EXIT_OK,
    UsageError,
    add_client_options,
    add_command,
    is_plain,
    make_client,
    make_console,
    positive_int,
    print_json,
)

RUNNERS_EPILOG = """\
examples:
  narwhal runners
  narwhal runners --json | jq -r '.runners[] | select(.health.state != "healthy") | .name'
"""
RUNNER_EPILOG = """\
examples:
  narwhal runner add build-3 --host 10.0.0.3 --user narwhal --key ~/.ssh/narwhal --label linux --capacity 4
  narwhal runner add here --transport local
  narwhal runner drain build-3    # finish running jobs, take no new ones
  narwhal runner resume build-3
  narwhal runner remove build-3   # runners added over the API only; inventory ones live in inventory.yaml
"""


def register(commands: Any) -> None:
    runners = add_command(commands, "runners", "runners with health, labels and load", cmd_runners,
                          epilog=RUNNERS_EPILOG)
    add_client_options(runners)

    runner = add_command(commands, "runner", "add, remove, drain or resume a runner", None, epilog=RUNNER_EPILOG)
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


def cmd_runners(args: argparse.Namespace) -> int:
    data = make_client(args).get("/runner")
    if args.json:
        print_json(data)
    else:
        console = make_console()
        console.print(report.runners_table(data.get("runners"), plain=is_plain(console)))
    return EXIT_OK


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
