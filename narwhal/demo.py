"""``narwhal demo``: narwhal's main job on a fresh machine, in one command.

The pieces live here; ``cli.py`` strings them together (and turns errors into exit
codes). The demo always writes its own config directory (``--dir``, default
``./narwhal-demo``) with the embedded default below: one ``local`` transport runner
and the example pipeline. It never reads or changes any other config, so running it
from a checkout or anywhere else gives the same result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from narwhal import testbed
from narwhal.errors import NarwhalError

DEFAULT_DIR = "narwhal-demo"

DEFAULT_INVENTORY = {
    "runners": [{"name": "local", "transport": "local", "capacity": 2}],
}


def example_pipeline(image: str = testbed.TEST_IMAGE) -> dict:
    """The example pipeline: build then test, in the small busybox image."""
    return {
        "repo": "*",
        "image": image,
        "steps": [
            {"name": "build", "run": "echo building $NARWHAL_COMMIT; sh build.sh > built.txt; cat built.txt"},
            {"name": "test", "run": "test -s built.txt && echo tests passed"},
        ],
    }


DEMO_FILES = {
    "README.md": "# narwhal demo\n\nA tiny repository the demo builds.\n",
    "build.sh": "#!/bin/sh\necho hello from the narwhal demo\n",
}


class DemoError(NarwhalError):
    """The demo could not set itself up (the dispatcher did not start, the port is taken...)."""


def write_config(root: Path, image: str = testbed.TEST_IMAGE) -> Path:
    """ROOT/config with inventory.yaml and pipelines/example.yaml; returns the config dir."""
    config = root / "config"
    (config / "pipelines").mkdir(parents=True, exist_ok=True)
    (config / "inventory.yaml").write_text(
        "# narwhal demo: one runner that runs steps on this machine's Docker engine\n"
        + yaml.safe_dump(DEFAULT_INVENTORY, sort_keys=False)
    )
    (config / "pipelines" / "example.yaml").write_text(
        "# narwhal demo: every repository, two steps\n" + yaml.safe_dump(example_pipeline(image), sort_keys=False)
    )
    return config


def make_repo(root: Path) -> tuple[str, str]:
    """A fresh git repository under ROOT (a new commit on each run); (path, sha)."""
    path = root / "repo"
    if (path / ".git").is_dir():
        sha = testbed.add_commit(str(path), {"run.txt": f"{time.time()}\n"}, "demo run")
        return str(path), sha
    return testbed.make_git_repo(str(path), DEMO_FILES)


def prepare_engine() -> str:
    """Docker engine up and the test image present (installs what is missing as root on Debian)."""
    testbed.ensure_docker()
    return testbed.ensure_image()


@dataclass
class DemoDispatcher:
    """``python -m narwhal serve`` as a child process, logging to ROOT/dispatcher.log."""

    config_dir: Path
    state_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "DemoDispatcher":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("NARWHAL_TOKEN", None)  # loopback demo: no token
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "narwhal", "serve", "--config", str(self.config_dir),
                 "--state", str(self.state_dir), "--listen", f"127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # Ctrl-C reaches the demo, which then stops this cleanly
            )
        deadline = time.monotonic() + timeout
        session = requests.Session()
        session.trust_env = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"the dispatcher exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if session.get(self.url + "/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise DemoError(f"the dispatcher did not answer on {self.url} within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def dispatcher(root: Path, config_dir: Path, port: int) -> DemoDispatcher:
    return DemoDispatcher(config_dir=config_dir, state_dir=root / "state", port=port,
                          log_path=root / "dispatcher.log")
