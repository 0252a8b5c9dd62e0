"""``narwhal demo``: narwhal's main job on a fresh machine, in one command.

The pieces live here; ``narwhal.cli.commands.demo`` strings them together (and turns errors into exit
codes). The demo always writes its own config directory (``--dir``, default
``./narwhal-demo``): one ``local`` transport runner and the README's example pipeline
(``narwhal.cli.starter``). It never reads or changes any other config, so running it
from a checkout or anywhere else gives the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from narwhal.api.server import ServeProcess
from narwhal.cli import engine, starter
from narwhal.cli.gitrepo import add_commit, make_git_repo

DEFAULT_DIR = "narwhal-demo"

DEMO_FILES = {
    "README.md": "# narwhal demo\n\nA tiny repository the demo builds.\n",
    "build.sh": "#!/bin/sh\necho hello from the narwhal demo\n",
}


def write_config(root: Path, image: str = engine.BUSYBOX_IMAGE) -> Path:
    """ROOT/config with inventory.yaml and pipelines/example.yaml (the README's example
    pipeline, ``narwhal.cli.starter``); returns the config dir.

    The demo builds ROOT/repo, so ROOT is the one local root it allows."""
    config = root / "config"
    (config / "pipelines").mkdir(parents=True, exist_ok=True)
    (config / "inventory.yaml").write_text(starter.local_inventory(
        [str(root.resolve())],
        "# narwhal demo: one runner that runs steps on this machine's Docker engine;\n"
        "# it may build the local repositories under its own folder\n"))
    (config / "pipelines" / "example.yaml").write_text(starter.example_pipeline(image))
    return config


def make_repo(root: Path) -> tuple[str, str]:
    """A fresh git repository under ROOT (a new commit on each run); (path, sha)."""
    path = root / "repo"
    if (path / ".git").is_dir():
        sha = add_commit(str(path), {"run.txt": f"{time.time()}\n"}, "demo run")
        return str(path), sha
    return make_git_repo(str(path), DEMO_FILES)


def prepare_engine(say: Callable[[str], None]) -> str:
    """Docker engine up and the demo image present; ``say`` announces whatever is installed or started."""
    engine.say = say
    engine.ensure_docker()
    return engine.ensure_image()


def dispatcher(root: Path, config_dir: Path, port: int) -> ServeProcess:
    """The demo's dispatcher: a child process logging to ROOT/dispatcher.log (no token: loopback)."""
    return ServeProcess(config_dir=config_dir, state_dir=root / "state", port=port,
                        log_path=root / "dispatcher.log")
