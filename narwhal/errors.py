"""Every error narwhal raises on purpose derives from NarwhalError.

Only the edges translate them: ``cli.py`` into an exit status and one line,
``api.py`` into a JSON body with an HTTP status (``http_status`` below).
"""

from __future__ import annotations

from dataclasses import dataclass


class NarwhalError(Exception):
    """Root of narwhal's domain errors."""

    http_status = 500

    def to_dict(self) -> dict:
        return {"error": str(self)}


# --- configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a config file: where it is and what is wrong."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(NarwhalError):
    """A config file (inventory or pipeline) is invalid; carries every problem found."""

    http_status = 422

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def to_dict(self) -> dict:
        return {
            "error": "invalid configuration",
            "problems": [
                {"file": p.file, "line": p.line, "path": p.path, "message": p.message}
                for p in self.problems
            ],
        }


# --- API input ---------------------------------------------------------------------


class BadRequest(NarwhalError):
    http_status = 400


class Unauthorized(NarwhalError):
    http_status = 401


class NotFound(NarwhalError):
    http_status = 404


class Conflict(NarwhalError):
    http_status = 409


class Gone(NarwhalError):
    """It was here and is no more (an artifact past its expiry)."""

    http_status = 410


class Unprocessable(NarwhalError):
    """Well-formed input that narwhal cannot act on (no pipeline matches, unknown commit)."""

    http_status = 422


class PayloadTooLarge(NarwhalError):
    http_status = 413


# --- source ------------------------------------------------------------------------


class SourceError(Unprocessable):
    """The repository cannot be fetched, or the commit is not in it."""


# --- runners -----------------------------------------------------------------------


class RunnerError(NarwhalError):
    """Infrastructure failure on a runner: the job is not to blame and may be retried."""

    http_status = 503
    retryable = True


class RunnerUnreachable(RunnerError):
    """SSH connection could not be made or was lost."""


class HostKeyMismatch(RunnerUnreachable):
    """The runner's host key is unknown or changed: refused, never accepted silently."""

    retryable = False


class DockerUnavailable(RunnerError):
    """The Docker CLI or engine on the runner does not answer."""


class ImageNotFound(RunnerError):
    """The step's image is not on the runner (and cannot be pulled)."""

    retryable = False


class DiskFull(RunnerError):
    """No space left on the runner's Docker data directory."""


class CommandFailed(NarwhalError):
    """A narwhal-issued command (not a user's step) exited non-zero."""

    def __init__(self, argv: list[str], exit_status: int | None, output: str = ""):
        self.argv = list(argv)
        self.exit_status = exit_status
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-10:])
        shown = redact_argv(argv)
        msg = f"command {shown[:4]!r}... exited {exit_status}" if len(argv) > 4 else f"command {shown!r} exited {exit_status}"
        super().__init__(msg + (f":\n{tail}" if tail else ""))


def redact_argv(argv: list[str]) -> list[str]:
    """ARGV fit for an error or a log line: ``-e``/``--env NAME=VALUE`` keep the NAME only."""
    shown: list[str] = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] in ("-e", "--env") and "=" in arg:
            arg = arg.split("=", 1)[0] + "=***"
        elif arg.startswith("--env=") and arg.count("=") > 1:
            arg = "--env=" + arg[6:].split("=", 1)[0] + "=***"
        elif arg.startswith("-e") and not arg.startswith("--") and "=" in arg:
            arg = arg.split("=", 1)[0] + "=***"
        shown.append(arg)
    return shown
