"""Pipelines: which repositories and branches they build, and the steps they run.

A pipeline can only say *what* to run (commands, image, environment, timeouts,
labels, services beside the steps, the order of the steps). Anything that would widen a
container's powers (``privileged``, ``volumes``, ``cap_add``, ``network``...) is simply
not a field, so it is refused as an unknown key like any typo.

Steps form a graph (``narwhal.config.graph``): with ``depends_on`` on any step, each step
waits for the steps it names and steps that wait for nothing run side by side, up to
``parallel`` at once; without it, each step waits for the one before, as always.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from narwhal.config import graph
from narwhal.config.cache import MAX_CACHES, Cache, cache_problems
from narwhal.config.conditions import StepWhen, When, branch_matches, check_branch
from narwhal.config.duration import parse_duration
from narwhal.config.inventory import NAME_RE, Labels, Name
from narwhal.config.matrix import MatrixError, apply, combinations, label
from narwhal.config.repository import (
    GLOB_CHARS,
    RepositoryError,
    canonical_pattern,
    canonical_repo,
    glob_match,
    pattern_host,
)
from narwhal.config.schedule import Schedule
from narwhal.config.yamlfile import (
    Document,
    duplicate_names,
    format_path,
    line_order,
    load_yaml,
    matching,
    show_value,
    validation_problems,
)
from narwhal.errors import ConfigError, Problem

STEP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REGISTRY = r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?/"
IMAGE_RE = re.compile(
    rf"(?:{_REGISTRY})?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?"
)
DEFAULT_TIMEOUT = parse_duration("1h")
# A service's name is the host name steps reach it by: one DNS label, lowercase.
SERVICE_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
DEFAULT_READY_TIMEOUT = parse_duration("60s")
DEFAULT_PARALLEL = 4  # steps of one job at once, at most (the runner's free capacity may allow fewer)
MAX_PARALLEL = 64
MAX_STEPS = 256
MAX_SERVICES = 16
MAX_RETRY = 10
MAX_CLONE_DEPTH = 1_000_000
MAX_ARTIFACT_PATTERNS = 64
MAX_ARTIFACT_PATTERN = 512  # characters of one artifact pattern
GRAPH_ERROR = "step_graph"  # pydantic error type of an unknown or circular depends_on


check_step_name = matching(STEP_NAME_RE, "a step name of letters, digits, spaces, '.', '_' or '-' "
                                         "(1-63 characters, starting with a letter or digit)")


def check_image(value: str) -> str:
    """A conservative image reference: it becomes an argument of ``docker run``."""
    if len(value) > 255 or not IMAGE_RE.fullmatch(value):
        raise ValueError(f"expected an image reference such as 'debian:12' or 'registry:5000/team/app:1.0', got {show_value(value)}")
    return value


def check_pattern(value: str) -> str:
    """A repository glob, in the canonical spelling (narwhal.config.repository) it is matched against."""
    if not value or value.startswith("-") or any(ord(c) < 32 or c == "\x7f" for c in value) or len(value) > 1024:
        raise ValueError(f"expected a repository URL, path or glob (not starting with '-'), got {show_value(value)}")
    try:
        return canonical_pattern(value)
    except RepositoryError as e:
        raise ValueError(str(e)) from None


check_env_name = matching(ENV_NAME_RE, "a variable name of letters, digits and '_' (not starting with a digit)")
check_service_name = matching(SERVICE_NAME_RE, "a service name of lowercase letters, digits and '-' "
                                               "(1-63 characters, a host name: starting and ending with a letter or digit)")


def check_argument(value: str) -> str:
    """One argv element: any text but a NUL byte (no shell ever reads it unquoted)."""
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _duration(value: Any) -> Any:
    return None if value is None else parse_duration(value)


def _env_values(value: Any) -> Any:
    """Scalars become the strings a process sees; ``true`` stays lowercase as written."""
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (int, float)):
            v = str(v)
        out[k] = v
    return out


class SecretRef(BaseModel):
    """A secret a pipeline or step asks for, by name (``inventory.yaml``'s ``secrets:``).

    Written as the bare name, or ``{name: NAME, optional: true}`` for a job that may run
    without it (a pull request, say): then a job that may not have it runs without it
    instead of failing at submission.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, AfterValidator(check_env_name)]
    optional: bool = False


