"""Secrets: credentials declared on the dispatcher host, handed to the steps that may have them.

``inventory.yaml`` names each secret and where its value lives, a file or an
environment variable of the dispatcher, never the value itself::

    secrets:
      DEPLOY_TOKEN:
        file: /etc/narwhal/secrets/deploy_token
        repos: ["https://git.example.com/team/*"]
        branches: [main]
        events: [push, tag]
      PYPI_TOKEN: {env: NARWHAL_PYPI_TOKEN}

Scope: ``repos`` and ``branches`` are globs (none means any); ``events`` defaults to
every event except ``pull_request``, since a pull request runs code its author wrote.
A pipeline asks for secrets by name (``secrets: [DEPLOY_TOKEN]``); whether a job may
have one is decided here (``refusal``), at submission and again when the job starts.

Values are read when the config is loaded (and re-read on reload), kept in memory
only, and never shown: ``Secret.__repr__`` leaves the value out, and every message
here names the secret and its source, not what was read.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from narwhal.config.repository import RepositoryError, canonical_pattern, glob_match
from narwhal.config.yamlfile import Document, format_path, line_order, matching, show_value, validation_problems
from narwhal.errors import ConfigError, Problem
from narwhal.job import EVENTS

SECRET_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
RESERVED = re.compile(r"(?:CI|HOME|PATH|HOSTNAME|NARWHAL_.*)")  # set by narwhal or the container
MIN_LENGTH = 8  # shorter values would mask ordinary words in every log
MAX_BYTES = 64 * 1024
DEFAULT_EVENTS = tuple(e for e in EVENTS if e != "pull_request")
MASKED_MODE_BITS = stat.S_IRWXG | stat.S_IRWXO  # a secret file readable by others is reported


def check_secret_name(value: str) -> str:
    matching(SECRET_NAME_RE, "a secret name of letters, digits and '_' (not starting with a digit, "
                             "at most 64)")(value)
    if RESERVED.fullmatch(value):
        raise ValueError(f"{value!r} is reserved for narwhal's own variables")
    return value


SecretName = Annotated[str, AfterValidator(check_secret_name)]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _check_repo(value: str) -> str:
    if not value or any(ord(c) < 32 for c in value) or len(value) > 1024:
        raise ValueError(f"expected a repository URL, path or glob, got {show_value(value)}")
    try:
        return canonical_pattern(value)
    except RepositoryError as e:
        raise ValueError(str(e)) from None


def _check_branch(value: str) -> str:
    if not value or any(c.isspace() or ord(c) < 32 for c in value) or len(value) > 255:
        raise ValueError(f"expected a branch name or glob without spaces, got {show_value(value)}")
    return value


def _check_event(value: str) -> str:
    if value not in EVENTS:
        raise ValueError(f"expected one of {', '.join(EVENTS)}, got {show_value(value)}")
    return value


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def _check_env(value: str) -> str:
    if not _ENV_NAME_RE.fullmatch(value):  # not echoed: it may be the value, pasted in the wrong place
        raise ValueError("expected the name of an environment variable of the dispatcher (letters, digits "
                         "and '_', at most 255), got something else (not shown: it may be the secret's value)")
    return value


def _check_file(value: str) -> str:
    if not value or "\x00" in value or len(value) > 4096:
        raise ValueError(f"expected a file path, got {show_value(value)}")
    return value


class SecretSpec(BaseModel):
    """Where one secret's value is read from, and who may have it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    file: Annotated[str, AfterValidator(_check_file)] | None = None
    env: Annotated[str, AfterValidator(_check_env)] | None = None
    repos: Annotated[list[Annotated[str, AfterValidator(_check_repo)]] | None, BeforeValidator(_as_list)] = None
    branches: Annotated[list[Annotated[str, AfterValidator(_check_branch)]] | None, BeforeValidator(_as_list)] = None
    events: Annotated[list[Annotated[str, AfterValidator(_check_event)]], BeforeValidator(_as_list)] = list(DEFAULT_EVENTS)

    @model_validator(mode="after")
    def _one_source(self) -> SecretSpec:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file: PATH or env: VARIABLE")
        return self

    @property
    def source(self) -> str:
        """Where the value comes from, for messages and listings (never the value)."""
        return f"file {self.file}" if self.file is not None else f"environment variable {self.env}"

    def scope(self) -> dict:
        return {"repos": self.repos, "branches": self.branches, "events": list(self.events)}


