"""The reference of pipeline and inventory files, derived from their pydantic models.

Two things come out of here, both from the models plus the descriptions below:

- ``schema(kind)``: a JSON Schema (draft 2020-12) of ``pipelines/*.yaml`` or
  ``inventory.yaml``, for editors (``narwhal schema pipeline|inventory``). It is pydantic's
  ``model_json_schema`` with a description and an example on every key, and, where a key
  reads more than its model's type (``timeout: 10m``, one string for a list), what YAML may
  say there.
- ``reference(kind)``: the Markdown reference between the markers of ``docs/pipelines.md``
  and ``docs/inventory.md`` (``python -m narwhal.config.reference`` regenerates both).

Every key of every model reachable from ``Pipeline`` or ``Inventory`` needs an entry in
``KEYS`` (``Model.field``); a key that reads its YAML through a ``BeforeValidator`` also
needs ``accepts``; a key typed ``Any`` (validated elsewhere) needs ``NESTED`` or
``accepts``. ``tests/test_reference.py`` fails naming each one that is missing, so a key
added to a model cannot stay out of the docs and the schema.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import yaml
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from narwhal.config.credentials import RepoAccess
from narwhal.config.forges import Forge
from narwhal.config.inventory import Inventory
from narwhal.config.pipeline import Pipeline
from narwhal.config.secrets import SecretSpec
from narwhal.config.settings import Settings, show_setting
from narwhal.job import EVENTS

KINDS = ("pipeline", "inventory")
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
BEGIN = "<!-- reference: generated from narwhal.config.reference; do not edit -->"
END = "<!-- end of reference -->"
DOCS = {"pipeline": "docs/pipelines.md", "inventory": "docs/inventory.md"}


@dataclass(frozen=True)
class Key:
    """What one key of a model means, for people and for editors."""

    help: str
    example: str | None = None  # YAML at the level of the model that holds the key
    accepts: dict | None = None  # JSON Schema of what YAML may say, when wider than the model's type
    type: str | None = None  # the type as the reference shows it, when the schema's is not telling
    default: str | None = None  # the default as one writes it (``1h``), when the model's is not


# --- what YAML may say where a model reads more than its type ---------------------------------

_NUM = r"[0-9]+(\.[0-9]+)?"
DURATION_PATTERN = rf"^\s*(?=[0-9])({_NUM}|({_NUM}d)?({_NUM}h)?({_NUM}m)?({_NUM}s)?({_NUM}ms)?)\s*$"
SIZE_PATTERN = r"^\s*[0-9]+\s*[kmgKMG]?([iI]?[bB])?\s*$"
DURATION: dict = {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                            {"type": "string", "pattern": DURATION_PATTERN}]}
DURATION_TYPE = "duration: seconds, or `90s`, `10m`, `1h30m`, `500ms`, `30d`"


def _one_or_list(item: dict | None = None) -> dict:
    item = item or {"type": "string"}
    return {"anyOf": [item, {"type": "array", "items": item}]}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [*schema.get("anyOf", [schema]), {"type": "null"}]}


EVENT = {"enum": list(EVENTS)}
ENV = {"type": "object", "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
       "additionalProperties": {"type": ["string", "number", "boolean"]}}
SECRET_REFS = _one_or_list({"anyOf": [{"type": "string"}, {"$ref": "#/$defs/SecretRef"}]})


# --- the keys ---------------------------------------------------------------------------------

KEYS: dict[str, Key] = {
    # pipelines/*.yaml
    "Pipeline.name": Key(
        "The pipeline's name: letters, digits, `.`, `_` or `-` (1-63, starting with a letter or digit). "
        "Jobs, reports and commit statuses show it.",
        "name: backend", default="the file's name without `.yaml`"),
    "Pipeline.repo": Key(
        "The repositories this pipeline builds: URLs, local paths or globs. They are matched in narwhal's one "
        "spelling of a repository (scheme and host lowercased, default port and trailing `/` dropped, local "
        "paths resolved); `*` stays inside one path segment, `**` crosses `/`. One string is a list of one.",
        'repo: ["https://git.example.com/team/*", /srv/git/tools]', accepts=_one_or_list(),
        type="repository pattern or list of them"),
    "Pipeline.branches": Key(
        "The branches it runs for (globs such as `release/*`). Left out: every branch, and submissions that "
        "name none. Given: only a submission whose branch is known and matches (a pipeline that holds what "
        "only some branches may use does not run for an unknown one).",
        'branches: [main, "release/*"]', accepts=_nullable(_one_or_list()), type="branch glob or list of them"),
    "Pipeline.image": Key(
        "The Docker image the steps run in, unless a step names its own. Required unless every step has "
        "`image`. The runner must have it or be able to pull it.",
        "image: python:3.12-slim", default="none (each step's own)"),
    "Pipeline.labels": Key(
        "Labels a runner must carry, every one of them, to take this pipeline's jobs.",
        "labels: [linux, docker]"),
    "Pipeline.timeout": Key(
        "The whole job's time limit. A job still running then is stopped (TERM, then KILL after "
        "`stop_grace`) and fails: `timeout in step NAME`.",
        "timeout: 30m", accepts=DURATION, type=DURATION_TYPE, default="1h"),
    "Pipeline.env": Key(
        "Environment variables of every step; a step's own `env` wins. Values are strings (`true` and "
        "numbers are written as they read). narwhal sets `CI=true`, `NARWHAL_COMMIT`, `NARWHAL_BRANCH`, "
        "`NARWHAL_JOB`, `NARWHAL_EVENT`, `NARWHAL_REF`, `NARWHAL_PR` and `NARWHAL_SOURCE_REPO` over them.",
        'env: {PIP_NO_CACHE_DIR: "1", DEBUG: false}', accepts=ENV, type="mapping of variable name to value"),
    "Pipeline.secrets": Key(
        "Secrets every step gets, declared in `inventory.yaml` under `secrets:`. A step sees each one as an "
        "environment variable and as the file `/run/secrets/NAME`; every log shows its value as "
        "`[masked:NAME]`. A job that may not have a required one (its repository, branch or event is out of "
        "the secret's scope) ends in `error` with the reason at once; `{name: N, optional: true}` lets it run "
        "without.",
        "secrets: [PYPI_TOKEN, {name: SLACK_HOOK, optional: true}]", accepts=SECRET_REFS,
        type="secret name, or a list of names and `{name, optional}`"),
    "Pipeline.when": Key(
        "Conditions. A job whose conditions do not hold is recorded as skipped, with the reason; "
        "a key left out does not filter.",
        'when: {event: [push, tag], paths: ["src/**", pyproject.toml]}', default="none (always runs)"),
    "Pipeline.schedule": Key(
        "Build on a timer as well: at each tick, the head of `branch` of every repository `repo` names "
        "without a glob. Missed ticks (the dispatcher was down) run once.",
        'schedule: {cron: "0 3 * * *", branch: main}', default="none"),
    "Pipeline.steps": Key(
        "The steps, in order. Each runs with `/bin/sh -e` in a fresh container, in `/workspace`, which holds "
        "the commit's files and what earlier steps left there. A step that fails ends the job; the steps "
        "after it are skipped. Names are unique within the pipeline.",
        "steps:\n  - {name: test, run: pytest -q}"),
    "PipelineStep.name": Key(
        "The step's name, unique in the pipeline: letters, digits, spaces, `.`, `_` or `-` (1-63). Reports "
        "and reasons (`exit 1 in step test`) name it.", "name: unit tests"),
    "PipelineStep.run": Key(
        "The commands, run by `/bin/sh -e`: the first command that fails fails the step. A YAML block "
        "(`|`) holds several lines.", "run: |\n  pip install -e .\n  pytest -q"),
    "PipelineStep.image": Key("This step's image instead of the pipeline's.", "image: node:20",
                              default="the pipeline's `image`"),
    "PipelineStep.env": Key("Environment variables of this step, on top of the pipeline's.",
                            "env: {NODE_ENV: test}", accepts=ENV, type="mapping of variable name to value"),
    "PipelineStep.secrets": Key(
        "Secrets this step gets besides the pipeline's (its own `optional` wins).",
        "secrets: [DEPLOY_KEY]", accepts=SECRET_REFS, type="secret name, or a list of names and `{name, optional}`"),
    "PipelineStep.timeout": Key(
        "This step's time limit; the job's `timeout` still bounds the whole job. The step is stopped (TERM, "
        "then KILL after `stop_grace`) and the job fails: `timeout in step NAME`.",
        "timeout: 5m", accepts=_nullable(DURATION), type=DURATION_TYPE, default="none (the job's `timeout`)"),
    "SecretRef.name": Key("The secret's name as declared under `secrets:` in `inventory.yaml`.", "name: PYPI_TOKEN"),
    "SecretRef.optional": Key(
        "Run without it when the job may not have it (a pull request, say), instead of ending in `error`. "
        "The job's log says which secrets were withheld.", "optional: true"),
    "When.event": Key(
        f"The events it runs for: {', '.join(f'`{e}`' for e in EVENTS)} (`api`: `POST /commit` and "
        "`narwhal submit`; `cron`: its `schedule`). One string is a list of one.",
        "event: [push, pull_request]", accepts=_nullable(_one_or_list(EVENT)), type="event or list of events",
        default="none (every event)"),
    "When.paths": Key(
        "Path globs relative to the repository root (`*` within a segment, `**` across, `[abc]`). A push or "
        "pull request whose changed files match none of them is skipped; other events, and pushes whose "
        "changes are unknown, are not filtered. At most 100.",
        'paths: ["src/**", "*.toml"]', accepts=_nullable(_one_or_list()), type="path glob or list of them",
        default="none (any change)"),
    "Schedule.cron": Key(
        "Five fields (minute hour day-of-month month day-of-week) read as Debian's cron reads them, in UTC, "
        "or an alias such as `@daily`. A tick at most once a minute.", 'cron: "30 2 * * 1-5"'),
    "Schedule.branch": Key("The branch (or tag) whose head each tick builds; no globs.", "branch: main"),
    # inventory.yaml
    "Inventory.runners": Key(
        "The hosts that run jobs, reached over SSH (or this machine, `transport: local`). More can be added "
        "at run time with `narwhal runner add` (`POST /runner`), within what `settings:` allows.",
        "runners:\n  - {name: build-1, host: 10.0.0.5, key: ~/.ssh/narwhal, labels: [linux]}"),
    "Inventory.defaults": Key(
        "Runner keys merged under every runner (a runner's own value wins), every key of `runners[]` but "
        "`name`.", "defaults: {user: ci, known_hosts: /etc/narwhal/known_hosts}", default="none",
        accepts=_nullable({"$ref": "#/$defs/RunnerDefaults"}), type="runner keys but `name`"),
    "Inventory.settings": Key(
        "The dispatcher's tunables; every one has a default (the table below and README.md).",
        "settings: {health_interval: 10s, local_roots: [/srv/git]}", default="none (every default)",
        accepts=_nullable({"$ref": "#/$defs/Settings"}), type="mapping of setting to value"),
    "Inventory.secrets": Key(
        "Secrets by name: where each value is read from (a file or the dispatcher's environment, never the "
        "value itself) and who may have it. Pipelines ask for them by name. Values are read at start and on "
        "every reload.", "secrets:\n  PYPI_TOKEN: {file: /etc/narwhal/secrets/pypi, branches: [main]}",
        default="none", type="mapping of secret name to secret"),
    "Inventory.forges": Key(
        "Forges that send webhooks (`POST /hooks/NAME`) and take commit statuses.",
        "forges:\n  - {name: gitea, kind: gitea, url: https://git.example.com, token: GITEA_TOKEN, "
        "webhook_secret: HOOK}", default="none", type="list of forges"),
    "Runner.name": Key("The runner's name: letters, digits, `.`, `_` or `-` (1-63).", "name: build-1"),
    "Runner.host": Key("Host name or IP address the dispatcher reaches it at over SSH.", "host: build-1.example.com"),
    "Runner.port": Key("SSH port.", "port: 2222"),
    "Runner.user": Key("SSH user; it must be able to run `docker` (in the `docker` group) and needs nothing else.",
                       "user: ci"),
    "Runner.key": Key("Private key file on the dispatcher's host (`~` expanded). Left out: the SSH agent and the "
                      "default keys of the dispatcher's user. `narwhal check` warns when the file is missing.",
                      "key: ~/.ssh/narwhal_ed25519", default="none (agent, default keys)"),
    "Runner.known_hosts": Key("known_hosts file holding the runner's host key; an unknown or changed key refuses "
                              "the runner.", "known_hosts: /etc/narwhal/known_hosts"),
    "Runner.labels": Key("Labels pipelines can ask for (`labels:` there).", "labels: [linux, docker, x86_64]"),
    "Runner.capacity": Key("Jobs it runs at once (1-1024).", "capacity: 4"),
    "Runner.transport": Key("`ssh`, or `local` for this machine's own Docker engine (no SSH; inventory only).",
                            "transport: local"),
    "Runner.limits": Key("Resource limits of every step container on this runner.",
                         "limits: {memory: 4g, cpus: 4, pids: 2048}"),
    "Runner.network": Key("The Docker network steps join: `none` (no network), `bridge`, `host` or a named "
                          "network. The runner's admin decides; a pipeline cannot.", "network: bridge"),
    "Limits.memory": Key("Memory of one step container (`512m`, `2g`; a bare number is bytes).", "memory: 4g",
                         accepts={"anyOf": [{"type": "string", "pattern": r"^\s*[0-9]+[bkmgBKMG]?\s*$"},
                                            {"type": "integer", "exclusiveMinimum": 0}]},
                         type="size: `512m`, `2g`"),
    "Limits.cpus": Key("CPUs of one step container (fractions allowed).", "cpus: 1.5"),
    "Limits.pids": Key("Processes one step container may hold (a fork bomb stops there).", "pids: 512"),
    "SecretSpec.file": Key("A file on the dispatcher's host holding the value (trailing newline dropped). "
                           "Keep it `chmod 600`: `narwhal check` warns when others can read it.",
                           "file: /etc/narwhal/secrets/pypi", default="none (give `file` or `env`)"),
    "SecretSpec.env": Key("An environment variable of the dispatcher holding the value.",
                          "env: NARWHAL_PYPI_TOKEN", default="none (give `file` or `env`)"),
    "SecretSpec.repos": Key("Repositories (globs) whose jobs may have it.", 'repos: ["https://git.example.com/team/*"]',
                            accepts=_nullable(_one_or_list()), type="repository pattern or list of them",
                            default="none (any repository)"),
    "SecretSpec.branches": Key("Branches (globs) whose jobs may have it; a job without a known branch may not.",
                               "branches: [main]", accepts=_nullable(_one_or_list()),
                               type="branch glob or list of them", default="none (any branch)"),
    "SecretSpec.events": Key("Events whose jobs may have it. A pull request runs code its author wrote, so it is "
                             "left out unless listed.", "events: [push, tag]", accepts=_one_or_list(EVENT),
                             type="event or list of events", default="every event but `pull_request`"),
    "Forge.name": Key("The forge's name: webhooks go to `POST /hooks/NAME`.", "name: gitea"),
    "Forge.kind": Key("`github`, `gitea`, `forgejo` or `gitlab`.", "kind: gitlab"),
    "Forge.url": Key("The forge's API base: `https://api.github.com` (or a GitHub Enterprise `/api/v3`), or the "
                     "Gitea, Forgejo or GitLab server's URL. Its repositories' statuses go there.",
                     "url: https://git.example.com"),
    "Forge.token": Key("The name of a declared secret holding the API token commit statuses are sent with.",
                       "token: GITEA_TOKEN", default="none (no commit statuses)"),
    "Forge.webhook_secret": Key("The name of a declared secret webhooks are signed with (GitLab: the "
                                "`X-Gitlab-Token`). A delivery that does not check out is refused, 401.",
                                "webhook_secret: GITEA_HOOK"),
    "Pipeline.matrix": Key(
        "One job per combination of values: variables (capitals) to lists of values, with `exclude` (entries "
        "that remove every combination they agree with) and `include` (combinations added as written). Each "
        "job is named `NAME[PY=3.11,DB=pg15]`; its steps get the values as variables, and `${PY}` in `image:`, "
        "`env:`, `services:` and `cache:` is replaced (only declared variables). At most 64 combinations.",
        'matrix: {PY: ["3.11", "3.12"], DB: [pg15, pg16], exclude: [{PY: "3.11", DB: pg16}]}',
        accepts={"type": ["object", "null"]}, type="mapping of variable to list of values", default="none"),
    "Pipeline.services": Key(
        "Containers that run beside the steps for the whole job (a database, a cache), on the job's own "
        "Docker network, each reachable by its `name`. Same hardening, limits and labels as steps; a service "
        "that dies or never gets ready fails the job, naming it.",
        "services:\n  - {name: db, image: postgres:16, env: {POSTGRES_PASSWORD: test}, ready: {port: 5432}}",
        default="none"),
    "Pipeline.parallel": Key(
        "Most steps of this job that run at once when steps have `depends_on`; the runner's free capacity "
        "(counted in step containers) may give fewer.", "parallel: 2", default="4"),
    "Pipeline.clone": Key(
        "What the workspace holds besides the commit's files. Left out, it is `git archive` of the commit "
        "(no `.git`, no submodules, `export-ignore` and `export-subst` applied: see \"What the workspace "
        "holds\" below). Everything is made on the dispatcher from its mirror and sent the same way; a "
        "runner never fetches.", "clone: {git: true, submodules: true}", default="none (`git archive`)"),
    "Clone.git": Key(
        "A real `.git`: the commit's history and the tags on it, `HEAD` detached at the commit (no "
        "branches), remote `origin` at the repository's URL (no credentials) and an index, so "
        "`git describe`, `git log` and version tools work. The files are a checkout (attributes such as "
        "`export-ignore` are not applied). Larger than `clone_max_bytes` fails the job.",
        "git: true", default="false"),
    "Clone.submodules": Key(
        "Each submodule's files at the commit the superproject records (with `git: true`, with its own "
        "`.git`). Their URLs pass the same checks as repositories (a host in `fetch_hosts`; no local paths, "
        "`file://`, `ext::` or option-like values) and are fetched into the dispatcher's mirror; a refused "
        "one is left out with a note in the job's log. Nested submodules are not shipped (a note names them).",
        "submodules: true", default="false"),
    "Clone.depth": Key(
        "With `git: true`: only this many commits of history (a shallow `.git`); `git describe` then finds "
        "only tags within them.", "depth: 50", default="none (all history)"),
    "Pipeline.artifacts": Key(
        "Files of the workspace to keep after the job: the dispatcher collects them over the runner's SSH "
        "connection when the job ends, stores them (content-addressed, within `artifacts_quota`) and serves "
        "them at `GET /jobs/ID/artifacts` and with `narwhal artifacts ID`. Steps of the job see them in the "
        "workspace as any file. Collecting needs `/bin/sh` and `tar` in the pipeline's `image`.",
        'artifacts: {paths: ["dist/*.whl", report.xml], expire: 30d, when: always}', default="none"),
    "Artifacts.paths": Key(
        "Files, directories or `sh` globs (`*`, `?`, `[...]`; no `**`) relative to the workspace. A directory "
        "brings everything under it. No absolute paths, no `..`, at most 64 of at most 512 characters. Only "
        "regular files come back; a symbolic link is followed only when it points inside the workspace.",
        'paths: ["dist/*.whl", report.xml]', accepts=_one_or_list(), type="path glob or list of them"),
    "Artifacts.expire": Key(
        "How long the files are kept; then they are gone (`410`).", "expire: 30d", accepts=_nullable(DURATION),
        type=DURATION_TYPE, default="the `artifacts_expire` setting (30d)"),
    "Artifacts.when": Key(
        "Which jobs keep them: `on_success` (passed), `on_failure` (failed, a timeout included) or `always` "
        "(either). A cancelled job, or one that ended in error, keeps none.", "when: always",
        default="on_success"),
    "PipelineStep.depends_on": Key(
        "Steps that must be done before this one starts. Steps whose dependencies are done run in parallel; "
        "with no `depends_on` anywhere, steps run one after another as written. Unknown names and cycles are "
        "errors. One string is a list of one.", "depends_on: [build, lint]", accepts=_nullable(_one_or_list()),
        type="step name or list of them", default="none"),
    "PipelineStep.when": Key(
        "Conditions for this step: the pipeline's keys plus `branch` and `status`. A step whose conditions do "
        "not hold is skipped, with the reason.", 'when: {status: [failure]}', default="none (always runs)"),
    "PipelineStep.allow_failure": Key(
        "The step may fail without failing the job; it shows as `failed_allowed`.", "allow_failure: true",
        default="false"),
    "PipelineStep.retry": Key(
        "Times the step runs again after its own non-zero exit (not after a timeout or a Docker error).",
        "retry: 2", default="0"),
    "StepWhen.event": Key("As the pipeline's `when.event`.", "event: [push]", accepts=_nullable(_one_or_list(EVENT)),
                          type="event or list of events", default="none (every event)"),
    "StepWhen.paths": Key("As the pipeline's `when.paths`.", 'paths: ["docs/**"]', default="none",
                          accepts=_nullable(_one_or_list()), type="path glob or list of them"),
    "StepWhen.branch": Key("Branch globs the step runs for.", 'branch: [main, "release/*"]', default="none",
                           accepts=_nullable(_one_or_list()), type="branch glob or list of them"),
    "StepWhen.status": Key(
        "`success`: only while nothing failed (the default); `failure`: only once something failed; both: "
        "always.", "status: [failure]", default="[success]",
        accepts=_nullable(_one_or_list({"enum": ["success", "failure"]})), type="success, failure, or both"),
    "Service.name": Key("Its host name on the job's network: lowercase letters, digits and `-`.", "name: db"),
    "Service.image": Key("The image it runs.", "image: postgres:16"),
    "Service.env": Key("Its environment variables.", "env: {POSTGRES_PASSWORD: test}",
                       accepts=ENV, type="mapping of variable name to value"),
    "Service.command": Key(
        "What it runs instead of the image's default: a string is run by `/bin/sh -c`, a list is the image's "
        "arguments.", 'command: ["postgres", "-c", "fsync=off"]', default="the image's own"),
    "Service.ready": Key("When it counts as ready; steps start after that.", "ready: {port: 5432, timeout: 30s}",
                         default="none (at once)"),
    "Ready.command": Key("A command run in the service that exits 0 once it is ready.",
                         'command: "pg_isready -U postgres"'),
    "Ready.port": Key("A TCP port that listens once it is ready.", "port: 5432"),
    "Ready.timeout": Key("How long it may take.", "timeout: 30s", accepts=DURATION, type=DURATION_TYPE,
                         default="60s"),
    "Inventory.repos": Key(
        "Credentials for private repositories, first match wins: a repository glob and a `token` or an "
        "`ssh_key` (names of declared secrets).",
        "repos:\n  - {url: \"https://git.example.com/team/*\", token: GIT_TOKEN, username: oauth2}",
        default="none", type="list of repository credentials"),
    "RepoAccess.url": Key("The repositories it opens: a URL or glob.", 'url: "https://git.example.com/team/*"'),
    "RepoAccess.token": Key("A declared secret sent as HTTP authentication (https only, or loopback http).",
                            "token: GIT_TOKEN"),
    "RepoAccess.username": Key("Basic authentication's user name.", "username: oauth2", default="x-access-token"),
    "RepoAccess.auth": Key("`basic` (user and token) or `bearer` (the token alone).", "auth: bearer",
                           default="basic"),
    "RepoAccess.ssh_key": Key("A declared secret holding an unencrypted private key (a deploy key).",
                              "ssh_key: DEPLOY_KEY"),
    "RepoAccess.known_hosts": Key("The known_hosts file the key's server must be in.",
                                  "known_hosts: /etc/narwhal/known_hosts", default="~/.ssh/known_hosts"),
    "Forge.fetch": Key("Its `token` also fetches the https repositories it serves.", "fetch: true",
                       default="false"),
    "Pipeline.cache": Key(
        "Directories of the workspace kept on the runner between jobs, per repository and key (a labelled "
        "Docker volume). Restored before the first step when the key was saved before (the log says `restored`, "
        "with the size, or `miss`); saved after a passing job. Pull request jobs restore but never save. Evicted "
        "by age and total size (settings `cache_max_age`, `cache_max_total`). At most 8.",
        "cache:\n  - {key: \"pip-{{ hash 'requirements.txt' }}\", paths: [.cache/pip]}", default="none"),
    "Cache.key": Key(
        "The cache's name: letters, digits, `.`, `_`, `-`, a matrix `${VAR}`, and `{{ hash 'PATH' ... }}` (16 hex "
        "digits of those files as the commit has them; a directory hashes every file under it; a missing file "
        "hashes as missing) or `{{ branch }}` (the job's branch). Nothing else: no shell, no environment.",
        "key: \"deps-${PY}-{{ hash 'requirements.txt' 'constraints.txt' }}\""),
    "Cache.paths": Key(
        "Files or directories of the workspace to keep, relative to it (no `..`, no absolute path, no globs). "
        "Paths may not overlap, within a cache or across caches. One string is a list of one; at most 16.",
        "paths: [.cache/pip, node_modules]", accepts=_one_or_list(), type="path or list of them"),
    "Cache.save": Key(
        "When to save: `on_miss` (only when the restore found nothing under the key: a key that hashes its "
        "inputs means the same content), `always` (after every passing job: a cache that grows, such as "
        "ccache) or `never` (restore only).", "save: always", default="on_miss"),
}

# Models that a key typed ``Any`` holds (checked elsewhere, such as secrets.parse_secrets):
# "map" (a mapping of names to the model) or "list".
NESTED: dict[str, tuple[str, type[BaseModel]]] = {
    "Inventory.secrets": ("map", SecretSpec),
    "Inventory.forges": ("list", Forge),
    "Inventory.repos": ("list", RepoAccess),
}

# Each model's section in the reference: its heading and a sentence about it.
SECTIONS: dict[str, tuple[str, str]] = {
    "Pipeline": ("A pipeline", "One file `pipelines/NAME.yaml` per pipeline."),
    "PipelineStep": ("A step", "An entry of `steps:`."),
    "SecretRef": ("A secret asked for", "An entry of `secrets:` in a pipeline or a step, written as the bare "
                                        "name or as this mapping."),
    "When": ("Conditions", "The pipeline's `when:`."),
    "Schedule": ("A schedule", "The pipeline's `schedule:`."),
    "Inventory": ("The inventory", "`inventory.yaml` in the config directory."),
    "Runner": ("A runner", "An entry of `runners:` (and, but for `name`, of `defaults:`)."),
    "Limits": ("Limits", "A runner's `limits:`."),
    "SecretSpec": ("A secret", "A value under `secrets:`, keyed by the secret's name (letters, digits and `_`; "
                               "not `CI`, `HOME`, `PATH`, `HOSTNAME` or `NARWHAL_*`)."),
    "Forge": ("A forge", "An entry of `forges:`."),
    "Service": ("A service", "An entry of `services:`."),
    "Clone": ("The workspace", "The pipeline's `clone:`."),
    "Artifacts": ("Artifacts", "The pipeline's `artifacts:`."),
    "Ready": ("Readiness", "A service's `ready:`: a `command` or a `port`."),
    "StepWhen": ("A step's conditions", "A step's `when:`."),
    "RepoAccess": ("Repository credentials", "An entry of `repos:`."),
    "Cache": ("A cache", "An entry of `cache:`."),
}
ROOTS: dict[str, type[BaseModel]] = {"pipeline": Pipeline, "inventory": Inventory}

SETTING_SCHEMAS: dict[str, dict] = {
    "duration": DURATION,
    "count": {"type": "integer", "minimum": 1},
    "size": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": SIZE_PATTERN}]},
    "size0": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}]},
    "names": {"type": "array", "items": {"type": "string"}},
    "flag": {"type": "boolean"},
    "paths": _one_or_list({"type": "string", "pattern": "^/"}),
    "hosts": _one_or_list(),
    "labels": _one_or_list(),
    "dir": {"type": ["string", "null"]},
    "url": {"type": ["string", "null"]},
    "store": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^(none|sqlite|postgres(ql)?://.+)$"}]},
    "secret": {"type": ["string", "null"]},
}


# --- walking the models -----------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One key of one model, and where in the file it sits."""

    model: type[BaseModel]
    name: str
    info: FieldInfo
    path: str  # `steps[].timeout`, `secrets.NAME.file`

    @property
    def id(self) -> str:
        return f"{self.model.__name__}.{self.name}"


