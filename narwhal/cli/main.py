"""The ``narwhal`` command.

The subcommands live one noun per module in ``narwhal.cli.commands`` (``cmd_<name>(args)
-> int``, registered by each module's ``register``); ``build_parser`` gathers them.
``main`` is the only place that turns a :class:`NarwhalError` into an exit status and a
message on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from narwhal import __version__
from narwhal.cli.client import ApiError, DispatcherUnreachable
from narwhal.cli.commands import MODULES
from narwhal.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    TOKEN_HINT,
    UsageError,
    add_client_options,
)
from narwhal.cli.engine import EngineUnavailable
from narwhal.errors import ConfigError, NarwhalError
from narwhal.text import printable

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED"]

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="narwhal", description="Agentless CI: pipelines as YAML, runners over SSH, steps in Docker.",
                                     epilog=ROOT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"narwhal {__version__}")
    add_client_options(parser, json_option=False, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for module in MODULES:
        module.register(commands)
    return parser


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
        return EXIT_INTERRUPTED


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
