"""``narwhal check`` (the config directory, validated and summarised), ``narwhal schema`` and
``narwhal init`` (a starter config)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from narwhal.cli import report, starter
from narwhal.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_command,
    add_config_option,
    config_dir,
    local_repo,
    print_json,
)
from narwhal.config import hosts, reference
from narwhal.config.loader import PIPELINES_DIR, Config, load_config, summarize
from narwhal.config.settings import INVENTORY_FILE
from narwhal.errors import ConfigError, Problem

CHECK_EPILOG = """\
examples:
  narwhal check                       # the current directory (or $NARWHAL_CONFIG)
  narwhal check --offline             # the files alone: no runner is asked
  narwhal check --config /etc/narwhal --runners
  narwhal check --json | jq '.problems // .warnings'
Problems (exit 2) and warnings are file:line: key: message. Warnings: a pipeline no runner
can take, a secret file others can read, a runner's key or known_hosts file that is not
there, and an image none of the runners able to take its pipeline holds: the runners are
asked at once, over SSH as the dispatcher reaches them, and those that do not answer within
5s are named in one line (--runners waits 30s for each and warns about each one; --offline
asks none).
"""
SCHEMA_EPILOG = """\
examples:
  narwhal schema pipeline > .narwhal/pipeline.schema.json
  narwhal schema inventory --output .narwhal/inventory.schema.json
Editors that read JSON Schema complete and check the YAML with it; for VS Code's YAML
extension, map the files in .vscode/settings.json (README.md, "Writing pipelines").
"""
INIT_EPILOG = """\
examples:
  narwhal init                        # ./inventory.yaml and ./pipelines/example.yaml
  narwhal init ci --local-root ~/src  # in ./ci; the repositories under ~/src may be built
It writes one runner that uses this machine's Docker engine and the example pipeline, and
never overwrites a file (--force does). Then: narwhal check, narwhal serve, narwhal submit.
"""
INIT_HINT = "narwhal init writes a starter config"


def register(commands: Any) -> None:
    check = add_command(commands, "check", "validate the inventory and pipelines", cmd_check,
                        description="Validate inventory.yaml and pipelines/*.yaml and show which runners "
                                    "can take each pipeline.", epilog=CHECK_EPILOG)
    add_config_option(check)
    asking = check.add_mutually_exclusive_group()
    asking.add_argument("--runners", action="store_true",
                        help="wait for every runner (30s each) to say whether it has the images its pipelines "
                             "use, and warn about each one that cannot be asked")
    asking.add_argument("--offline", action="store_true",
                        help="ask no runner (by default, the runners that answer within 5s are asked for images)")
    check.add_argument("--json", action="store_true", help="print the summary (or the problems) as JSON")

    schema = add_command(commands, "schema", "JSON Schema of pipeline or inventory files, for editors",
                         cmd_schema, epilog=SCHEMA_EPILOG)
    schema.add_argument("kind", choices=reference.KINDS, metavar="KIND", help="pipeline or inventory")
    schema.add_argument("--output", "-o", metavar="FILE", type=Path, default=None,
                        help="write it to FILE instead of printing it")

    init = add_command(commands, "init", "write a starter config: a runner on this machine, the example "
                       "pipeline", cmd_init, epilog=INIT_EPILOG)
    init.add_argument("dir", metavar="DIR", nargs="?", type=Path, default=Path("."),
                      help="where to write it (default: the current directory)")
    init.add_argument("--local-root", metavar="PATH", action="append", default=None,
                      help="a directory whose git repositories may be built (repeat for more; default: the "
                           "repository around the current directory, else the current directory)")
    init.add_argument("--force", action="store_true", help="overwrite files that exist")


def load(root: Path) -> Config:
    """The config in ROOT; a missing inventory or directory is named in full with the way out."""
    try:
        return load_config(root)
    except ConfigError as exc:
        raise ConfigError([explained(p, root) for p in exc.problems]) from None


def explained(problem: Problem, root: Path) -> Problem:
    """A problem that leaves a newcomer without a next step, given one."""
    where = root.expanduser().absolute()
    if problem.file == INVENTORY_FILE and problem.line is None and problem.message == "file not found":
        return Problem(str(where / INVENTORY_FILE), None, "",
                       f"file not found ({INIT_HINT}: narwhal init {where})")
    if problem.message == "config directory not found":
        return Problem(str(where), None, "", f"config directory not found ({INIT_HINT}: narwhal init {where})")
    return problem


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config directory; print a summary, or the problems (exit 2)."""
    root = config_dir(args)
    try:
        config = load(root)
    except ConfigError as exc:
        if not args.json:
            raise
        print_json({"ok": False, "config_dir": str(root.expanduser().absolute()),
                    "problems": exc.to_dict()["problems"]})
        return EXIT_USAGE
    summary = summarize(config)
    warnings = hosts.file_warnings(config)
    if not args.offline:
        warnings += runner_warnings(config, strict=args.runners)
    summary["warnings"] += [str(w) for w in warnings]
    if args.json:
        print_json({"ok": True, "config_dir": str(root.expanduser().absolute()), **summary})
        return EXIT_OK
    console = Console()
    console.print(report.check_runners(summary))
    console.print(report.check_pipelines(summary))
    if summary["secrets"]:
        console.print(report.secrets_table(summary["secrets"]))
    for warning in summary["warnings"]:
        console.print(report.check_warning(warning), soft_wrap=True)
    console.print(report.check_footer(summary))
    return EXIT_OK


