"""Test images beyond the busybox one, built with ``docker import`` (no registry is reachable).

``ensure_git_image()``: the busybox root filesystem plus the host's own ``/usr/bin/git`` and
the shared libraries ``ldd`` names for it (and the dynamic loader), so a step can run
``git describe``, ``git log`` and ``git status`` (builtins of the one binary; nothing of
``/usr/lib/git-core`` is needed for them). Cached by tag: the tag carries the git version
and a digest of the binary, so a host whose git changed gets a new image.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile

from narwhal.cli.engine import (
    _build_busybox_rootfs,
    _docker_import,
    _image_exists,
    _static_busybox,
    ensure_apt_packages,
    ensure_docker,
    locked,
    say,
)

GIT = "/usr/bin/git"
GIT_IMAGE_REPO = "narwhal-test/git"


def _libraries(binary: str) -> list[str]:
    """The files ``ldd BINARY`` resolves (libraries and the loader), as absolute paths."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True, timeout=30).stdout
    found = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match and os.path.exists(match.group(1)):
            found.append(match.group(1))
    return found


def git_image_tag() -> str:
    """``narwhal-test/git:VERSION-DIGEST`` of the host's git."""
    ensure_apt_packages({GIT: "git"})
    version = subprocess.run([GIT, "--version"], capture_output=True, text=True, check=True).stdout.split()[-1]
    with open(GIT, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return f"{GIT_IMAGE_REPO}:{re.sub(r'[^A-Za-z0-9_.-]', '_', version)}-{digest}"


def _copy(path: str, root: str) -> None:
    """PATH into ROOT at the same place (a symlinked library as its target's contents)."""
    target = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(os.path.realpath(path), target)
    os.chmod(target, 0o755)


def ensure_git_image() -> str:
    """Make the busybox + git test image exist; its name."""
    ensure_docker()
    name = git_image_tag()
    if _image_exists(name):
        return name
    with locked("image"):
        if _image_exists(name):
            return name
        busybox = _static_busybox()
        say(f"building the image {name} from {busybox} and {GIT} (docker import)")
        with tempfile.TemporaryDirectory(prefix="narwhal-rootfs-") as root:
            _build_busybox_rootfs(busybox, root)
            for path in [GIT, *_libraries(GIT)]:
                _copy(path, root)
            _docker_import(root, name)
    return name