@dataclass(frozen=True)
class Secret:
    """A secret's name, its declaration and its value (left out of repr and equality)."""

    name: str
    spec: SecretSpec
    value: str = field(repr=False, compare=False)

    def refusal(self, repo: str, branch: str | None, event: str, off_branch: str | None = None) -> str | None:
        """Why a job of canonical ``repo``/``branch`` started by ``event`` may not have it, or None.

        ``off_branch`` is the job's commit when it is not on ``branch`` (a caller named the
        branch with a commit that the branch does not contain): no branch-limited secret then."""
        spec, name = self.spec, self.name
        if event not in spec.events:
            return (f"secret {name} is not available to {event} events "
                    f"(secrets.{name}.events allows {', '.join(spec.events)})")
        if spec.repos is not None and not any(glob_match(p, repo) for p in spec.repos):
            return f"secret {name} is not available to repository {repo} (secrets.{name}.repos)"
        if spec.branches is not None and (branch is None
                                          or not any(fnmatchcase(branch, p) for p in spec.branches)):
            on = f"branch {branch}" if branch is not None else "a job without a branch"
            return f"secret {name} is not available to {on} (secrets.{name}.branches)"
        if spec.branches is not None and off_branch is not None:
            return (f"secret {name} is not available to commit {off_branch[:12]}: it is not on branch {branch} "
                    f"(secrets.{name}.branches; submit the branch without a commit to build its head)")
        return None


Secrets = Mapping[str, Secret]


def parse_secrets(raw: Any, filename: str, document: Document | None, base_dir: Path,
                  environ: Mapping[str, str] | None = None) -> tuple[dict[str, Secret], list[Problem]]:
    """Validate the ``secrets:`` mapping and read every value.

    Returns the secrets and warnings (loose file permissions); raises ConfigError for
    anything that keeps a secret from being read. Relative files are under ``base_dir``.
    """
    environ = os.environ if environ is None else environ
    if raw is None:
        return {}, []
    where = _locator(filename, document)
    if not isinstance(raw, dict):
        raise ConfigError([where(("secrets",), f"expected a mapping of names to sources, got {show_value(raw)}")])
    problems: list[Problem] = []
    warnings: list[Problem] = []
    secrets: dict[str, Secret] = {}
    for name, body in raw.items():
        path = ("secrets", name)
        try:
            check_secret_name(name) if isinstance(name, str) else _not_a_name(name)
        except ValueError as e:
            problems.append(where(path, str(e)))
            continue
        if isinstance(body, str):  # not echoed: most likely the value itself
            problems.append(where(path, "expected a mapping such as {file: PATH} or {env: VARIABLE}, got a string "
                                        "(not shown: a secret's value never goes in inventory.yaml; put it in a "
                                        "file, or the dispatcher's environment, and name that)"))
            continue
        try:
            spec = SecretSpec.model_validate(body)
        except ValidationError as e:
            problems += validation_problems(e, SecretSpec, filename, document, path)
            continue
        try:
            value, warning = _read(name, spec, base_dir, environ)
        except ValueError as e:
            problems.append(where(path + (("file",) if spec.file is not None else ("env",)), str(e)))
            continue
        if warning is not None:
            warnings.append(where(path + ("file",), warning))
        secrets[name] = Secret(name, spec, value)
    if problems:
        raise ConfigError(sorted(problems, key=line_order))
    return secrets, warnings


def _not_a_name(name: object) -> None:
    raise ValueError(f"expected a secret name, got {show_value(name)}")


