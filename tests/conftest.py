"""Shared fixtures: the real test environment (dockerd, test image, sshd runner hosts, git repos).

Everything comes from ``testbed``, which installs and starts what is missing. When
the machine cannot provide it (not root, not Debian), a test is skipped with the reason,
except under CI (``CI`` set), where the environment is mandatory and the test fails.
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NoReturn, TypeVar

import pytest

import testbed
from narwhal.cli.engine import EngineUnavailable
from narwhal.dispatch.store import Store
from testbed import SshHost

T = TypeVar("T")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call a testbed function; a missing environment fails under CI and skips elsewhere."""
    try:
        return fn(*args, **kwargs)
    except EngineUnavailable as exc:
        unavailable(exc)


def unavailable(exc: EngineUnavailable | str) -> NoReturn:
    """The one rule for a missing environment: fail under CI, skip elsewhere."""
    if _in_ci():
        pytest.fail(f"test environment unavailable: {exc}", pytrace=False)
    pytest.skip(f"test environment unavailable: {exc}")


def need(condition: object, why: str) -> None:
    """A test's precondition on the machine (a tool, a file); use instead of skip/skipif."""
    if not condition:
        unavailable(why)


def parse_python(path: Path) -> ast.Module:
    """``ast.parse`` of a file, on a thread of its own. CPython 3.11 before 3.11.9 (gh-106905)
    can fail with "AST constructor recursion depth mismatch" on a thread whose recursion
    limit was moved mid-stack, as hypothesis does in other tests of the same session."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(ast.parse, path.read_text(), str(path)).result()


def need_module(name: str) -> ModuleType:
    """Import a test-only module; instead of ``pytest.importorskip``."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"python module {name} not importable: {exc}")


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point HOME at an empty directory: no test may read the developer's ~/.ssh or ~/.gitconfig."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        real_home = os.path.expanduser("~")
        if not os.environ.get("PYENV_ROOT") and os.path.isdir(os.path.join(real_home, ".pyenv")):
            mp.setenv("PYENV_ROOT", os.path.join(real_home, ".pyenv"))  # pyenv shims find it via HOME
        mp.setenv("HOME", str(home))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        mp.delenv("SSH_AUTH_SOCK", raising=False)  # no agent keys sneaking into ssh connections
        yield str(home)


@pytest.fixture(scope="session")
def docker_engine():
    """A docker SDK client on a running engine (tests observe containers and volumes with it)."""
    require(testbed.ensure_docker)
    import docker  # the SDK is a test-only dependency

    client = docker.from_env()
    yield client
    client.close()


@pytest.fixture(scope="session")
def test_image(docker_engine) -> str:
    return require(testbed.ensure_image)


@pytest.fixture(scope="session")
def runner_user(docker_engine) -> str:
    return require(testbed.ensure_runner_user)


# 127.0.0.N addresses for fixture hosts, unique within the session; other test sessions on the
# machine may hold some of them, so a taken one is skipped.
_host_numbers = itertools.count(20)


def _next_address() -> str:
    n = next(_host_numbers)
    return f"127.0.{n // 254}.{n % 254 + 1}" if n >= 254 else f"127.0.0.{n}"


_ssh_port: int | None = None


def _host_port() -> int:
    """22 like a real runner, unless a system sshd listens on *:22 (common on CI machines)."""
    global _ssh_port
    if _ssh_port is None:
        override = os.environ.get("NARWHAL_TEST_SSH_PORT")
        if override:
            _ssh_port = int(override)
        else:
            _ssh_port = 22 if testbed.port_free("127.0.0.1", 22) else 10022
    return _ssh_port


def _start_host(name: str, workdir: str, client_key: str | None = None) -> SshHost:
    """Start a host on the next free loopback address (retrying when another process took one)."""
    for _ in range(200):
        address = _next_address()
        try:
            return testbed.start_ssh_host(name, address, os.path.join(workdir, name),
                                          client_key=client_key, port=_host_port())
        except testbed.PortInUse:
            continue
        except EngineUnavailable as exc:
            unavailable(exc)
    pytest.fail(f"no free 127.0.0.N:{_host_port()} address found for an ssh host")


@pytest.fixture
def ssh_host(docker_engine, test_image, runner_user, tmp_path) -> Iterator[SshHost]:
    """One running sshd runner host, login as the runner user, stopped after the test.

    Its host key, config and sshd.log live under tmp_path (pytest keeps recent ones for post-mortems).
    """
    host = _start_host("runner-1", str(tmp_path / "ssh-host"))
    yield host
    host.thaw()
    host.stop()