def _secret_refs(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


Duration = Annotated[float, BeforeValidator(_duration)]
SecretRefs = Annotated[list[SecretRef], BeforeValidator(_secret_refs)]
Env = Annotated[dict[Annotated[str, AfterValidator(check_env_name)], str], BeforeValidator(_env_values)]
Image = Annotated[str, AfterValidator(check_image)]
Argument = Annotated[str, AfterValidator(check_argument), Field(min_length=1)]


def _command(value: Any) -> str | list[str] | None:
    """A shell command (a string) or the entrypoint's arguments (a list of strings)."""
    if value is None:
        return None
    if isinstance(value, str) and value:
        return check_argument(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [check_argument(v) for v in value]
    raise ValueError(f"expected a shell command (a string) or a list of arguments (strings), got {show_value(value)}")


Command = Annotated[
    str | list[str] | None,
    PlainValidator(_command),
    WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1},
                              {"type": "array", "items": {"type": "string"}, "minItems": 1}]}),
]
StepName = Annotated[str, AfterValidator(check_step_name)]


class Ready(BaseModel):
    """When a service counts as ready: a ``command`` run in it exits 0, or a TCP ``port`` listens in it.

    Either is tried every half second until ``timeout``; steps start once every service is ready.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    command: Argument | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    timeout: Duration = DEFAULT_READY_TIMEOUT

    @model_validator(mode="after")
    def _one_check(self) -> Ready:
        if (self.command is None) == (self.port is None):
            raise ValueError("give either command or port")
        if self.timeout <= 0:
            raise ValueError("timeout must be more than 0")
        return self


class Service(BaseModel):
    """A container beside the steps for the whole job (a database, a cache), reachable by its name.

    ``command`` as a string is run by the image's ``/bin/sh -c``; as a list, its items are
    the arguments of the image's entrypoint (``[postgres, -c, fsync=off]``). Without it the
    image's own command runs.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, AfterValidator(check_service_name)]
    image: Image
    env: Env = {}
    command: Command = None
    ready: Ready | None = None


def check_artifact_pattern(value: str) -> str:
    """A glob of files in the workspace: relative, no ``..`` component, no control characters.

    It reaches the collector only as one argv element (``docker.COLLECT``), never a shell's
    text; these rules keep it inside the workspace before anything runs (the dispatcher checks
    what comes back again, whatever the pattern said). ``./`` in front is dropped.
    """
    if len(value) > MAX_ARTIFACT_PATTERN:
        raise ValueError(f"expected at most {MAX_ARTIFACT_PATTERN} characters, got {len(value)}")
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError("contains a control character (a NUL, a newline...)")
    if value.startswith("/"):
        raise ValueError(f"expected a path relative to the workspace, got {show_value(value)}")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"expected a path inside the workspace (no '..'), got {show_value(value)}")
    if not parts:
        raise ValueError(f"expected a file or glob in the workspace such as 'dist/*.whl', got {show_value(value)}")
    return "/".join(parts)


ArtifactPattern = Annotated[str, AfterValidator(check_artifact_pattern)]


class Artifacts(BaseModel):
    """Files of the workspace kept after the job, in the dispatcher's artifact store."""

    model_config = ConfigDict(extra="forbid", strict=True)

    paths: Annotated[list[ArtifactPattern], BeforeValidator(_as_list),
                     Field(min_length=1, max_length=MAX_ARTIFACT_PATTERNS)]
    expire: Duration | None = None  # None: the dispatcher's artifacts_expire setting
    when: Literal["on_success", "on_failure", "always"] = "on_success"

    def wanted(self, passed: bool) -> bool:
        """Whether a job that ended so (passed, or failed) keeps its files."""
        return self.when == "always" or (self.when == "on_success") == passed


class PipelineStep(BaseModel):
    """One command run with ``/bin/sh -e`` in a fresh container on the job's workspace."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: StepName
    run: str = Field(min_length=1)
    image: Image | None = None
    env: Env = {}
    secrets: SecretRefs = []
    timeout: Duration | None = None
    depends_on: Annotated[list[StepName], BeforeValidator(_as_list)] = []
    when: StepWhen | None = None
    allow_failure: bool = False
    # Runs again after a non-zero exit of its own, up to this many more times (not after a
    # timeout, a cancel or a runner's failure: those are not the step's flakiness).
    retry: int = Field(default=0, ge=0, le=MAX_RETRY)


class Clone(BaseModel):
    """What the workspace holds besides the commit's files (``narwhal.execution.clone``).

    Without ``clone:`` the workspace is ``git archive`` of the commit. ``git: true`` adds a
    real ``.git`` (history, tags, HEAD detached at the commit) made on the dispatcher from its
    mirror; ``submodules: true`` adds each submodule at the commit the superproject records.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    git: bool = False
    submodules: bool = False
    # History shipped in .git: the commit and this many generations behind it (None: all).
    depth: int | None = Field(default=None, ge=1, le=MAX_CLONE_DEPTH)

    @model_validator(mode="after")
    def _depth_needs_git(self) -> Clone:
        if self.depth is not None and not self.git:
            raise ValueError("depth is the history of .git: it needs git: true")
        return self