def _locator(filename: str, document: Document | None):  # noqa: ANN202 - a small closure
    def where(path: tuple, message: str) -> Problem:
        line = document.line_of(path) if document is not None else None
        return Problem(filename, line, format_path(path), message)
    return where


def _read(name: str, spec: SecretSpec, base_dir: Path, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """The value and a warning (or None). Messages name the source, never what was read."""
    warning = None
    if spec.env is not None:
        if spec.env not in environ:
            # Named only when it reads like a variable's name: a lowercase one may be a pasted token.
            shown = spec.env if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,63}", spec.env) else "(not shown: it may be a value)"
            raise ValueError(f"secret {name}: environment variable {shown} is not set")
        data = environ[spec.env].encode("utf-8", "surrogateescape")
    else:
        assert spec.file is not None
        path = Path(spec.file)
        path = path if path.is_absolute() else base_dir / path
        data, mode = _read_file(name, path)
        if mode & MASKED_MODE_BITS:
            warning = (f"secret {name}: file {path} can be read by others (mode {stat.S_IMODE(mode):04o}); "
                       f"make it private: chmod 600 {path}")
        if data.count(b"\n") == 1 and data.endswith(b"\n"):  # `echo TOKEN > file`: one line, no newline
            data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    return _value(name, data), warning


def _read_file(name: str, path: Path) -> tuple[bytes, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise ValueError(f"secret {name}: cannot read file {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"secret {name}: {path} is not a regular file")
        if info.st_size > MAX_BYTES:
            raise ValueError(f"secret {name}: file {path} is larger than {MAX_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise ValueError(f"secret {name}: file {path} is larger than {MAX_BYTES} bytes")
    return data, info.st_mode


def _value(name: str, data: bytes) -> str:
    if len(data) > MAX_BYTES:
        raise ValueError(f"secret {name}: the value is larger than {MAX_BYTES} bytes")
    if b"\x00" in data:
        raise ValueError(f"secret {name}: the value contains a NUL byte, which no environment variable can hold")
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"secret {name}: the value is not UTF-8 text (base64-encode binary secrets)") from None
    if len(value.strip()) < MIN_LENGTH:
        raise ValueError(f"secret {name}: the value is {len(value.strip())} characters long; at least {MIN_LENGTH} "
                         "are needed, since masking a shorter value would hide ordinary text in logs")
    return value


@dataclass(frozen=True)
class Grant:
    """What one job gets: the values it may have, and why it may not run (or None)."""

    values: Mapping[str, str] = field(repr=False)
    refused: str | None = None
    withheld: tuple[str, ...] = ()  # optional secrets left out, by name


def grant(secrets: Secrets, wanted: list[str], required: list[str], repo: str, branch: str | None,
          event: str, off_branch: str | None = None) -> Grant:
    """The secrets a job of ``repo``/``branch`` started by ``event`` gets out of ``wanted``
    (``off_branch``: its commit, when that is not on ``branch``; see ``Secret.refusal``).

    A ``required`` one it may not have refuses the job (the first reason found); an
    optional one is withheld. A name no longer declared (a reload removed it) counts as
    may-not-have.
    """
    values: dict[str, str] = {}
    withheld: list[str] = []
    for name in wanted:
        secret = secrets.get(name)
        why = (f"secret {name} is no longer declared in inventory.yaml" if secret is None
               else secret.refusal(repo, branch, event, off_branch))
        if why is None:
            assert secret is not None
            values[name] = secret.value
        elif name in required:
            return Grant({}, why)
        else:
            withheld.append(name)
    return Grant(values, None, tuple(withheld))


def overview(secrets: Secrets, users: Mapping[str, list[str]],
             uses: Mapping[str, list[str]] | None = None) -> list[dict]:
    """Names, sources, scopes, the pipelines that ask for each and what narwhal itself uses
    it for (``uses``: fetching a repository, a forge's token or webhook secret): never a value."""
    return [{"name": name, "source": secret.spec.source, **secret.spec.scope(),
             "pipelines": list(users.get(name, [])), "used_by": list((uses or {}).get(name, []))}
            for name, secret in sorted(secrets.items())]
