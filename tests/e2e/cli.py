"""Running the ``narwhal`` command in end-to-end tests: a subprocess, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CLI = [sys.executable, "-m", "narwhal"]
LOCAL = {"name": "local", "transport": "local", "capacity": 2}


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NARWHAL_")}
    env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "TERM": "dumb"}, **extra)
    env.pop("FORCE_COLOR", None)
    return env


def run(*args: str, timeout: float = 180, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI without a tty; no traceback may ever reach stderr."""
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), stdin=subprocess.DEVNULL, cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout
    return proc


def run_json(*args: str, cwd: str | None = None) -> object:
    proc = run(*args, "--json", cwd=cwd)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return json.loads(proc.stdout)
