"""``narwhal check``: the config directory, validated and summarised."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

from narwhal.cli import report
from narwhal.cli.common import EXIT_OK, add_command, add_config_option, config_dir
from narwhal.config.loader import load_config, summarize


def register(commands: Any) -> None:
    check = add_command(commands, "check", "validate the inventory and pipelines", cmd_check,
                        description="Validate inventory.yaml and pipelines/*.yaml and show which runners "
                                    "can take each pipeline.")
    add_config_option(check)
    check.add_argument("--json", action="store_true", help="print the summary as JSON")


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
