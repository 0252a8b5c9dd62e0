"""The whole configuration of a dispatcher: runners, pipelines and settings.

A config directory holds ``inventory.yaml`` (runners, optional ``defaults:`` and
``settings:``) and ``pipelines/*.yaml``. Every file is checked and all problems are
reported at once; things that are suspicious but not wrong become warnings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from narwhal.config.credentials import GitCredential, RepoAccess, credential_for, parse_repos, secret_problem
from narwhal.config.forges import Forge, parse_forges
from narwhal.config.inventory import Inventory, Runner, parse_inventory
from narwhal.config.pipeline import Pipeline, PipelineStep, Service, load_pipelines
from narwhal.config.secrets import Grant, Secret, grant, overview, parse_secrets
from narwhal.config.settings import (
    DEFAULT_SETTINGS,
    INVENTORY_FILE,
    Settings,
    parse_settings,
)
from narwhal.config.yamlfile import Document, line_order, load_yaml
from narwhal.errors import ConfigError, Problem
from narwhal.job import is_ref_name

PIPELINES_DIR = "pipelines"


# --- the whole configuration -------------------------------------------------------


@dataclass
class Config:
    inventory: Inventory
    pipelines: list[Pipeline]
    settings: Settings = DEFAULT_SETTINGS
    config_dir: Path | None = None
    warnings: list[Problem] = field(default_factory=list)
    secrets: dict[str, Secret] = field(default_factory=dict)
    forges: list[Forge] = field(default_factory=list)
    repos: list[RepoAccess] = field(default_factory=list)

    @property
    def runners(self) -> list[Runner]:
        return self.inventory.runners

    def pipeline(self, name: str) -> Pipeline | None:
        return next((p for p in self.pipelines if p.name == name), None)

    def pipelines_for(self, repo: str, branch: str | None = None) -> list[Pipeline]:
        """Pipelines a commit on canonical ``repo``/``branch`` should run, in file order."""
        return [p for p in self.pipelines if p.matches(repo, branch)]

    @property
    def fetch_hosts(self) -> tuple[str, ...]:
        """Host globs the dispatcher may fetch from: ``settings.fetch_hosts``, else the
        hosts the pipelines' repo patterns name (a host glob counts only when listed)."""
        if self.settings.fetch_hosts is not None:
            return self.settings.fetch_hosts
        return tuple(sorted({h for p in self.pipelines for h in p.fetch_hosts()}))

    def forge(self, name: str) -> Forge | None:
        return next((f for f in self.forges if f.name == name), None)

    def forge_for(self, repo: str) -> Forge | None:
        """The forge that hosts canonical ``repo`` (its commit statuses go there), if any."""
        return next((f for f in self.forges if f.serves(repo)), None)

    def git_credential(self, repo: str) -> GitCredential | None:
        """What git fetches canonical ``repo`` with (``repos:``, then forges with ``fetch: true``)."""
        return credential_for(repo, self.repos, self.forges, self.secrets)

    def grant(self, pipeline: Pipeline, repo: str, branch: str | None, event: str,
              off_branch: str | None = None) -> Grant:
        """The secrets a job of ``pipeline`` on ``repo``/``branch`` by ``event`` gets, or why not
        (``off_branch``: the job's commit, when it is not on ``branch``)."""
        return grant(self.secrets, pipeline.secret_names(), pipeline.required_secrets(), repo, branch, event,
                     off_branch)

    def branch_limited(self, pipeline: Pipeline) -> bool:
        """Whether ``pipeline`` asks for a secret limited to some branches (``branches:``)."""
        return any(s is not None and s.spec.branches is not None
                   for s in map(self.secrets.get, pipeline.secret_names()))

    def secret_values(self) -> dict[str, str]:
        """Every secret's value by name: what the masking of logs must know."""
        return {name: secret.value for name, secret in self.secrets.items()}

    def store_password(self) -> str | None:
        """The PostgreSQL store's password (``settings.store_password``'s secret), if one is set."""
        name = self.settings.store_password
        return None if name is None else self.secrets[name].value

    def secrets_overview(self) -> list[dict]:
        users: dict[str, list[str]] = {}
        for p in self.pipelines:
            for name in p.secret_names():
                users.setdefault(name, []).append(p.name)
        uses: dict[str, list[str]] = {}
        for forge in self.forges:
            if forge.token is not None:
                uses.setdefault(forge.token, []).append(f"forge {forge.name}: token"
                                                        + (" (statuses, fetching)" if forge.fetch else " (statuses)"))
            uses.setdefault(forge.webhook_secret, []).append(f"forge {forge.name}: webhook secret")
        for entry in self.repos:
            opener = entry.token or entry.ssh_key
            if opener is not None:
                uses.setdefault(opener, []).append(f"fetching {entry.url}")
        if self.settings.store_password is not None:
            uses.setdefault(self.settings.store_password, []).append("the PostgreSQL store's password")
        return overview(self.secrets, users, uses)

    def fingerprint(self) -> str:
        """What the nodes of a cluster must agree on, as a short hash: the pipelines and the
        inventory's runners (a node without a pipeline would fail the jobs it claims of it; one
        with another capacity for a runner would lease more of it). Settings and secrets may differ."""
        data = {"pipelines": sorted((p.model_dump(mode="json") for p in self.pipelines), key=lambda p: p["name"]),
                "runners": sorted((r.model_dump(mode="json") for r in self.runners), key=lambda r: r["name"])}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def runners_for(self, pipeline: Pipeline) -> list[Runner]:
        """Inventory runners whose labels cover the pipeline's."""
        return [r for r in self.runners if r.carries(pipeline.labels)]


