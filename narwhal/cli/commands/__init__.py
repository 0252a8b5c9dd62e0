"""The subcommands, one noun per module; each module's ``register(commands)`` adds its own."""

from __future__ import annotations

from narwhal.cli.commands import artifacts, config, demo, jobs, report, runners, serve, submit

# The order of `narwhal --help`: set up, run, submit, look, change.
MODULES = (config, serve, submit, report, runners, jobs, artifacts, demo)