def runner_warnings(config: Config, strict: bool = False) -> list[Problem]:
    """Ask the runners which images they hold, all at once.

    By default each gets QUICK_TIMEOUT seconds, the ones that did not answer are named in one
    line, and an image is flagged only where every runner that could take its pipeline said.
    ``strict`` (``--runners``): PROBE_TIMEOUT seconds each, a warning per runner not reached,
    and an image is flagged when none of the runners that answered has it."""
    wanted = {name: images for name, images in hosts.wanted_images(config).items() if images or strict}
    if not wanted:
        return []
    from narwhal.execution import probe  # the SSH stack only when there is something to ask

    answers = probe.probe_images(wanted, config.runners, config.settings,
                                 timeout=probe.PROBE_TIMEOUT if strict else probe.QUICK_TIMEOUT)
    present = {a.runner: a.present for a in answers}
    unreachable = {a.runner: a.unreachable for a in answers if a.unreachable is not None}
    if strict:
        out = [Problem(INVENTORY_FILE, None, f"runners.{name}", f"not reachable to ask for images: {why}")
               for name, why in sorted(unreachable.items())]
        return out + hosts.image_warnings(config, present, unreachable)
    out = []
    if unreachable:
        named = ", ".join(f"{name} ({why})" for name, why in sorted(unreachable.items()))
        out.append(Problem(INVENTORY_FILE, None, "runners",
                           f"images not checked on {len(unreachable)} runner{'s' if len(unreachable) > 1 else ''} "
                           f"that did not answer within {probe.QUICK_TIMEOUT:g}s: {named} "
                           "(--runners waits longer, --offline asks none)"))
    return out + hosts.image_warnings(config, present, unreachable, only_answered=True)


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


def cmd_init(args: argparse.Namespace) -> int:
    """DIR/inventory.yaml (one local runner) and DIR/pipelines/example.yaml; never over a file."""
    root = args.dir.expanduser().absolute()
    roots = [str(Path(p).expanduser().resolve()) for p in args.local_root or []]
    if not roots:
        roots = [local_repo(".") or str(Path(".").resolve())]
    files = {root / INVENTORY_FILE: starter.local_inventory(roots, STARTER_HEADER),
             root / PIPELINES_DIR / "example.yaml": starter.EXAMPLE_PIPELINE}
    there = [str(path) for path in files if path.exists()]
    if there and not args.force:
        raise UsageError(f"init: {', '.join(there)} {'exist' if len(there) > 1 else 'exists'} already "
                         "(--force overwrites)")
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    except OSError as exc:
        raise UsageError(f"init: cannot write in {root}: {exc.strerror}") from None
    config = load(root)
    shown = "" if root == Path(".").absolute() else f" --config {root}"
    print(f"wrote {root / INVENTORY_FILE} (one runner on this machine's Docker engine; local repositories "
          f"under {', '.join(roots)}) and {root / PIPELINES_DIR / 'example.yaml'}")
    print(f"next:\n  narwhal check{shown}\n  narwhal serve{shown}\n  narwhal submit . HEAD --wait"
          "        # in a repository under a local root")
    for warning in config.warnings:
        print(f"warning: {warning}")
    return EXIT_OK


STARTER_HEADER = """\
# Runner hosts narwhal may use (docs/inventory.md has every key; `narwhal check` validates).
# `local` runs steps with this machine's Docker engine; add SSH hosts as more runners:
#   - {name: build-1, host: build-1.example.com, key: ~/.ssh/narwhal, labels: [linux]}
# local_roots: the directories whose git repositories `narwhal submit` may build.
"""
