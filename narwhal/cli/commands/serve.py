"""``narwhal serve`` (the dispatcher) and ``narwhal reload`` (its config, now)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from narwhal.api.server import serve
from narwhal.cli import report
from narwhal.cli.commands.config import explained
from narwhal.cli.common import (
    EXIT_OK,
    add_client_options,
    add_command,
    add_config_option,
    config_dir,
    make_client,
    make_console,
    print_json,
)
from narwhal.config.settings import DEFAULT_LISTEN
from narwhal.errors import ConfigError

EPILOG = """\
examples:
  narwhal serve                                   # config from $NARWHAL_CONFIG or the current directory
  narwhal serve --config /etc/narwhal --state /var/lib/narwhal
  narwhal serve --listen 0.0.0.0:8080 --token-file /etc/narwhal/token   # non-loopback needs a token
The dispatcher watches its config directory (inventory.yaml, pipelines/, secret files) and
reloads a change by itself once it is saved; a bad change is logged with every problem and
the running configuration stays. SIGTERM or Ctrl-C stops it: running jobs get stop_grace to
finish, then their steps are stopped and the jobs re-queued for the next start.
"""
RELOAD_EPILOG = """\
examples:
  narwhal reload                  # after editing the config: load it now, or see why not
  narwhal reload --json
The dispatcher also reloads by itself when the files change; `narwhal reload` does it now
and prints the problems of a bad config (file:line), exit 2. SIGHUP does the same.
"""


def register(commands: Any) -> None:
    serve_ = add_command(commands, "serve", "run the dispatcher (REST API + scheduler)", cmd_serve, epilog=EPILOG)
    add_config_option(serve_)
    serve_.add_argument("--state", metavar="DIR", default=None, help="state directory (default: CONFIG/.narwhal)")
    serve_.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN, help=f"default {DEFAULT_LISTEN}")
    serve_.add_argument("--token-file", metavar="F", default=None,
                        help="file holding the API token (else $NARWHAL_TOKEN; required off loopback)")
    serve_.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        type=str.lower, help="default info")
    serve_.add_argument("--no-watch", dest="watch", action="store_false",
                        help="do not reload by itself when the config files change (SIGHUP and "
                             "narwhal reload still do)")

    reload = add_command(commands, "reload", "load the dispatcher's config again now (it also does by itself)",
                         cmd_reload, epilog=RELOAD_EPILOG)
    add_client_options(reload)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the dispatcher until SIGTERM/SIGINT."""
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:  # every SSH channel and health probe: only when asked for
        logging.getLogger("asyncssh").setLevel(logging.WARNING)
    root = config_dir(args)
    from narwhal import web  # the dashboard, mounted into the API's app

    try:
        return serve(str(root), args.state, args.listen, args.token_file, watch=args.watch, pages=web.mount)
    except ConfigError as exc:  # a missing inventory is named in full, with the way out
        raise ConfigError([explained(p, root) for p in exc.problems]) from None


def cmd_reload(args: argparse.Namespace) -> int:
    """POST /reload; a bad config is an ApiError (422) whose problems main() prints as file:line."""
    answer = make_client(args).post("/reload")
    if args.json:
        print_json(answer)
        return EXIT_OK
    console = make_console()
    console.print(report.reloaded_line(answer))
    for warning in answer.get("warnings") or []:
        console.print(report.check_warning(warning), soft_wrap=True)
    return EXIT_OK