def nested_models(annotation: Any) -> Iterator[tuple[str, type[BaseModel]]]:
    """The models an annotation holds, each with how it is reached: "" (itself), "[]" (in a
    list) or ".NAME" (in a mapping)."""
    def walk(tp: Any, how: str) -> Iterator[tuple[str, type[BaseModel]]]:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield how, tp
            return
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            yield from walk(args[0], how)
        elif origin in (list, tuple, set, frozenset):
            for arg in args:
                yield from walk(arg, how + "[]")
        elif origin is dict:
            if len(args) == 2:
                yield from walk(args[1], how + ".NAME")
        elif origin in (typing.Union, types.UnionType):
            for arg in args:
                yield from walk(arg, how)
    yield from walk(annotation, "")


def walk(root: type[BaseModel]) -> list[Field]:
    """Every key of ``root`` and of the models it holds, depth first, each model once."""
    out: list[Field] = []
    seen: set[type[BaseModel]] = set()

    def visit(model: type[BaseModel], prefix: str) -> None:
        if model in seen:
            return
        seen.add(model)
        later: list[tuple[type[BaseModel], str]] = []
        for name, info in model.model_fields.items():
            field = Field(model, name, info, f"{prefix}{name}")
            out.append(field)
            for how, inner in nested_models(info.annotation):
                later.append((inner, f"{field.path}{how}."))
            if field.id in NESTED:
                shape, inner = NESTED[field.id]
                later.append((inner, f"{field.path}{'.NAME' if shape == 'map' else '[]'}."))
        for inner, inner_prefix in later:
            visit(inner, inner_prefix)

    visit(root, "")
    return out


