"""The ``narwhal`` command.

One function per subcommand (``cmd_<name>(args) -> int``), registered in
``build_parser``. ``main`` is the only place that turns a :class:`NarwhalError`
into an exit status and a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from narwhal import __version__
from narwhal.config import default_config_dir, load_config, summarize
from narwhal.errors import ConfigError, NarwhalError

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and the answer is "no" / an operation failed
EXIT_USAGE = 2  # bad configuration or command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="narwhal", description="Agentless CI: pipelines as YAML, runners over SSH, steps in Docker.")
    parser.add_argument("--version", action="version", version=f"narwhal {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    check = commands.add_parser("check", help="validate the inventory and pipelines", description="Validate inventory.yaml and pipelines/*.yaml and show which runners can take each pipeline.")
    add_config_option(check)
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.set_defaults(func=cmd_check)
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
        render_check(summary, Console())
    return EXIT_OK


def render_check(summary: dict, console: Console) -> None:
    """Runners, pipelines with the runners that can take them, then warnings."""
    runners = Table(title="runners", title_justify="left")
    for column in ("name", "transport", "host", "labels", "capacity"):
        runners.add_column(column)
    for r in summary["runners"]:
        host = "-" if r["transport"] == "local" else r["host"]
        runners.add_row(*map(escape, (r["name"], r["transport"], host, ", ".join(r["labels"]), str(r["capacity"]))))
    pipelines = Table(title="pipelines", title_justify="left")
    for column in ("name", "repo", "branches", "steps", "runners"):
        pipelines.add_column(column)
    for p in summary["pipelines"]:
        pipelines.add_row(
            escape(p["name"]),
            escape(", ".join(p["repo"])),
            escape(", ".join(p["branches"])) if p["branches"] is not None else "(all)",
            escape(", ".join(p["steps"])),
            escape(", ".join(p["runners"])) or "[yellow](none)[/]",
        )
    console.print(runners)
    console.print(pipelines)
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}", markup=True, highlight=False, soft_wrap=True)
    n_runners, n_pipelines = len(summary["runners"]), len(summary["pipelines"])
    console.print(f"config ok: {n_runners} runner{'s' * (n_runners != 1)}, {n_pipelines} pipeline{'s' * (n_pipelines != 1)}", highlight=False)


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
    except NarwhalError as e:
        print(f"narwhal: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("narwhal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