def default_config_dir() -> Path:
    """``$NARWHAL_CONFIG``, else the current directory."""
    return Path(os.environ.get("NARWHAL_CONFIG") or ".")


def load_config(directory: str | os.PathLike | None = None) -> Config:
    """Load ``inventory.yaml`` and ``pipelines/`` from ``directory``.

    Raises one ConfigError carrying the problems of every file; file names in it
    are relative to ``directory``.
    """
    root = Path(directory) if directory is not None else default_config_dir()
    if not root.is_dir():
        raise ConfigError([Problem(str(root), None, "", "config directory not found")])
    problems: list[Problem] = []
    warnings: list[Problem] = []
    inventory, settings, document = _load_inventory(root, problems)
    secrets = _load_secrets(root, inventory, document, problems, warnings)
    forges = _load_forges(inventory, document, secrets, problems)
    repos = _load_repos(inventory, document, secrets, problems)
    pipelines = _load_pipelines(root, problems)
    if secrets is not None:
        problems += secret_problems(pipelines, secrets)
        problems += store_problems(settings, secrets, document)
    if problems:
        raise ConfigError(problems)
    assert inventory is not None and settings is not None and secrets is not None
    config = Config(inventory, pipelines, settings, root, secrets=secrets, forges=forges, repos=repos)
    config.warnings = warnings + find_warnings(config)
    return config


def _load_secrets(root: Path, inventory: Inventory | None, document: Document | None,
                  problems: list[Problem], warnings: list[Problem]) -> dict[str, Secret] | None:
    if inventory is None:
        return None
    try:
        secrets, found = parse_secrets(inventory.secrets, INVENTORY_FILE, document, root)
    except ConfigError as e:
        problems += e.problems
        return None
    warnings += found
    return secrets


def _load_forges(inventory: Inventory | None, document: Document | None, secrets: dict[str, Secret] | None,
                 problems: list[Problem]) -> list[Forge]:
    """The forges, each naming declared secrets for its token and webhook secret."""
    if inventory is None:
        return []
    try:
        forges = parse_forges(inventory.forges, INVENTORY_FILE, document)
    except ConfigError as e:
        problems += e.problems
        return []
    if secrets is None:
        return forges
    for i, forge in enumerate(forges):
        for field_name in ("token", "webhook_secret"):
            name = getattr(forge, field_name)
            if name is None:
                continue
            line = document.line_of(("forges", i, field_name)) if document is not None else None
            if name not in secrets:
                problems.append(Problem(INVENTORY_FILE, line, f"forges[{i}].{field_name}",
                                        f"unknown secret {name!r} (declare it under secrets:)"))
            elif field_name == "token" and forge.fetch and (why := secret_problem(name, "token", secrets)):
                problems.append(Problem(INVENTORY_FILE, line, f"forges[{i}].token", why))
    return forges