class Pipeline(BaseModel):
    """What to build for which repositories and branches; loaded from ``pipelines/*.yaml``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    repo: Annotated[list[Annotated[str, AfterValidator(check_pattern)]], BeforeValidator(_as_list), Field(min_length=1)]
    branches: Annotated[list[Annotated[str, AfterValidator(check_branch)]] | None, BeforeValidator(_as_list)] = None
    image: Image | None = None
    labels: Labels = []
    timeout: Duration = DEFAULT_TIMEOUT
    env: Env = {}
    secrets: SecretRefs = []
    when: When | None = None
    schedule: Schedule | None = None
    # Variables to lists of values (narwhal.config.matrix): expanded before validation, so
    # each expanded pipeline holds its own combination here.
    matrix: dict[str, str] | None = None
    services: Annotated[list[Service], Field(max_length=MAX_SERVICES)] = []
    parallel: int = Field(default=DEFAULT_PARALLEL, ge=1, le=MAX_PARALLEL)
    clone: Clone | None = None
    artifacts: Artifacts | None = None
    steps: list[PipelineStep] = Field(min_length=1, max_length=MAX_STEPS)
    # Directories kept on the runner between jobs (narwhal.config.cache).
    cache: Annotated[list[Cache], Field(max_length=MAX_CACHES)] = []

    _document: Document | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _graph(self) -> Pipeline:
        problems = graph_problems(self.steps)
        if problems:
            _, message = problems[0]
            raise PydanticCustomError(GRAPH_ERROR, message)
        return self

    @property
    def is_graph(self) -> bool:
        """Whether any step says ``depends_on`` (``[]`` too: a step that waits for nothing):
        then steps may run side by side."""
        return any("depends_on" in step.model_fields_set for step in self.steps)

    def graph(self) -> dict[str, list[str]]:
        """Step name -> the names it waits for: its ``depends_on``, or the step before it."""
        if self.is_graph:
            return {step.name: list(step.depends_on) for step in self.steps}
        return graph.chain([step.name for step in self.steps])

    @property
    def steps_use_paths(self) -> bool:
        """Whether a step's ``when.paths`` needs the files a commit changed when the job runs."""
        return any(step.when is not None and step.when.paths is not None for step in self.steps)

    def width(self) -> int:
        """The most steps of one job that may run at once: the graph's width, at most ``parallel``."""
        if not self.is_graph:
            return 1
        return max(1, min(self.parallel, graph.width(self.graph())))

    def matches(self, repo: str, branch: str | None = None) -> bool:
        """Whether a commit on ``repo``/``branch`` should run this pipeline.

        ``repo`` is canonical (``narwhal.config.repository.canonical_repo``), and so are
        the patterns: ``*`` stays inside one path segment, ``**`` crosses ``/``.
        No ``branches`` means every branch. A pipeline that lists ``branches`` runs
        only for a known branch that matches: a commit posted without a branch could
        be on any branch, and such pipelines often hold what only those branches may
        use (deploy keys), so it matches only pipelines without ``branches``.
        """
        if not any(glob_match(pattern, repo) for pattern in self.repo):
            return False
        if self.branches is None:
            return True
        return branch is not None and branch_matches(self.branches, branch)

    def fetch_hosts(self) -> set[str]:
        """Hosts (``host[:port]``) this pipeline's repo patterns name without a glob."""
        return {h for h in map(pattern_host, self.repo) if h is not None}

    def scheduled_repos(self) -> list[str]:
        """The repositories a ``schedule`` builds: those its repo patterns name exactly, canonical."""
        return self.schedule_targets()[0]

    def schedule_targets(self) -> tuple[list[str], list[tuple[int, str]]]:
        """(repositories a schedule builds, [(index, why not)] for the repo patterns it cannot).

        A glob names no one repository to fetch, so only patterns without glob characters
        that are themselves a repository narwhal accepts are scheduled.
        """
        repos: list[str] = []
        skipped: list[tuple[int, str]] = []
        for i, pattern in enumerate(self.repo):
            if any(c in pattern for c in GLOB_CHARS):
                skipped.append((i, f"repo pattern {pattern!r} is a glob: a schedule builds only repositories "
                                   "named exactly, so it is not scheduled"))
                continue
            try:
                repo = canonical_repo(pattern)
            except RepositoryError as e:
                skipped.append((i, f"repo pattern {pattern!r} is not scheduled: {e}"))
                continue
            if not glob_match(pattern, repo):
                skipped.append((i, f"repo pattern {pattern!r} is not scheduled: it does not match its own "
                                   f"repository {repo!r}"))
            elif repo not in repos:
                repos.append(repo)
        return repos, skipped

    def image_for(self, step: PipelineStep) -> str:
        image = step.image or self.image
        assert image is not None, "validated: every step has an image"
        return image

    def timeout_for(self, step: PipelineStep) -> float:
        return step.timeout if step.timeout is not None else self.timeout

    def env_for(self, step: PipelineStep) -> dict[str, str]:
        """The pipeline's environment with the step's own values on top."""
        return {**self.env, **step.env}

    def secrets_for(self, step: PipelineStep) -> list[SecretRef]:
        """The secrets a step gets: the pipeline's and its own (its own ``optional`` wins)."""
        refs = {ref.name: ref for ref in self.secrets}
        refs.update({ref.name: ref for ref in step.secrets})
        return list(refs.values())

    def secret_names(self) -> list[str]:
        """Every secret the pipeline or one of its steps asks for, in order."""
        return list(dict.fromkeys([r.name for r in self.secrets]
                                  + [r.name for s in self.steps for r in s.secrets]))

    def required_secrets(self) -> list[str]:
        """The secrets some step needs (not marked optional there)."""
        return list(dict.fromkeys(r.name for s in self.steps for r in self.secrets_for(s) if not r.optional))

    def where(self, path: tuple = ()) -> tuple[str | None, int | None]:
        """File and line a part of this pipeline came from, for warnings."""
        if self._document is None:
            return None, None
        return self._document.filename, self._document.line_of(path)