def models(root: type[BaseModel]) -> list[tuple[type[BaseModel], str]]:
    """The models of a file, each with where it first appears (`` for the root, `steps[]`)."""
    found: dict[type[BaseModel], str] = {}
    for field in walk(root):
        found.setdefault(field.model, field.path[: -len(field.name)].rstrip("."))
    return list(found.items())


def reads_before(info: FieldInfo) -> bool:
    """Whether a key reads its YAML through a BeforeValidator: YAML may say more than its type."""
    def has(tp: Any) -> bool:
        if typing.get_origin(tp) is typing.Annotated:
            if any(isinstance(m, BeforeValidator) for m in typing.get_args(tp)[1:]):
                return True
        return any(has(arg) for arg in typing.get_args(tp))
    return any(isinstance(m, BeforeValidator) for m in info.metadata) or has(info.annotation)


def is_any(info: FieldInfo) -> bool:
    """Whether a key is typed loosely (``Any``, ``dict[str, Any]``, ``list[Any]``): checked elsewhere."""
    def loose(tp: Any) -> bool:
        if tp is Any:
            return True
        return any(loose(arg) for arg in typing.get_args(tp) if arg is not type(None))
    return loose(info.annotation)


def missing(kind: str) -> list[str]:
    """What the reference lacks for ``kind``'s models: each as one line saying what to add."""
    out = []
    for field in walk(ROOTS[kind]):
        key = KEYS.get(field.id)
        where = f"{kind}: {field.path} ({field.id})"
        if key is None:
            out.append(f"{where}: no description in narwhal/config/reference.py KEYS")
            continue
        if key.accepts is None and reads_before(field.info):
            out.append(f"{where}: reads YAML through a BeforeValidator; say what it accepts (Key.accepts)")
        if key.accepts is None and field.id not in NESTED and is_any(field.info):
            out.append(f"{where}: typed loosely; name its model in NESTED or give Key.accepts")
    for model, _ in models(ROOTS[kind]):
        if model.__name__ not in SECTIONS:
            out.append(f"{kind}: model {model.__name__}: no section in narwhal/config/reference.py SECTIONS")
    return out


