"""What the benchmark stands on: runner hosts, repositories, a dispatcher process,
Docker's event stream and held SSH connections for the baselines.

Everything here is started by the bench and stopped by it (``Environment.close``),
also on Ctrl-C. Baseline containers carry the label ``narwhal-bench=<run id>`` so a
leftover one can be found and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import requests
import yaml

import testbed
from narwhal.api.server import ServeProcess, free_port
from narwhal.execution.docker import container_name
from testbed import TEST_IMAGE, SshHost

BENCH_LABEL = "narwhal-bench"
HOST_PREFIX = "127.0.77."  # loopback addresses of our sshd hosts (tests use 127.0.0.20 and up)
FINAL = {"passed", "failed", "error", "cancelled"}


# --- git ---------------------------------------------------------------------------


def git(repo: str, *args: str, input: bytes | None = None) -> bytes:
    env = {**os.environ, **testbed.GIT_ENV}
    return subprocess.run(["git", "-C", repo, *args], input=input, capture_output=True, env=env,
                          check=True).stdout


def make_repo(path: str, commits: int) -> list[str]:
    """A small repository with ``commits`` extra commits on main (git fast-import: one process)."""
    files = {"README.md": "# bench\n", "build.sh": "#!/bin/sh\necho built\n",
             "src/main.c": "int main(void) { return 0; }\n"}
    path, first = testbed.make_git_repo(path, files)
    stream = []
    for i in range(commits):
        body = f"{i}\n".encode()
        stream.append(b"commit refs/heads/main\n")
        stream.append(f"committer Bench <bench@narwhal.invalid> {1700000000 + i} +0000\n".encode())
        stream.append(f"data {len(f'c{i}')}\nc{i}\n".encode())
        if i == 0:
            stream.append(f"from {first}\n".encode())
        stream.append(f"M 644 inline counter.txt\ndata {len(body)}\n".encode() + body + b"\n")
    if commits:
        git(path, "fast-import", "--quiet", input=b"".join(stream))
        git(path, "reset", "-q", "--hard", "main")
    shas = git(path, "rev-list", "--reverse", f"--max-count={commits}", "main").decode().split()
    return shas


def archive(repo: str, commit: str) -> bytes:
    return git(repo, "archive", "--format=tar", commit)


# --- Docker's own clock ------------------------------------------------------------


class DockerEvents:
    """``docker events`` for containers and volumes, kept as (time_ns, type, action, name)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["docker", "events", "--format", "{{json .}}", "--filter", "type=container",
             "--filter", "type=volume"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self.events: list[tuple[int, str, str, str]] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, name="docker-events", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                e = json.loads(raw)
            except ValueError:
                continue
            actor = e.get("Actor") or {}
            name = (actor.get("Attributes") or {}).get("name") if e.get("Type") == "container" else None
            name = name or actor.get("ID", "")
            with self.changed:
                self.events.append((int(e.get("timeNano", 0)), e.get("Type", ""), e.get("Action", ""), name))
                self.changed.notify_all()

    def wait(self, name: str, action: str = "start", timeout: float = 60) -> int:
        """Docker's time (ns since the epoch) of ACTION on the container or volume NAME."""
        def found() -> int | None:
            return next((t for t, _, a, n in self.events if n == name and a == action), None)

        with self.changed:
            if not self.changed.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(f"no docker event {action} for {name} within {timeout:g}s")
            return found()  # type: ignore[return-value]

    def of(self, names: set[str]) -> list[tuple[int, str, str, str]]:
        with self.changed:
            return sorted(e for e in self.events if e[3] in names)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- held SSH connections (baseline c) ---------------------------------------------


class HeldSSH:
    """asyncssh connections held open on one background loop: the best a hand-made CI could do."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="held-ssh", daemon=True)
        self.thread.start()
        self.conns: dict[str, asyncssh.SSHClientConnection] = {}

    def _call(self, coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connect(self, host: SshHost) -> None:
        async def go() -> asyncssh.SSHClientConnection:
            return await asyncssh.connect(host.address, host.port, username=host.user,
                                          client_keys=[host.key_path], known_hosts=host.known_hosts_path,
                                          config=None, agent_path=None)
        self.conns[host.name] = self._call(go())

    def run(self, host: SshHost, argv: list[str], input: bytes | None = None) -> int:
        """Run argv on HOST over its held connection; the exit status."""
        conn = self.conns[host.name]

        async def go() -> int:
            result = await conn.run(shlex.join(argv), input=input, encoding=None, check=False)
            return result.exit_status

        return self._call(go())

    def close(self) -> None:
        async def go() -> None:
            for conn in self.conns.values():
                conn.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.wait_closed(), 5)
        with contextlib.suppress(Exception):
            self._call(go(), timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --- the dispatcher ----------------------------------------------------------------


@dataclass
class BenchDispatcher:
    """One ``narwhal serve`` child process and the few HTTP calls the bench makes."""

    workdir: Path
    name: str
    runners: list[dict]
    pipelines: dict[str, dict]
    settings: dict
    narwhal_src: str | None = None
    inventory: dict = field(default_factory=dict)  # more top-level keys (secrets:, forges:)
    env: dict[str, str] = field(default_factory=dict)  # more environment (a secret's value)
    serve: ServeProcess | None = None
    owner: str = ""
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def config_dir(self) -> Path:
        return self.workdir / f"{self.name}-config"

    @property
    def state_dir(self) -> Path:
        return self.workdir / f"{self.name}-state"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        assert self.serve is not None
        return self.serve.url

    @property
    def port(self) -> int:
        assert self.serve is not None
        return self.serve.port

    @property
    def pid(self) -> int:
        assert self.serve is not None
        return self.serve.pid

    def write_config(self) -> None:
        (self.config_dir / "pipelines").mkdir(parents=True, exist_ok=True)
        # The benchmark's repositories live in its work directory: the one local root.
        inventory = {"runners": self.runners, "settings": {"local_roots": [str(self.workdir)], **self.settings},
                     **self.inventory}
        (self.config_dir / "inventory.yaml").write_text(yaml.safe_dump(inventory, sort_keys=False))
        for pname, data in self.pipelines.items():
            (self.config_dir / "pipelines" / f"{pname}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        if self.narwhal_src:  # run the dispatcher from another source tree (A/B comparisons)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.narwhal_src, os.environ.get("PYTHONPATH")]))
        self.serve = ServeProcess(self.config_dir, self.state_dir, free_port(), self.log_path,
                                  env=env, cwd=self.workdir).start(timeout)
        self.owner = self.get("/health")["owner"]

    def log_tail(self) -> str:
        return self.serve.log_tail(3000) if self.serve else ""

    def wait_runners_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            runners = self.get("/runner")["runners"]
            if runners and all(r["health"]["state"] == "healthy" for r in runners):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"runners not healthy after {timeout:g}s: "
                                   f"{[(r['name'], r['health']) for r in runners]}")
            time.sleep(0.1)

    def get(self, path: str) -> Any:
        r = self.session.get(self.url + path, timeout=60)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any = None) -> Any:
        r = self.session.post(self.url + path, json=body, timeout=60)
        if r.status_code >= 400:
            raise RuntimeError(f"POST {path} -> {r.status_code}: {r.text}")
        return r.json()

    def submit(self, repo: str, commit: str) -> int:
        return self.post("/commit", {"repo": repo, "commit": commit})["jobs"][0]["id"]

    def submit_patiently(self, repo: str, commit: str, tries: int = 600) -> int:
        """``submit``, tried again after a 503 (the repository's fetches at their limit)."""
        for _ in range(tries):
            r = self.session.post(self.url + "/commit", json={"repo": repo, "commit": commit}, timeout=60)
            if r.status_code != 503:
                break
            time.sleep(0.1)
        if r.status_code >= 400:
            raise RuntimeError(f"POST /commit -> {r.status_code}: {r.text}")
        return r.json()["jobs"][0]["id"]

    def follow_to_end(self, job_id: int, on_chunk: Any = None) -> dict:
        """Follow the job's SSE log until its ``end`` event; the end data."""
        with self.session.get(f"{self.url}/jobs/{job_id}/log?follow=1", stream=True, timeout=600) as r:
            r.raise_for_status()
            tail = b""
            for chunk in r.iter_content(65536):
                if on_chunk:
                    on_chunk(chunk)
                tail = (tail + chunk)[-4096:]
                at = tail.rfind(b"event: end\ndata: ")
                if at >= 0 and tail.endswith(b"\n\n"):
                    return json.loads(tail[at + len(b"event: end\ndata: "):].split(b"\n", 1)[0])
        raise RuntimeError(f"job {job_id}: log stream ended without an end event")

    def container(self, job_id: int, idx: int | str, attempt: int = 1) -> str:
        return container_name(self.owner, job_id, attempt, idx)

    def vm_hwm_kib(self) -> int:
        return _proc_status_kib(self.pid, "VmHWM")

    def vm_rss_kib(self) -> int:
        return _proc_status_kib(self.pid, "VmRSS")

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux clear_refs 5), so a scenario's peak is its own."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.serve is None:
            return
        self.serve.stop(timeout=60)
        self.session.close()
        if self.owner:
            remove_labelled(f"narwhal.owner={self.owner}")


def _proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def remove_labelled(label: str) -> None:
    """Force-remove every container, then every volume, carrying LABEL (key=value)."""
    def names(argv: list[str]) -> list[str]:
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        return out.split()

    containers = names(["docker", "ps", "-aq", "--filter", f"label={label}"])
    if containers:
        subprocess.run(["docker", "rm", "-f", *containers], capture_output=True, check=False)
    volumes = names(["docker", "volume", "ls", "-q", "--filter", f"label={label}"])
    if volumes:
        subprocess.run(["docker", "volume", "rm", "-f", *volumes], capture_output=True, check=False)


# --- the whole environment ---------------------------------------------------------


def _start_hosts(n: int, workdir: str) -> list[SshHost]:
    """N sshd runner hosts on free 127.0.77.x addresses (port 22 unless a system sshd has *:22)."""
    port = 22 if testbed.port_free("127.0.0.1", 22) else 10022
    client_key = os.path.join(workdir, "client_ed25519")
    hosts: list[SshHost] = []
    try:
        for last in range(10, 250):
            if len(hosts) == n:
                break
            name = f"runner-{len(hosts) + 1}"
            try:
                hosts.append(testbed.start_ssh_host(name, HOST_PREFIX + str(last), os.path.join(workdir, name),
                                                    client_key=client_key, port=port))
            except testbed.PortInUse:
                continue
    except BaseException:
        for h in hosts:
            h.stop()
        raise
    if len(hosts) < n:
        for h in hosts:
            h.stop()
        raise RuntimeError(f"no free {HOST_PREFIX}x:{port} addresses for {n} sshd hosts")
    return hosts


class Environment:
    """Docker, the test image, 3 sshd runner hosts, a work directory; closed in reverse order."""

    def __init__(self, hosts: int = 3, keep: bool = False):
        self.run_id = uuid.uuid4().hex[:8]
        self.keep = keep
        self.stack = contextlib.ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="narwhal-bench-"))
        self.stack.callback(self._remove_workdir)
        try:
            testbed.ensure_docker()
            testbed.ensure_image()
            testbed.ensure_runner_user()
            self.stack.callback(remove_labelled, f"{BENCH_LABEL}={self.run_id}")
            self.hosts = _start_hosts(hosts, str(self.workdir / "hosts"))
            for h in reversed(self.hosts):
                self.stack.callback(h.stop)
            self.events = DockerEvents()
            self.stack.callback(self.events.close)
            self.held = HeldSSH()
            self.stack.callback(self.held.close)
            for h in self.hosts:
                self.held.connect(h)
        except BaseException:
            self.close()
            raise

    def _remove_workdir(self) -> None:
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def dispatcher(self, name: str, pipelines: dict[str, dict], settings: dict, capacity: int = 2,
                   narwhal_src: str | None = None, start: bool = True,
                   inventory: dict | None = None) -> BenchDispatcher:
        runners = [h.runner_config(capacity=capacity) for h in self.hosts]
        d = BenchDispatcher(self.workdir, name, runners, pipelines, settings, narwhal_src, dict(inventory or {}))
        self.stack.callback(d.stop)
        if start:
            d.start()
        return d

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> Environment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pipeline(repo: str, run: str, image: str = TEST_IMAGE) -> dict:
    return {"repo": [repo], "image": image, "steps": [{"name": "step", "run": run}]}