def load_pipeline(path: str | os.PathLike, name: str | None = None) -> Pipeline:
    return parse_pipeline(load_yaml(path, name))


def load_pipeline_file(path: str | os.PathLike, name: str | None = None) -> list[Pipeline]:
    """The pipelines one file defines: one, or one per combination of its ``matrix``."""
    return parse_pipelines(load_yaml(path, name))


def parse_pipelines(data: Document | Any, filename: str | None = None) -> list[Pipeline]:
    """Validate a pipeline file; a ``matrix`` expands it (narwhal.config.matrix) before validation."""
    document = data if isinstance(data, Document) else Document(data, filename or "pipeline")
    filename = filename or document.filename
    raw = document.data
    if not isinstance(raw, dict) or raw.get("matrix") is None:
        return [parse_pipeline(document, filename)]
    try:
        combos = combinations(raw["matrix"])
    except MatrixError as e:
        path = ("matrix", *e.path)
        raise ConfigError([Problem(filename, document.line_of(path), format_path(path), str(e))]) from None
    out = []
    for values in combos:
        pipeline = parse_pipeline(Document(apply(raw, values), filename, document.lines), filename)
        pipeline.name = f"{pipeline.name}[{label(values)}]"
        pipeline.matrix = values
        out.append(pipeline)
    return out


def parse_pipeline(data: Document | Any, filename: str | None = None) -> Pipeline:
    """Validate one pipeline; its name defaults to the file's stem. A ``matrix`` is refused
    here: ``parse_pipelines`` expands it."""
    document = data if isinstance(data, Document) else Document(data, filename or "pipeline")
    filename = filename or document.filename
    raw = document.data
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else show_value(raw)
        raise ConfigError([Problem(filename, document.line_of(()), "", f"expected a mapping, got {got}")])
    if raw.get("matrix") is not None:
        raise ConfigError([Problem(filename, document.line_of(("matrix",)), "matrix",
                                   "a matrix pipeline is several pipelines: load it with parse_pipelines")])
    problems: list[Problem] = []
    raw = dict(raw)
    name_from_file = "name" not in raw
    if name_from_file:
        raw["name"] = Path(filename).stem
        if not NAME_RE.fullmatch(raw["name"]):
            problems.append(Problem(filename, document.line_of(()), "name",
                                    f"required: the file name {raw['name']!r} is not a valid pipeline name"))
    problems += _image_problems(raw, filename, document)
    problems += duplicate_names(raw.get("steps"), "steps", "step", filename, document)
    problems += duplicate_names(raw.get("services"), "services", "service", filename, document)
    problems += _graph_problems(raw.get("steps"), filename, document)
    problems += _cache_problems(raw.get("cache"), filename, document)
    pipeline = None
    try:
        pipeline = Pipeline.model_validate(raw)
    except ValidationError as e:
        found = validation_problems(e, Pipeline, filename, document, ignore=(GRAPH_ERROR,))
        problems += [p for p in found if not (name_from_file and p.path == "name")]
    if problems:
        raise ConfigError(sorted(problems, key=line_order))
    assert pipeline is not None
    pipeline._document = document
    return pipeline


