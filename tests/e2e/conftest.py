"""End-to-end fixtures: the real dispatcher as a subprocess on a loopback port."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

import testbed
from narwhal.api.server import ServeProcess, free_port
from narwhal.dispatch.store import Store
from testbed import TEST_IMAGE
from tests.conftest import require
from tests.e2e.cluster import CAPACITY, NODES, DockerWitness

# Fast health polling and loss detection for tests; real deployments use the defaults.
TEST_SETTINGS = {
    "health_interval": 0.5,
    "health_timeout": 5,
    "keepalive_interval": 1,
    "keepalive_count_max": 3,
    "connect_timeout": 5,
    "stop_grace": 2,
}


def simple_pipeline(steps: list[dict] | None = None, **extra: Any) -> dict:
    return {
        "repo": "*",
        "image": TEST_IMAGE,
        "steps": steps or [{"name": "hello", "run": "echo hello from $NARWHAL_COMMIT"}],
        **extra,
    }


class DispatcherProcess(ServeProcess):
    """The real dispatcher process (narwhal.api.server.ServeProcess) plus a tiny HTTP client."""

    def log(self) -> str:
        return self.log_tail()

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        headers = {**self.headers(), **kw.pop("headers", {})}
        return requests.post(self.url + path, json=body, headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def submit(self, repo: str, commit: str, branch: str | None = None) -> list[dict]:
        body = {"repo": repo, "commit": commit}
        if branch:
            body["branch"] = branch
        r = self.post("/commit", body)
        assert r.status_code in (200, 202), r.text
        return r.json()["jobs"]

    def wait_job(self, job_id: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/jobs/{job_id}").json()
            if job["status"] in ("passed", "failed", "error", "cancelled"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not finished after {timeout}s: {job}\n{self.log()}")

    def wait_for(self, condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"{what} not reached after {timeout}s\n{self.log()}")


def write_config(config_dir: Path, runners: list[dict], pipelines: dict[str, dict],
                 settings: dict | None = None, defaults: dict | None = None,
                 inventory_extra: dict | None = None) -> None:
    """A config in CONFIG_DIR; the test's folder (CONFIG_DIR's parent, where the test's
    repositories live) is the one local root unless ``settings`` says otherwise."""
    (config_dir / "pipelines").mkdir(parents=True, exist_ok=True)
    inventory: dict[str, Any] = {"runners": runners}
    if defaults:
        inventory["defaults"] = defaults
    inventory["settings"] = {**TEST_SETTINGS, "local_roots": [str(config_dir.parent)], **(settings or {})}
    inventory.update(inventory_extra or {})  # secrets:, forges:
    (config_dir / "inventory.yaml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    for old in (config_dir / "pipelines").glob("*.yaml"):
        old.unlink()
    for name, data in pipelines.items():
        (config_dir / "pipelines" / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture
def dispatcher(tmp_path, docker_engine, test_image) -> Iterator[Callable[..., DispatcherProcess]]:
    """Factory: ``dispatcher(runners, pipelines, settings=None, token=None, defaults=None,
    inventory=None, args=(), env=None, prefix=(), host="127.0.0.1")`` starts narwhal serve
    (``prefix``, ``host``: in a network namespace, see ``NetnsLink.exec_prefix``)."""
    started: list[DispatcherProcess] = []

    def start(runners: list[dict], pipelines: dict[str, dict], settings: dict | None = None,
              token: str | None = None, defaults: dict | None = None, inventory: dict | None = None,
              args: tuple[str, ...] = (), env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
              host: str = "127.0.0.1") -> DispatcherProcess:
        config_dir = tmp_path / f"config{len(started)}"
        write_config(config_dir, runners, pipelines, settings, defaults, inventory)
        d = DispatcherProcess(config_dir=config_dir, state_dir=tmp_path / f"state{len(started)}",
                              port=free_port(), log_path=tmp_path / f"dispatcher{len(started)}.log", token=token,
                              args=args, env=dict(env or {}), prefix=tuple(prefix), host=host)
        started.append(d)
        d.start()
        owners.add(d.get("/health", headers=d.headers()).json()["owner"])  # details need the token (read_token)
        return d

    owners: set[str] = set()
    yield start
    for d in started:
        d.stop(signal.SIGTERM, timeout=30)
    # A runner host may have been stopped before its dispatcher (fixture teardown order),
    # cutting a `docker run` short; that dispatcher's reaper never runs again, so sweep here.
    for owner in owners:
        label = {"label": [f"narwhal.owner={owner}"]}
        for c in docker_engine.api.containers(all=True, filters=label):
            docker_engine.api.remove_container(c["Id"], force=True)
        for n in docker_engine.api.networks(filters=label):  # jobs with services
            docker_engine.api.remove_network(n["Id"])
        for v in docker_engine.api.volumes(filters=label).get("Volumes") or []:
            docker_engine.api.remove_volume(v["Name"], force=True)


@pytest.fixture
def cluster(dispatcher, ssh_hosts, postgres, docker_engine) -> Iterator[Callable[..., tuple]]:
    """Factory: ``cluster(steps)`` starts NODES dispatchers on one fresh database (settings.cluster),
    each with the same three runner hosts of capacity CAPACITY (one config, NODES copies), and
    answers (nodes, a Store on that database, a DockerWitness of their containers)."""
    database = postgres.cluster.create_database(postgres.template)
    url = postgres.cluster.url(database)
    hosts = ssh_hosts(3)
    started: list[DispatcherProcess] = []

    def start(steps: list[dict]) -> tuple[list[DispatcherProcess], Store, DockerWitness]:
        settings = {"store": url, "store_password": "PGPASS", "cluster": True}
        inventory = {"secrets": {"PGPASS": {"env": "NARWHAL_TEST_PGPASS"}}}
        env = {"NARWHAL_TEST_PGPASS": postgres.cluster.password}
        runners = [h.runner_config(capacity=CAPACITY) for h in hosts]
        for _ in range(NODES):
            started.append(dispatcher(runners, {"ci": simple_pipeline(steps)}, settings=settings,
                                      inventory=inventory, env=env))
        owner = started[0].get("/health").json()["owner"]
        assert {d.get("/health").json()["owner"] for d in started} == {owner}
        return started, Store(url, password=postgres.cluster.password), DockerWitness(docker_engine, owner)

    try:
        yield start
    finally:
        for d in started:  # before their database goes: a node that lost it would wait on it to stop
            d.stop(signal.SIGTERM, timeout=30)
        postgres.cluster.drop_database(database)


@pytest.fixture
def haproxy() -> Iterator[Callable[[list[str]], testbed.HAProxy]]:
    """Factory: ``haproxy(["127.0.0.1:PORT", ...])`` starts Debian's HAProxy running the shipped
    example (deploy/haproxy.cfg) in front of those nodes (testbed/haproxy.py)."""
    started: list[testbed.HAProxy] = []

    def start(servers: list[str]) -> testbed.HAProxy:
        proxy = require(testbed.start_haproxy, servers)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def sse_events(response: requests.Response) -> Iterator[dict]:
    """Parse a Server-Sent Events stream into dicts {id, event, data}."""
    event: dict = {}
    for raw in response.iter_lines(decode_unicode=True):
        if raw is None:
            continue
        if raw == "":
            if "data" in event or "event" in event:
                yield event
            event = {}
            continue
        if raw.startswith(":"):
            continue
        key, _, value = raw.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data" and "data" in event:
            event["data"] += "\n" + value
        else:
            event[key] = value


def json_end(event: dict) -> dict:
    return json.loads(event["data"])
