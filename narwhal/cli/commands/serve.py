"""``narwhal serve``: the dispatcher."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from narwhal.api.server import serve
from narwhal.cli.common import add_command, add_config_option, config_dir
from narwhal.config.settings import DEFAULT_LISTEN

EPILOG = """\
examples:
  narwhal serve                                   # config from $NARWHAL_CONFIG or the current directory
  narwhal serve --config /etc/narwhal --state /var/lib/narwhal
  narwhal serve --listen 0.0.0.0:8080 --token-file /etc/narwhal/token   # non-loopback needs a token
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


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the dispatcher until SIGTERM/SIGINT."""
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(str(config_dir(args)), args.state, args.listen, args.token_file)