def _load_repos(inventory: Inventory | None, document: Document | None, secrets: dict[str, Secret] | None,
                problems: list[Problem]) -> list[RepoAccess]:
    """Repository credentials, each naming a declared secret that holds what it is used as."""
    if inventory is None:
        return []
    try:
        return parse_repos(inventory.repos, INVENTORY_FILE, document, secrets)
    except ConfigError as e:
        problems += e.problems
        return []


def store_problems(settings: Settings | None, secrets: dict[str, Secret], document: Document | None) -> list[Problem]:
    """``store_password`` names a declared secret, and only with a PostgreSQL ``store``."""
    if settings is None or settings.store_password is None:
        return []
    path = ("settings", "store_password")
    line = document.line_of(path) if document is not None else None
    if settings.store_password not in secrets:
        return [Problem(INVENTORY_FILE, line, "settings.store_password",
                        f"unknown secret {settings.store_password!r} (declare it under secrets:)")]
    if settings.store is None:
        return [Problem(INVENTORY_FILE, line, "settings.store_password",
                        "set only with a PostgreSQL store (settings.store: postgresql://...)")]
    return []


def secret_problems(pipelines: list[Pipeline], secrets: dict[str, Secret]) -> list[Problem]:
    """A pipeline may only ask for declared secrets, and a secret may not shadow its ``env``."""
    problems = []
    for pipeline in pipelines:
        every_env = {k for env in [pipeline.env, *(step.env for step in pipeline.steps)] for k in env}
        for where, refs, env in [(("secrets",), pipeline.secrets, every_env)] + [
                (("steps", i, "secrets"), step.secrets, {*pipeline.env, *step.env})
                for i, step in enumerate(pipeline.steps)]:
            for j, ref in enumerate(refs):
                file, line = pipeline.where(where + (j,))
                path = ".".join(str(p) for p in where) + f"[{j}]"
                if ref.name not in secrets:
                    known = ", ".join(sorted(secrets)) or "none are declared"
                    problems.append(Problem(file or pipeline.name, line, path,
                                            f"unknown secret {ref.name!r} (secrets in {INVENTORY_FILE}: {known})"))
                elif ref.name in env:
                    problems.append(Problem(file or pipeline.name, line, path,
                                            f"secret {ref.name!r} has the name of a variable in env; rename one"))
    return problems


def _load_inventory(root: Path, problems: list[Problem]) -> tuple[Inventory | None, Settings | None,
                                                                  Document | None]:
    try:
        document = load_yaml(root / INVENTORY_FILE, INVENTORY_FILE)
    except ConfigError as e:
        problems += e.problems
        return None, None, None
    found: list[Problem] = []
    inventory = settings = None
    try:
        inventory = parse_inventory(document)
    except ConfigError as e:
        found += e.problems
    raw_settings = document.data.get("settings") if isinstance(document.data, dict) else None
    try:
        settings = parse_settings(raw_settings, INVENTORY_FILE, document)
    except ConfigError as e:
        found += [p for p in e.problems if p not in found]
    problems += sorted(found, key=line_order)
    return inventory, settings, document


def _load_pipelines(root: Path, problems: list[Problem]) -> list[Pipeline]:
    directory = root / PIPELINES_DIR
    if not directory.is_dir():
        return []
    try:
        return load_pipelines(directory, PIPELINES_DIR)
    except ConfigError as e:
        problems += e.problems
        return []


def find_warnings(config: Config) -> list[Problem]:
    """Things that are valid but probably not meant: a pipeline no runner can take."""
    warnings = []
    if not config.runners:
        warnings.append(Problem(INVENTORY_FILE, None, "runners", "no runners (add them here or with POST /runner)"))
    if not config.pipelines:
        warnings.append(Problem(PIPELINES_DIR, None, "", "no pipelines (add pipelines/NAME.yaml)"))
    all_labels = {label for r in config.runners for label in r.labels}
    for pipeline in config.pipelines:
        warnings += _label_warnings(pipeline, config.runners, all_labels)
        warnings += _schedule_warnings(pipeline)
    return warnings + _cluster_warnings(config)