@pytest.fixture
def netns_link() -> Iterator[testbed.NetnsLink]:
    """A network namespace behind a veth cable of its own (the first free index), removed after the test."""
    link = None
    for index in range(1, 250):
        try:
            link = require(testbed.NetnsLink(index).create)
            break
        except testbed.PortInUse:
            continue
    if link is None:
        pytest.fail("no free network namespace index")
    yield link
    link.delete()


@pytest.fixture
def netns_ssh_host(docker_engine, test_image, runner_user, tmp_path,
                   netns_link) -> Iterator[tuple[SshHost, testbed.NetnsLink]]:
    """A runner host in its own network namespace, behind a veth cable the test can cut."""
    link = netns_link
    host = require(testbed.start_ssh_host, "runner-net", link.address, str(tmp_path / "netns-host"),
                   port=22, netns=link.namespace)
    yield host, link
    link.restore()
    host.thaw()
    host.stop()


@pytest.fixture
def ssh_hosts(docker_engine, test_image, runner_user, tmp_path) -> Iterator[Callable[[int], list[SshHost]]]:
    """Factory: ssh_hosts(n) starts n more runner hosts (runner-1..) sharing one client key."""
    started: list[SshHost] = []
    workdir = str(tmp_path / "ssh-hosts")
    client_key = os.path.join(workdir, "client_ed25519")

    def start(n: int) -> list[SshHost]:
        hosts = []
        for _ in range(n):
            host = _start_host(f"runner-{len(started) + 1}", workdir, client_key)
            started.append(host)
            hosts.append(host)
        return hosts

    yield start
    for host in started:
        host.thaw()
        host.stop()



class Clock:
    """A clock a test moves by hand; it starts at ``now``, or at the real time (whole seconds)
    when a test compares it with files' modification times."""

    def __init__(self, now: float | None = None):
        self.now = float(int(time.time())) if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

@dataclass
class GitRepo:
    path: str
    commit: str

    def add_commit(self, files: dict[str, str | None], message: str = "update") -> str:
        """Commit FILES on top; remembers and returns the new sha."""
        self.commit = testbed.add_commit(self.path, files, message)
        return self.commit


@pytest.fixture
def git_repo(tmp_path) -> GitRepo:
    """A real git repository (branch main) with a README and a build script, one commit."""
    files = {"README.md": "# demo\n", "build.sh": "#!/bin/sh\necho building\n"}
    path, commit = require(testbed.make_git_repo, str(tmp_path / "repo"), files)
    return GitRepo(path, commit)


# --- the store's two backends ------------------------------------------------------------------


@dataclass(frozen=True)
class StoreSpec:
    """Where a test's store lives: a SQLite file or a fresh PostgreSQL database (picklable, so
    a spawned process opens the same one)."""

    kind: str  # sqlite | postgresql
    where: str
    password: str | None = None

    def open(self, clock: Callable[[], float] | None = None) -> Store:
        """The store; ``clock`` (a test's) stands for every clock, the database's included."""
        return Store(self.where, clock=clock, password=self.password)


@dataclass
class Postgres:
    cluster: testbed.PostgresCluster
    template: str  # a database the store has migrated: tests copy it

    def spec(self, migrated: bool = True) -> Iterator[StoreSpec]:
        name = self.cluster.create_database(self.template if migrated else None)
        try:
            yield StoreSpec("postgresql", self.cluster.url(name), self.cluster.password)
        finally:
            self.cluster.drop_database(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster for the session (Debian's package; installed when missing)."""
    need_module("psycopg")
    need_module("psycopg_pool")
    cluster = require(testbed.start_cluster)
    try:
        template = cluster.create_database()
        Store(cluster.url(template), password=cluster.password).close()
        yield Postgres(cluster, template)
    finally:
        cluster.stop()


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    """A new, empty store on each backend in turn: the one contract, both backends."""
    if request.param == "sqlite":
        yield StoreSpec("sqlite", str(tmp_path / "narwhal.db"))
    else:
        yield from request.getfixturevalue("postgres").spec()


@pytest.fixture(params=BACKENDS)
def empty_store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    """Like ``store_spec``, with nothing in it yet: not even the schema (migrations run on open)."""
    if request.param == "sqlite":
        yield StoreSpec("sqlite", str(tmp_path / "narwhal.db"))
    else:
        yield from request.getfixturevalue("postgres").spec(migrated=False)
