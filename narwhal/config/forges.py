"""Forges narwhal talks to: GitHub, Gitea, Forgejo and GitLab servers.

A forge sends narwhal webhooks (checked with ``webhook_secret``) and takes commit
statuses back (sent with ``token``). Neither secret is written here: both fields
name a secret (an environment-variable-like identifier) that the dispatcher looks
up when it needs it, so a forge list can be shown, logged and committed. With
``fetch: true`` the token also fetches the https repositories the forge serves
(``narwhal.config.credentials``): an opt-in, since a status token may carry more rights
than reading, or fewer.

``url`` is the forge's API base: ``https://api.github.com`` (or a GitHub Enterprise
``https://ghe.example/api/v3``), ``https://gitea.example``, ``https://gitlab.example``.
It is spelled once: scheme and host lowercased, no trailing ``/``; credentials,
queries, fragments and dot segments are refused.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator

from narwhal.config.inventory import Name
from narwhal.config.repository import host_of
from narwhal.config.secrets import SecretName
from narwhal.config.yamlfile import (
    Document,
    duplicate_names,
    format_path,
    line_order,
    show_value,
    validation_problems,
)
from narwhal.errors import ConfigError, Problem

KINDS = ("github", "gitea", "forgejo", "gitlab")
Kind = Literal["github", "gitea", "forgejo", "gitlab"]
MAX_URL = 2048
_HOST_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_PATH_SEGMENT_RE = re.compile(r"[A-Za-z0-9._~-]+")

def check_api_url(value: str) -> str:
    """An http(s) API base without credentials, query, fragment or dot segments; one spelling."""
    why = _url_problem(value)
    if why:
        raise ValueError(f"expected the forge's API base URL such as 'https://api.github.com' "
                         f"or 'https://gitea.example' ({why}), got {show_value(value)}")
    parts = urlsplit(value)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = {"http": 80, "https": 443}[parts.scheme.lower()]
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


def _url_problem(value: str) -> str | None:
    """Why VALUE is not an acceptable API base, or None."""
    if len(value) > MAX_URL:
        return f"longer than {MAX_URL} characters"
    if not value.isascii() or any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in value):
        return "spaces, control or non-ASCII characters"
    if "?" in value or "#" in value:
        return "no query or fragment"
    if "\\" in value or "%" in value:
        return "no '\\' or percent-encoding"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return "bad port"
    if parts.scheme.lower() not in ("http", "https") or "://" not in value:
        return "http:// or https:// only"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "no credentials in the URL: name them with token"
    host = (parts.hostname or "").lower()
    if not host or not _HOST_RE.fullmatch(f"[{host}]" if ":" in host else host):
        return "bad host name"
    if port == 0:
        return "bad port"
    segments = [s for s in parts.path.split("/") if s]
    if any(s in (".", "..") or not _PATH_SEGMENT_RE.fullmatch(s) for s in segments):
        return "a plain path without '.' or '..' segments"
    if "//" in parts.path:
        return "no empty path segments"
    return None


ApiUrl = Annotated[str, AfterValidator(check_api_url)]


class Forge(BaseModel):
    """One forge: where its API is, and the names of the secrets that talk to it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Name
    kind: Kind
    url: ApiUrl
    token: SecretName | None = None  # names the API token for commit statuses (none: no statuses)
    webhook_secret: SecretName  # names the secret webhooks are signed with (GitLab: the X-Gitlab-Token)
    fetch: bool = False  # the token also fetches the https repositories served here (narwhal.config.credentials)

    @model_validator(mode="after")
    def _fetch_needs_token(self) -> Forge:
        if self.fetch and self.token is None:
            raise ValueError("fetch: true lends the forge's token to git; name it with token")
        return self

    @property
    def web_host(self) -> str:
        """The host its repositories are cloned from (GitHub's API lives on another one)."""
        host = (urlsplit(self.url).hostname or "").lower()
        return "github.com" if host == "api.github.com" else host

    def serves(self, repo: str) -> bool:
        """Whether canonical ``repo`` is hosted here (its commit statuses go here)."""
        host = host_of(repo)
        if not host:
            return False
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:
            return False
        return name is not None and name.lower() == self.web_host

    @property
    def api_base(self) -> str:
        """Where the REST API's paths start: Gitea/Forgejo add /api/v1, GitLab /api/v4."""
        return self.url + {"github": "", "gitea": "/api/v1", "forgejo": "/api/v1", "gitlab": "/api/v4"}[self.kind]


def parse_forges(raw: Any, filename: str, document: Document | None = None,
                 section: str = "forges") -> list[Forge]:
    """Validate the list of forges found at ``section`` of a config file.

    ``raw`` is that list (None: no forges). ConfigError lists every problem, each with
    its file and line when ``document`` (the loaded file) is given; names must be unique.
    """
    if raw is None:
        return []
    line = document.line_of((section,)) if document is not None else None
    if not isinstance(raw, list):
        raise ConfigError([Problem(filename, line, section, f"expected a list of forges, got {show_value(raw)}")])
    problems: list[Problem] = []
    if document is not None:
        problems += duplicate_names(raw, section, "forge", filename, document)
    else:
        seen: set[str] = set()
        for i, item in enumerate(raw):
            name = item.get("name") if isinstance(item, dict) else None
            if isinstance(name, str) and name in seen:
                problems.append(Problem(filename, None, format_path((section, i, "name")),
                                        f"duplicate forge name {name!r}"))
            elif isinstance(name, str):
                seen.add(name)
    forges: list[Forge] = []
    for i, item in enumerate(raw):
        try:
            forges.append(Forge.model_validate(item))
        except ValidationError as e:
            problems += validation_problems(e, Forge, filename, document, (section, i))
    if problems:
        raise ConfigError(sorted(problems, key=line_order))
    return forges