def _cluster_warnings(config: Config) -> list[Problem]:
    """Nodes of a cluster that keep artifacts each in their own state directory: a download
    through another node than the one that ran the job cannot find the file."""
    settings = config.settings
    keeping = [p.name for p in config.pipelines if p.artifacts is not None]
    if not settings.cluster or settings.artifacts_dir is not None or not keeping:
        return []
    named = ", ".join(keeping[:3]) + (f" and {len(keeping) - 3} more" if len(keeping) > 3 else "")
    return [Problem(INVENTORY_FILE, None, "settings.artifacts_dir",
                    f"not set, with cluster: true and pipelines that keep artifacts ({named}): each node "
                    "keeps them in its own state directory, and a download through another node fails; "
                    "set artifacts_dir to one directory every node shares (docs/deploy.md)")]


def _schedule_warnings(pipeline: Pipeline) -> list[Problem]:
    """A ``schedule`` builds the repositories its pipeline names exactly: say which patterns it
    cannot build (globs), and when its branch is not a name narwhal passes to git."""
    if pipeline.schedule is None:
        return []
    out = []
    for i, why in pipeline.schedule_targets()[1]:
        file, line = pipeline.where(("repo", i))
        out.append(Problem(file or pipeline.name, line, "schedule", why))
    if not is_ref_name(pipeline.schedule.branch):
        file, line = pipeline.where(("schedule", "branch"))
        out.append(Problem(file or pipeline.name, line, "schedule.branch",
                           f"{pipeline.schedule.branch!r} is not a branch or tag name narwhal builds "
                           "(letters, digits, . _ / + -; no leading '-', no '..'): the schedule never runs"))
    return out


def _label_warnings(pipeline: Pipeline, runners: list[Runner], all_labels: set[str]) -> list[Problem]:
    if not runners or any(r.carries(pipeline.labels) for r in runners):
        return []
    missing = [(i, label) for i, label in enumerate(pipeline.labels) if label not in all_labels]
    out = []
    for i, label in missing:
        file, line = pipeline.where(("labels", i))
        out.append(Problem(file or pipeline.name, line, "labels", f"no runner has label {label!r}"))
    if not missing:
        file, line = pipeline.where(("labels",))
        wanted = ", ".join(repr(label) for label in pipeline.labels)
        out.append(Problem(file or pipeline.name, line, "labels", f"no single runner has all of {wanted}"))
    return out


def summarize(config: Config) -> dict:
    """Plain data for ``narwhal check`` (rendered by rich, or printed with ``--json``)."""
    return {
        "runners": [
            {
                "name": r.name,
                "transport": r.transport,
                "host": r.host,
                "labels": list(r.labels),
                "capacity": r.capacity,
            }
            for r in config.runners
        ],
        "pipelines": [
            {
                "name": p.name,
                "repo": list(p.repo),
                "branches": list(p.branches) if p.branches is not None else None,
                "labels": list(p.labels),
                "steps": [s.name for s in p.steps],
                "step_details": [_step_summary(s) for s in p.steps],
                "graph": p.is_graph,
                "width": p.width(),
                "parallel": p.parallel,
                "services": [_service_summary(s) for s in p.services],
                "runners": [r.name for r in config.runners_for(p)],
            }
            for p in config.pipelines
        ],
        "secrets": config.secrets_overview(),
        "warnings": [str(w) for w in config.warnings],
    }


def _step_summary(step: PipelineStep) -> dict:
    """A step's place in the graph, its conditions and failure policy, for ``narwhal check``."""
    when = step.when.model_dump(exclude_none=True) if step.when is not None else {}
    return {"name": step.name, "depends_on": list(step.depends_on), "when": when,
            "allow_failure": step.allow_failure, "retry": step.retry}


def _service_summary(service: Service) -> dict:
    ready = service.ready
    return {"name": service.name, "image": service.image,
            "ready": None if ready is None else ({"port": ready.port} if ready.port is not None
                                                 else {"command": ready.command}) | {"timeout": ready.timeout}}
