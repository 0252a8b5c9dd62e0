"""Noticing that a config directory changed: what ``narwhal serve`` watches to reload by itself.

``snapshot(config_dir, extra)`` is what the config is made of, cheaply: the content hash of
``inventory.yaml`` and of each pipeline file ``load_pipelines`` would read, and the
``stat`` of other files the config reads (secret files), so a rotated secret counts too.
``changes(old, new)`` says in a few words what differs, for the dispatcher's log.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from narwhal.config.loader import PIPELINES_DIR, Config
from narwhal.config.pipeline import pipeline_files
from narwhal.config.settings import INVENTORY_FILE

Snapshot = dict[str, str]  # name as shown (relative to the config dir when inside it) -> digest


def snapshot(config_dir: str | os.PathLike, extra: Iterable[str | os.PathLike] = ()) -> Snapshot:
    """What the config directory's files hold now (missing files are left out)."""
    root = Path(config_dir)
    out: Snapshot = {}
    files = [root / INVENTORY_FILE]
    pipelines = root / PIPELINES_DIR
    if pipelines.is_dir():
        try:
            files += pipeline_files(pipelines)
        except OSError:
            pass
    for path in files:
        try:
            out[_shown(root, path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            continue
    for path in map(Path, extra):
        try:
            st = path.stat()
        except OSError:
            continue
        out[_shown(root, path)] = f"stat:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_mode}"
    return out


def secret_files(config: Config) -> list[Path]:
    """The files the config's secrets are read from (relative ones under the config dir)."""
    base = config.config_dir or Path(".")
    out = []
    for secret in config.secrets.values():
        if secret.spec.file is not None:
            path = Path(secret.spec.file)
            out.append(path if path.is_absolute() else base / path)
    return out


def changes(old: Snapshot, new: Snapshot) -> str:
    """``pipelines/new.yaml added, inventory.yaml changed``; empty when nothing changed."""
    parts = [f"{name} added" for name in sorted(new.keys() - old.keys())]
    parts += [f"{name} changed" for name in sorted(old.keys() & new.keys()) if old[name] != new[name]]
    parts += [f"{name} removed" for name in sorted(old.keys() - new.keys())]
    return ", ".join(parts)


def _shown(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
