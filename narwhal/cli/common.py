"""What every ``narwhal`` subcommand shares: exit statuses, options, the client, the console.

The commands live one noun per module in ``narwhal.cli.commands``; each registers its
subcommands with ``register(commands)``. ``narwhal.cli.main`` builds the parser from them
and is the only place that turns an error into an exit status and a message.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from narwhal.api.server import UsageError
from narwhal.cli.client import DEFAULT_URL, Client
from narwhal.config.loader import default_config_dir
from narwhal.job import FINAL_STATUSES

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and the answer is "no" / an operation failed
EXIT_USAGE = 2  # bad configuration or command line
EXIT_INTERRUPTED = 130  # Ctrl-C

WATCH_INTERVAL = 2.0
POLL_INTERVAL = 0.5
FINAL = tuple(sorted(s.value for s in FINAL_STATUSES))
TOKEN_HINT = " (pass --token or set NARWHAL_TOKEN)"

__all__ = ["UsageError"]  # re-exported: the commands raise it for bad command-line values


# --- options -----------------------------------------------------------------------


def add_command(commands: Any, name: str, help: str, func: Any, description: str | None = None,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand with its examples epilog, kept as written."""
    parser = commands.add_parser(name, help=help, description=description or help, epilog=epilog,
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


# --- the client and the console ------------------------------------------------------


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


def print_json(data: Any) -> None:
    print(json.dumps(with_iso_times(data), indent=2, sort_keys=False))


def with_iso_times(data: Any) -> Any:
    """DATA with an ISO 8601 twin (UTC) beside every epoch time: ``created_at`` gets
    ``created_at_iso``. Scripts keep the numbers; people and ``jq`` get readable times."""
    if isinstance(data, list):
        return [with_iso_times(item) for item in data]
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        out[key] = with_iso_times(value)
        if (isinstance(key, str) and key.endswith("_at") and isinstance(value, (int, float))
                and not isinstance(value, bool) and f"{key}_iso" not in data):
            out[f"{key}_iso"] = iso_time(value)
    return out


def iso_time(epoch: float) -> str:
    """``2024-05-01T12:00:03.250Z``: an epoch time in UTC, to the millisecond."""
    return datetime.fromtimestamp(float(epoch), tz=UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


# --- repositories on this machine --------------------------------------------------


def git(path: str, *args: str) -> subprocess.CompletedProcess:
    """``git -C PATH ARGS``, output captured; UsageError when git is missing or hangs."""
    try:
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise UsageError("git is not installed: cannot read the local repository") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"git {args[0]} in {path} did not answer within 60 s") from None


def local_repo(repo: str) -> str | None:
    """A local directory as the dispatcher spells its repository: the git top level (``.`` in a
    subdirectory means the repository it is in), links resolved. None when REPO is no local
    directory (a URL); a directory outside any git work tree is only made absolute."""
    expanded = os.path.expanduser(repo)
    if not os.path.isdir(expanded):
        return None
    path = os.path.realpath(expanded)
    done = git(path, "rev-parse", "--show-toplevel")
    top = done.stdout.strip()
    return os.path.realpath(top) if done.returncode == 0 and top else path


def repo_filter(repo: str | None) -> str | None:
    """``--repo .`` means this directory's repository, spelled the way ``submit`` sends it."""
    if repo is None:
        return None
    return local_repo(repo) or repo