def load_pipelines(directory: str | os.PathLike, prefix: str | None = None) -> list[Pipeline]:
    """Every ``*.yaml``/``*.yml`` in ``directory``, sorted by file name.

    Problems from all files are reported together. ``prefix`` is how messages
    name the directory (``pipelines`` gives ``pipelines/example.yaml``).
    """
    directory = Path(directory)
    shown = prefix if prefix is not None else str(directory)
    if not directory.is_dir():
        raise ConfigError([Problem(shown, None, "", "not a directory")])
    pipelines: list[Pipeline] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for path in pipeline_files(directory):
        name = f"{shown}/{path.name}"
        try:
            loaded = load_pipeline_file(path, name)
        except ConfigError as e:
            problems += e.problems
            continue
        for pipeline in loaded:
            if pipeline.name in seen:
                _, line = pipeline.where(("name",))
                problems.append(Problem(name, line, "name",
                                        f"duplicate pipeline name {pipeline.name!r} (also in {seen[pipeline.name]})"))
                continue
            seen[pipeline.name] = name
            pipelines.append(pipeline)
    if problems:
        raise ConfigError(problems)
    return pipelines


def pipeline_files(directory: Path) -> list[Path]:
    """The files ``load_pipelines`` reads; dot-files (editor backups) are skipped."""
    return sorted(
        p for p in directory.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
    )


def _image_problems(raw: dict, filename: str, document: Document) -> list[Problem]:
    steps = raw.get("steps")
    if raw.get("image") is not None or not isinstance(steps, list):
        return []
    missing = [s.get("name", f"#{i + 1}") for i, s in enumerate(steps) if isinstance(s, dict) and s.get("image") is None]
    if not missing:
        return []
    names = ", ".join(str(n) for n in missing)
    return [Problem(filename, document.line_of(("image",)), "image", f"required (steps without their own image: {names})")]




def graph_problems(steps: list[Any]) -> list[tuple[tuple, str]]:
    """(path, message) for each unknown name in a ``depends_on`` and for a cycle.

    ``steps`` are step models or the mappings they come from; items that are not well
    formed are left to the model's own checks.
    """
    deps: dict[str, list[str]] = {}
    where: dict[str, int] = {}
    for i, step in enumerate(steps):
        name = step.get("name") if isinstance(step, dict) else getattr(step, "name", None)
        after = step.get("depends_on", []) if isinstance(step, dict) else getattr(step, "depends_on", [])
        after = [after] if isinstance(after, str) else after
        if not isinstance(name, str) or name in deps or not isinstance(after, list):
            continue
        deps[name] = [d for d in after if isinstance(d, str)]
        where[name] = i
    problems: list[tuple[tuple, str]] = []
    for step, j, dep in graph.unknown(deps):
        known = ", ".join(deps)
        problems.append((("steps", where[step], "depends_on", j),
                         f"unknown step {dep!r} (steps: {known})"))
    for step, after in deps.items():
        if step in after:
            problems.append((("steps", where[step], "depends_on"), f"step {step!r} depends on itself"))
    if not problems:
        cycle = graph.find_cycle(deps)
        if cycle is not None:
            problems.append((("steps", where[cycle[0]], "depends_on"),
                             "steps depend on each other in a cycle: " + " -> ".join(cycle)))
    return problems


def _graph_problems(steps: Any, filename: str, document: Document) -> list[Problem]:
    if not isinstance(steps, list):
        return []
    return [Problem(filename, document.line_of(path), format_path(path), message)
            for path, message in graph_problems(steps)]


def _cache_problems(caches: Any, filename: str, document: Document) -> list[Problem]:
    return [Problem(filename, document.line_of(path), format_path(path), message)
            for path, message in cache_problems(caches)]
