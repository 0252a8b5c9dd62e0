"""``narwhal check`` (the config directory, validated and summarised) and ``narwhal schema``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from narwhal.cli import report
from narwhal.cli.common import EXIT_OK, UsageError, add_command, add_config_option, config_dir
from narwhal.config import reference
from narwhal.config.loader import load_config, summarize

SCHEMA_EPILOG = """\
examples:
  narwhal schema pipeline > .narwhal/pipeline.schema.json
  narwhal schema inventory --output .narwhal/inventory.schema.json
Editors that read JSON Schema complete and check the YAML with it; for VS Code's YAML
extension, map the files in .vscode/settings.json (README.md, "Editors").
"""


def register(commands: Any) -> None:
    check = add_command(commands, "check", "validate the inventory and pipelines", cmd_check,
                        description="Validate inventory.yaml and pipelines/*.yaml and show which runners "
                                    "can take each pipeline.")
    add_config_option(check)
    check.add_argument("--json", action="store_true", help="print the summary as JSON")

    schema = add_command(commands, "schema", "JSON Schema of pipeline or inventory files, for editors",
                         cmd_schema, epilog=SCHEMA_EPILOG)
    schema.add_argument("kind", choices=reference.KINDS, metavar="KIND", help="pipeline or inventory")
    schema.add_argument("--output", "-o", metavar="FILE", type=Path, default=None,
                        help="write it to FILE instead of printing it")


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


def cmd_schema(args: argparse.Namespace) -> int:
    """The JSON Schema of a pipeline or the inventory, derived from the models."""
    text = json.dumps(reference.schema(args.kind), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        args.output.write_text(text)
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
    print(f"wrote {args.output}")
    return EXIT_OK
