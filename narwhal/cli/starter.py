"""The example config narwhal ships: what ``narwhal demo`` runs and ``narwhal init`` writes.

``EXAMPLE_PIPELINE`` is, byte for byte, the checkout's ``pipelines/example.yaml`` that the
README names (a test holds them together), so what the demo runs is what the README shows.
"""

from __future__ import annotations

import yaml

from narwhal.cli import engine

EXAMPLE_PIPELINE = """\
# An example pipeline: runs for every repository and branch.
# Each step runs with `/bin/sh -e` in /workspace, which holds the commit's files.
# The name defaults to the file name ("example").
repo: "*"
image: narwhal-test/busybox:latest   # the local busybox test image (built by the demo)
labels: [linux]
timeout: 10m
steps:
  - name: list
    run: |
      ls -la
      echo "checked by narwhal" > .narwhal-example
  - name: count
    timeout: 1m
    run: |
      grep -q narwhal .narwhal-example
      echo "source lines:"
      find . -type f ! -name .narwhal-example ! -path './.git/*' -exec cat {} + | wc -l
"""
EXAMPLE_IMAGE = engine.BUSYBOX_IMAGE


def example_pipeline(image: str = EXAMPLE_IMAGE) -> str:
    """The example pipeline's text, with IMAGE in place of the test image when it differs."""
    if image == EXAMPLE_IMAGE:
        return EXAMPLE_PIPELINE
    return EXAMPLE_PIPELINE.replace(f"image: {EXAMPLE_IMAGE}   # the local busybox test image (built by the demo)",
                                    f"image: {yaml.safe_dump(image).strip()}")


def local_inventory(local_roots: list[str], header: str) -> str:
    """An inventory with one runner on this machine's Docker engine (labels linux, docker)
    that may build the local repositories under LOCAL_ROOTS; HEADER is its opening comment."""
    data = {"runners": [{"name": "local", "transport": "local", "labels": ["linux", "docker"], "capacity": 2}],
            "settings": {"local_roots": list(local_roots)}}
    return header + yaml.safe_dump(data, sort_keys=False)
