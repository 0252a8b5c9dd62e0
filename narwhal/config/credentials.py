"""Repository credentials: what the dispatcher fetches private repositories with.

``inventory.yaml`` lists them under ``repos:``, each naming a declared secret, never
holding a value::

    repos:
      - url: "https://git.example.com/team/*"   # a repository glob, canonical spelling
        token: GIT_TOKEN                         # sent as HTTP Basic USERNAME:TOKEN
        username: oauth2                         # default x-access-token; or `auth: bearer`
      - url: "ssh://git@git.example.com/team/app.git"
        ssh_key: DEPLOY_KEY                      # an unencrypted OpenSSH private key
        known_hosts: /etc/narwhal/known_hosts    # default ~/.ssh/known_hosts

A forge with a ``token`` and ``fetch: true`` lends it to the https repositories it
serves. For one repository the first ``repos:`` entry whose ``url`` matches wins, then
the first forge that may fetch it; none means git gets no credential.

A token goes only to https URLs (plain http only on a loopback host) on the one host the
entry names (no globs in the host: a credential belongs to one server); an ssh key only
to ssh URLs. How git is handed either without leaking it is
``narwhal.execution.gitauth``'s business.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator

from narwhal.config.forges import Forge
from narwhal.config.repository import GLOB_CHARS, RepositoryError, canonical_pattern, glob_match, host_of
from narwhal.config.secrets import Secret, SecretName
from narwhal.config.yamlfile import Document, format_path, line_order, matching, show_value, validation_problems
from narwhal.errors import ConfigError, Problem

DEFAULT_USERNAME = "x-access-token"  # GitHub's word for a token; GitLab, Gitea and Forgejo take any name
FORGE_USERNAMES = {"github": "x-access-token", "gitlab": "oauth2", "gitea": "x-access-token",
                   "forgejo": "x-access-token"}
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
USERNAME_RE = re.compile(r"[A-Za-z0-9._@+-]{1,128}")  # no ':' (Basic splits there), no spaces
_PRIVATE_KEY_RE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\r?\n.+-----END [A-Z0-9 ]*PRIVATE KEY-----\s*",
                             re.DOTALL)


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (a port after ``:`` is ignored)."""
    name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _scheme(pattern: str) -> str:
    return pattern.split("://", 1)[0] if "://" in pattern else ""