def stale() -> list[str]:
    """KEYS entries that no model has any more."""
    known = {f.id for kind in KINDS for f in walk(ROOTS[kind])}
    return sorted(k for k in KEYS if k not in known)


# --- JSON Schema ------------------------------------------------------------------------------


def schema(kind: str) -> dict:
    """The JSON Schema of a ``kind`` file (``pipeline`` or ``inventory``)."""
    root = ROOTS[kind]
    out = root.model_json_schema()
    defs = out.setdefault("$defs", {})
    for _, model in NESTED.values():
        if model.__name__ not in defs and any(f.model is model for f in walk(root)):
            sub = model.model_json_schema()
            defs.update(sub.pop("$defs", {}))
            defs[model.__name__] = sub
    for model, _ in models(root):
        target = out if model is root else defs[model.__name__]
        target.pop("title", None)
        heading, about = SECTIONS.get(model.__name__, (model.__name__, ""))
        target["description"] = f"{heading}: {about}" if about else heading
        for name, prop in target.get("properties", {}).items():
            key = KEYS.get(f"{model.__name__}.{name}")
            _describe(prop, key, name)
            if key is not None and key.default is not None and name in target.get("required", []):
                target["required"].remove(name)  # the loader fills it in (a pipeline's name: its file's)
    def props_of(model: type[BaseModel]) -> dict:
        return (out if model is root else defs[model.__name__])["properties"]

    for field in walk(root):
        if field.id in NESTED:
            shape, model = NESTED[field.id]
            inner = {"$ref": f"#/$defs/{model.__name__}"}
            body = ({"type": "object", "additionalProperties": inner} if shape == "map"
                    else {"type": "array", "items": inner})
            _replace_type(props_of(field.model)[field.name], _nullable(body))
    if root is Inventory:
        defs["RunnerDefaults"] = _runner_defaults(defs["Runner"])
        defs["Settings"] = settings_schema()
        props_of(Inventory)["secrets"]["anyOf"][0]["propertyNames"] = {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"}
    return {"$schema": SCHEMA_DIALECT, "title": f"narwhal {kind}", **out}


def _describe(prop: dict, key: Key | None, name: str) -> None:
    prop.pop("title", None)
    if key is None:
        return
    prop["description"] = _plain(key.help)
    prop["markdownDescription"] = key.help
    if key.accepts is not None:
        _replace_type(prop, copy.deepcopy(key.accepts))
    value = example_value(key, name)
    if value is not None:
        prop["examples"] = [value]


def _replace_type(prop: dict, accepts: dict) -> None:
    """PROP's type words replaced by ACCEPTS (its description, default and examples kept)."""
    for word in ("type", "anyOf", "items", "$ref", "enum", "minItems", "maxItems", "minLength", "pattern",
                 "additionalProperties", "propertyNames", "exclusiveMinimum", "minimum", "maximum"):
        prop.pop(word, None)
    prop.update(accepts)


def _runner_defaults(runner: dict) -> dict:
    out = copy.deepcopy(runner)
    out["properties"].pop("name", None)
    out.pop("required", None)
    out["description"] = "Runner keys merged under every runner: every key of a runner but `name`."
    return out


def settings_schema() -> dict:
    """``settings:``: every Settings field with its kind's YAML forms, its help and default."""
    props = {}
    for f in fields(Settings):
        kind = Settings.kind(f.name)
        help_ = f.metadata["help"]
        props[f.name] = {**copy.deepcopy(SETTING_SCHEMAS[kind]), "description": help_,
                         "markdownDescription": f"{help_} (default `{show_setting(kind, f.default)}`)"}
    return {"type": "object", "additionalProperties": False, "properties": props,
            "description": "The dispatcher's settings (every one has a default)."}


def _plain(markdown: str) -> str:
    return markdown.replace("`", "")


def example_value(key: Key, name: str) -> Any:
    """The value a key's example gives it (its YAML read), or None."""
    if key.example is None:
        return None
    data = yaml.safe_load(key.example)
    return data.get(name) if isinstance(data, dict) else None


# --- the Markdown reference -------------------------------------------------------------------


def type_text(prop: dict, key: Key | None) -> str:
    """A key's type in words, from its schema (or the Key's own words)."""
    if key is not None and key.type:
        return key.type
    options = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
    return " or ".join(_one_type(p) for p in options) or "any"


def _one_type(p: dict) -> str:
    if "$ref" in p:
        name = p["$ref"].rsplit("/", 1)[-1]
        return f"{SECTIONS.get(name, (name,))[0].lower()} (below)"
    if "enum" in p:
        return "one of " + ", ".join(f"`{v}`" for v in p["enum"])
    kind = p.get("type")
    if kind == "array":
        items = p.get("items") or {}
        if "$ref" in items:
            return f"list, each {_one_type(items)}"
        inner = _one_type(items)
        return f"list of {inner}s" if " " not in inner else f"list of {inner}"
    if kind == "object":
        return "mapping"
    return {"string": "string", "integer": "integer", "number": "number", "boolean": "true or false"}.get(
        str(kind), str(kind or "any"))


def default_text(info: FieldInfo, key: Key | None) -> str:
    if key is not None and key.default is not None:
        return key.default
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def reference(kind: str) -> str:
    """The Markdown reference of a ``kind`` file, between the markers."""
    root = ROOTS[kind]
    full = schema(kind)
    lines = [BEGIN, ""]
    for model, where in models(root):
        heading, about = SECTIONS.get(model.__name__, (model.__name__, ""))
        anchor = f" (`{where}`)" if where else ""
        lines += [f"### {heading}{anchor}", "", about, ""]
        props = (full if model is root else full["$defs"][model.__name__]).get("properties", {})
        for name, info in model.model_fields.items():
            key = KEYS.get(f"{model.__name__}.{name}")
            lines += [f"#### `{name}`", "",
                      f"*{type_text(props.get(name, {}), key)}* · default: {default_text(info, key)}", ""]
            lines += [key.help if key else "(not described yet)", ""]
            if key is not None and key.example:
                lines += ["```yaml", key.example, "```", ""]
        if model is Inventory:
            lines += settings_reference()
    lines.append(END)
    return "\n".join(lines)


def settings_reference() -> list[str]:
    lines = ["### Settings (`settings`)", "",
             "Durations as `90s`, `10m`, `1h30m` (or seconds); sizes as `512k`, `4m`, `1g` (or bytes).", "",
             "| setting | default | meaning |", "|---|---|---|"]
    for name, default, help_ in Settings.describe():
        lines.append(f"| `{name}` | `{show_setting(Settings.kind(name), default)}` | {help_} |")
    return [*lines, ""]


def replace_reference(text: str, kind: str) -> str:
    """TEXT with the reference between the markers regenerated."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + reference(kind) + text[end:]


if __name__ == "__main__":  # python -m narwhal.config.reference [ROOT]: regenerate docs/pipelines.md and inventory.md
    import sys
    from pathlib import Path

    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
    for kind_, doc in DOCS.items():
        path = base / doc
        path.write_text(replace_reference(path.read_text(), kind_))
