"""``narwhal demo``: narwhal's main job on a fresh machine, in one command.

The pieces live here; ``cli.py`` strings them together (and turns errors into exit
codes). The demo always writes its own config directory (``--dir``, default
``./narwhal-demo``) with the embedded default below: one ``local`` transport runner
and the example pipeline. It never reads or changes any other config, so running it
from a checkout or anywhere else gives the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

from narwhal.api.server import ServeProcess
from narwhal.cli import engine
from narwhal.cli.gitrepo import add_commit, make_git_repo

DEFAULT_DIR = "narwhal-demo"

DEFAULT_INVENTORY = {
    "runners": [{"name": "local", "transport": "local", "capacity": 2}],
}


def example_pipeline(image: str = engine.BUSYBOX_IMAGE) -> dict:
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


def write_config(root: Path, image: str = engine.BUSYBOX_IMAGE) -> Path:
    """ROOT/config with inventory.yaml and pipelines/example.yaml; returns the config dir.

    The demo builds ROOT/repo, so ROOT is the one local root it allows."""
    config = root / "config"
    (config / "pipelines").mkdir(parents=True, exist_ok=True)
    inventory = {**DEFAULT_INVENTORY, "settings": {"local_roots": [str(root.resolve())]}}
    (config / "inventory.yaml").write_text(
        "# narwhal demo: one runner that runs steps on this machine's Docker engine;\n"
        "# it may build the local repositories under its own folder\n"
        + yaml.safe_dump(inventory, sort_keys=False)
    )
    (config / "pipelines" / "example.yaml").write_text(
        "# narwhal demo: every repository, two steps\n" + yaml.safe_dump(example_pipeline(image), sort_keys=False)
    )
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
