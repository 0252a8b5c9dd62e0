"""What ``narwhal check`` tells about the runners beyond the YAML: files they name on the
dispatcher's host (a key, a known_hosts file) that are not there, and, from what the runners
answered (``narwhal.execution.probe``), images no runner able to take a pipeline holds."""

from __future__ import annotations

import os
from pathlib import Path

from narwhal.config.loader import Config
from narwhal.config.settings import INVENTORY_FILE
from narwhal.config.yamlfile import Document, load_yaml
from narwhal.errors import ConfigError, Problem


def file_warnings(config: Config) -> list[Problem]:
    """A runner's ``key`` or ``known_hosts`` file that does not exist (it could not connect)."""
    document = _document(config)
    out = []
    for i, runner in enumerate(config.runners):
        if runner.is_local:
            continue
        for field, value, why in (("key", runner.key, "the runner cannot log in with it"),
                                  ("known_hosts", runner.known_hosts, "the runner's host key cannot be checked, "
                                                                     "so it is refused")):
            if value is None:
                continue
            path = Path(os.path.expanduser(value))
            if path.exists():
                continue
            line = _line(document, i, field)
            out.append(Problem(INVENTORY_FILE, line, f"runners[{i}].{field}", f"file not found: {path} ({why})"))
    return out


def _document(config: Config) -> Document | None:
    if config.config_dir is None:
        return None
    try:
        return load_yaml(config.config_dir / INVENTORY_FILE, INVENTORY_FILE)
    except ConfigError:
        return None


def _line(document: Document | None, index: int, field: str) -> int | None:
    """The line that set a runner's field: its own, else the defaults' (None when neither did)."""
    if document is None:
        return None
    lines = document.lines
    return lines.get(("runners", index, field)) or lines.get(("defaults", field)) or document.line_of(("runners", index))


def wanted_images(config: Config) -> dict[str, list[str]]:
    """For each inventory runner, the images of the pipelines it can take."""
    out: dict[str, set[str]] = {r.name: set() for r in config.runners}
    for pipeline in config.pipelines:
        images = {pipeline.image_for(step) for step in pipeline.steps}
        for runner in config.runners_for(pipeline):
            out[runner.name] |= images
    return {name: sorted(images) for name, images in out.items()}


def image_warnings(config: Config, present: dict[str, set[str]], unreachable: dict[str, str],
                   only_answered: bool = False) -> list[Problem]:
    """An image that none of the runners able to take its pipeline holds (as far as they said):
    its first job pulls it, which fails where no registry can be reached. ``only_answered``:
    not for a pipeline one of whose runners did not answer (it may have the image)."""
    out = []
    for pipeline in config.pipelines:
        runners = config.runners_for(pipeline)
        if only_answered and any(r.name in unreachable for r in runners):
            continue
        for image in sorted({pipeline.image_for(step) for step in pipeline.steps}):
            if not runners or any(image in present.get(r.name, set()) for r in runners):
                continue
            said = "; ".join(f"{r.name}: unreachable ({unreachable[r.name]})" if r.name in unreachable
                             else f"{r.name}: not there" for r in runners)
            where = ("image",) if pipeline.image == image else next(
                ("steps", i, "image") for i, step in enumerate(pipeline.steps) if step.image == image)
            file, line = pipeline.where(where)
            out.append(Problem(file or pipeline.name, line, ".".join(map(str, where)),
                               f"image {image} is on none of the runners that take pipeline {pipeline.name} "
                               f"({said}); its first job pulls it, which fails without a registry"))
    return out
