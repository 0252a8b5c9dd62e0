"""Real git repositories for the demo (and the tests): make one, add a commit."""

from __future__ import annotations

import contextlib
import os

from narwhal.cli.engine import ensure_apt_packages, run
from narwhal.errors import CommandFailed

# --- git repositories ---------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Narwhal Test", "GIT_AUTHOR_EMAIL": "test@narwhal.invalid",
    "GIT_COMMITTER_NAME": "Narwhal Test", "GIT_COMMITTER_EMAIL": "test@narwhal.invalid",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,  # the developer's config stays out
}
DEFAULT_FILES = {"README.md": "# test repository\n", "build.sh": "#!/bin/sh\necho built\n"}


def _git(repo: str, *args: str) -> str:
    argv = ["git", "-c", "commit.gpgsign=false", *args]
    return run(argv, cwd=repo, env={**os.environ, **GIT_ENV}).stdout.decode().strip()


def _write_files(repo: str, files: dict[str, str | None]) -> None:
    root = os.path.realpath(repo)
    for rel, content in files.items():
        path = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not path.startswith(root + os.sep) or ".git" in rel.split("/"):
            raise ValueError(f"file path {rel!r} must be relative and stay inside the repository")
        if content is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)


def add_commit(path: str, files: dict[str, str | None], message: str = "update") -> str:
    """Write FILES (None deletes one) and commit everything; returns the new commit's sha."""
    _write_files(path, files)
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "--allow-empty", "-m", message)
    return _git(path, "rev-parse", "HEAD")


def make_git_repo(path: str, files: dict[str, str] | None = None, branch: str = "main") -> tuple[str, str]:
    """A real git repository at PATH with one commit of FILES on BRANCH; returns (path, sha)."""
    ensure_apt_packages({"git": "git"})
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    try:
        run(["git", "check-ref-format", "--branch", branch], env={**os.environ, **GIT_ENV})
    except CommandFailed:
        raise ValueError(f"invalid branch name {branch!r}") from None
    _git(path, "init", "-q", "-b", branch)
    sha = add_commit(path, dict(DEFAULT_FILES if files is None else files), "initial commit")
    return path, sha