def _check_url(value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 2048 or any(ord(c) < 32 for c in value):
        raise ValueError(f"expected a repository URL or glob, got {show_value(value)}")
    try:
        pattern = canonical_pattern(value)
    except RepositoryError as e:
        raise ValueError(str(e)) from None
    if _scheme(pattern) not in ("https", "http", "ssh"):
        raise ValueError(f"expected an https:// or ssh:// repository URL or glob (a credential belongs to one "
                         f"server), got {show_value(value)}")
    netloc = pattern.split("://", 1)[1].split("/", 1)[0]
    host = netloc.rsplit("@", 1)[-1]
    if not host or any(c in host for c in GLOB_CHARS):
        raise ValueError(f"name the server without globs (a credential belongs to one server), "
                         f"got {show_value(value)}")
    if "/" not in pattern.split("://", 1)[1]:
        raise ValueError(f"expected a repository path or glob after the host (e.g. '/team/*'), "
                         f"got {show_value(value)}")
    return pattern


def _check_path(value: str) -> str:
    if not value.strip() or "\x00" in value or value.startswith("-") or len(value) > 4096:
        raise ValueError(f"expected a file path, got {show_value(value)}")
    if any(c.isspace() or c in "\"'\\" for c in value):  # ssh splits UserKnownHostsFile at spaces
        raise ValueError(f"expected a file path without spaces or quotes (ssh would split it), "
                         f"got {show_value(value)}")
    return value


RepoGlob = Annotated[str, AfterValidator(_check_url)]
Username = Annotated[str, AfterValidator(matching(USERNAME_RE, "a user name of letters, digits and . _ @ + - "
                                                               "(no ':' or spaces, at most 128)"))]


class RepoAccess(BaseModel):
    """One entry of ``repos:``: which repositories, and the secret that opens them."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: RepoGlob
    token: SecretName | None = None
    username: Username | None = None  # Basic auth's user (default x-access-token)
    auth: Literal["basic", "bearer"] = "basic"
    ssh_key: SecretName | None = None
    known_hosts: Annotated[str, AfterValidator(_check_path)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RepoAccess:
        if (self.token is None) == (self.ssh_key is None):
            raise ValueError("give exactly one of token: SECRET (https) or ssh_key: SECRET (ssh)")
        scheme = _scheme(self.url)
        host = self.url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
        if self.token is not None:
            if scheme == "ssh":
                raise ValueError("a token is for https:// repositories; an ssh:// one takes ssh_key")
            if scheme == "http" and not is_loopback_host(host):
                raise ValueError("a token is sent only over https:// (plain http:// only to a loopback host)")
            if self.known_hosts is not None:
                raise ValueError("known_hosts goes with ssh_key, not with a token")
            if self.auth == "bearer" and self.username is not None:
                raise ValueError("auth: bearer sends the token alone; leave out username")
        else:
            if scheme != "ssh":
                raise ValueError("an ssh_key is for ssh:// repositories; an https:// one takes a token")
            if self.username is not None or self.auth != "basic":
                raise ValueError("username and auth go with a token; an ssh URL names its user itself")
        return self


@dataclass(frozen=True)
class GitCredential:
    """What git gets for one repository: the secret's name and value, and how to send it."""

    kind: Literal["token", "ssh_key"]
    secret: str  # the secret's name, for messages and masks
    value: str = field(repr=False, compare=False)
    source: str = ""  # where it was configured: "repos[0]", "forge github"
    username: str | None = None  # token with Basic auth
    known_hosts: str | None = None  # ssh_key: the file, ~ expanded when used

    @property
    def bearer(self) -> bool:
        return self.kind == "token" and self.username is None

    def describe(self) -> str:
        """For messages: which secret, configured where (never the value)."""
        what = "token" if self.kind == "token" else "ssh key"
        return f"{what} {self.secret} ({self.source})"


def may_carry_token(repo: str) -> bool:
    """Whether a token may go to canonical ``repo``: https, or http on a loopback host."""
    scheme = _scheme(repo)
    return scheme == "https" or (scheme == "http" and is_loopback_host(host_of(repo) or ""))


def credential_for(repo: str, entries: Sequence[RepoAccess], forges: Sequence[Forge],
                   secrets: Mapping[str, Secret]) -> GitCredential | None:
    """The credential git fetches canonical ``repo`` with: the first matching ``repos:`` entry,
    else the first forge with ``fetch: true`` that serves it; None when nothing applies."""
    scheme = _scheme(repo)
    for i, entry in enumerate(entries):
        if not glob_match(entry.url, repo):
            continue
        name = entry.token if entry.token is not None else entry.ssh_key
        secret = secrets.get(name or "")
        if secret is None:  # refused when loaded; a reload that dropped it gives nothing
            return None
        if entry.token is not None and may_carry_token(repo):
            username = None if entry.auth == "bearer" else (entry.username or DEFAULT_USERNAME)
            return GitCredential("token", secret.name, secret.value, f"repos[{i}]", username=username)
        if entry.ssh_key is not None and scheme == "ssh":
            return GitCredential("ssh_key", secret.name, secret.value, f"repos[{i}]",
                                 known_hosts=entry.known_hosts or DEFAULT_KNOWN_HOSTS)
        return None
    if not may_carry_token(repo):
        return None
    for forge in forges:
        if forge.fetch and forge.token is not None and forge.serves(repo):
            secret = secrets.get(forge.token)
            if secret is None:
                return None
            return GitCredential("token", secret.name, secret.value, f"forge {forge.name}",
                                 username=FORGE_USERNAMES[forge.kind])
    return None


def parse_repos(raw: Any, filename: str, document: Document | None,
                secrets: Mapping[str, Secret] | None) -> list[RepoAccess]:
    """Validate ``repos:``; each secret it names must be declared (when ``secrets`` is known)
    and hold what it is used as: a token of one line, or an OpenSSH private key."""
    if raw is None:
        return []

    def where(path: tuple, message: str) -> Problem:
        line = document.line_of(path) if document is not None else None
        return Problem(filename, line, format_path(path), message)

    if not isinstance(raw, list):
        raise ConfigError([where(("repos",), f"expected a list of repository credentials, got {show_value(raw)}")])
    problems: list[Problem] = []
    entries: list[RepoAccess] = []
    for i, item in enumerate(raw):
        try:
            entry = RepoAccess.model_validate(item)
        except ValidationError as e:
            problems += validation_problems(e, RepoAccess, filename, document, ("repos", i))
            continue
        entries.append(entry)
        if secrets is None:
            continue
        field_name = "token" if entry.token is not None else "ssh_key"
        name = getattr(entry, field_name)
        why = secret_problem(name, field_name, secrets)
        if why is not None:
            problems.append(where(("repos", i, field_name), why))
    if problems:
        raise ConfigError(sorted(problems, key=line_order))
    return entries


def secret_problem(name: str, used_as: str, secrets: Mapping[str, Secret]) -> str | None:
    """Why secret NAME cannot be a fetch ``token`` or ``ssh_key``, or None; never shows the value."""
    secret = secrets.get(name)
    if secret is None:
        return f"unknown secret {name!r} (declare it under secrets:)"
    value = secret.value
    if used_as == "ssh_key":
        if not _PRIVATE_KEY_RE.fullmatch(value.strip() + "\n"):
            return (f"secret {name} ({secret.spec.source}) does not hold a private key "
                    "('-----BEGIN ... PRIVATE KEY-----' lines, as ssh-keygen writes them)")
        if _encrypted(value):
            return f"secret {name} ({secret.spec.source}) holds an encrypted key; git cannot type its passphrase"
        return None
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        return (f"secret {name} ({secret.spec.source}) holds spaces, line breaks or control characters; "
                "a token is one word (they would end up in an HTTP header)")
    return None


def _encrypted(key: str) -> bool:
    """A PEM key with ``Proc-Type: 4,ENCRYPTED``, PKCS#8 ``ENCRYPTED PRIVATE KEY``, or an
    OpenSSH key whose cipher is not ``none``."""
    if "ENCRYPTED" in key.split("\n", 2)[0] or "Proc-Type: 4,ENCRYPTED" in key:
        return True
    if "BEGIN OPENSSH PRIVATE KEY" not in key:
        return False
    body = "".join(line.strip() for line in key.strip().splitlines()[1:-1])
    try:
        data = base64.b64decode(body, validate=True)
    except ValueError:
        return False
    magic = b"openssh-key-v1\0"
    if not data.startswith(magic) or len(data) < len(magic) + 4:
        return False
    size = int.from_bytes(data[len(magic):len(magic) + 4], "big")
    return data[len(magic) + 4:len(magic) + 4 + size] != b"none"


def known_hosts_path(credential: GitCredential) -> str:
    return os.path.expanduser(credential.known_hosts or DEFAULT_KNOWN_HOSTS)
