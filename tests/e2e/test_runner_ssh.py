"""run_job and the SSH transport against real sshd runner hosts and the real dockerd."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narwhal.errors import HostKeyMismatch, RunnerUnreachable
from narwhal.execution import docker as narwhal_docker
from narwhal.execution import health
from narwhal.execution.runner import Outcome, reap
from narwhal.execution.source import Mirror
from narwhal.execution.ssh import SSHTransport
from narwhal.execution.transport import make_transport
from narwhal.job import JobStatus, StepStatus
from tests.e2e.test_runner_local import (
    TWO_STEP_LINES,
    TWO_STEPS,
    execute,
    leftovers,
    make_pipeline,
    make_runner,
    new_owner,
    spec_for,
    wait_for_line,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def mirror(tmp_path) -> Mirror:
    return Mirror(tmp_path / "mirrors")


def transport_for(host, **settings_) -> SSHTransport:
    transport = make_transport(make_runner(host.runner_config()), settings_ or None)
    assert isinstance(transport, SSHTransport)
    return transport


def test_two_step_job_over_ssh(docker_engine, test_image, ssh_host, git_repo, mirror):
    owner = new_owner()
    spec = spec_for(make_pipeline(test_image, *TWO_STEPS), git_repo.commit)
    outcome, sink = execute(transport_for(ssh_host), spec, git_repo.path, mirror, owner)
    assert outcome == Outcome(JobStatus.PASSED, None), sink.lines
    assert sink.user_lines() == TWO_STEP_LINES
    assert [e for e in sink.events if e[0] == "started"] == [("started", 0, "s0"), ("started", 1, "s1")]
    assert leftovers(docker_engine, owner) == ([], [])


def test_failing_step_over_ssh(docker_engine, test_image, ssh_host, git_repo, mirror):
    owner = new_owner()
    run = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done; exit 42"
    spec = spec_for(make_pipeline(test_image, run, "true"), git_repo.commit)
    outcome, sink = execute(transport_for(ssh_host), spec, git_repo.path, mirror, owner)
    assert outcome == Outcome(JobStatus.FAILED, "exit 42 in step s0")
    # stderr is merged into the same log, in the order the step wrote it
    assert sink.user_lines() == [f"{kind}{i}" for i in range(1, 6) for kind in ("out", "err")]
    assert sink.events[-1] == ("finished", 1, "s1", StepStatus.SKIPPED, None)
    assert leftovers(docker_engine, owner) == ([], [])


def test_cancel_over_ssh_stops_the_container(docker_engine, test_image, ssh_host, git_repo, mirror):
    owner = new_owner()
    spec = spec_for(make_pipeline(test_image, "echo ready; sleep 1000"), git_repo.commit, grace=1)

    async def cancel_when_ready(sink, cancel):
        await wait_for_line(sink, "ready")
        cancel.set()

    outcome, _ = execute(transport_for(ssh_host), spec, git_repo.path, mirror, owner, cancel_when_ready)
    assert outcome == Outcome(JobStatus.CANCELLED, "cancelled")
    assert leftovers(docker_engine, owner) == ([], [])


def _log_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def test_changed_host_key_is_refused_and_nothing_runs(docker_engine, test_image, ssh_host, git_repo, mirror):
    ssh_host.regenerate_host_key()  # known_hosts still has the old key
    offset = _log_size(ssh_host.log_path)
    canary = f"/tmp/narwhal-canary-{uuid.uuid4().hex}"
    transport = transport_for(ssh_host)
    with pytest.raises(HostKeyMismatch) as caught:
        asyncio.run(transport.run(["touch", canary]))
    assert str(caught.value).startswith(
        f"host key mismatch for runner-1 ({ssh_host.address}:{ssh_host.port})")
    assert not os.path.exists(canary)

    owner = new_owner()
    with pytest.raises(HostKeyMismatch):
        execute(transport_for(ssh_host), spec_for(make_pipeline(test_image, f"touch {canary}"), git_repo.commit),
                git_repo.path, mirror, owner)
    assert leftovers(docker_engine, owner) == ([], [])
    with open(ssh_host.log_path, errors="replace") as f:
        f.seek(offset)
        assert "Accepted publickey" not in f.read()  # we never even logged in

    state = check_health(ssh_host)
    assert state.state == "unhealthy" and "host key mismatch" in state.reason


def test_unknown_host_is_refused(ssh_host, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    runner = make_runner({**ssh_host.runner_config(), "known_hosts": str(empty)})
    with pytest.raises(HostKeyMismatch, match="host key mismatch for runner-1"):
        asyncio.run(SSHTransport(runner).run(["true"]))


def test_unreachable_host(ssh_host):
    ssh_host.stop()
    transport = transport_for(ssh_host, reconnect_attempts=2, reconnect_backoff=0.05)
    with pytest.raises(RunnerUnreachable, match=f"runner runner-1 \\({ssh_host.address}:{ssh_host.port}\\) unreachable"):
        asyncio.run(transport.run(["true"]))
    state = check_health(ssh_host, reconnect_attempts=1)
    assert state.state == "unhealthy" and "unreachable" in state.reason


def test_lost_runner_raises_and_reap_cleans_up_later(docker_engine, test_image, ssh_host, git_repo, mirror):
    owner = new_owner()
    spec = spec_for(make_pipeline(test_image, "echo ready; sleep 1000"), git_repo.commit)

    async def kill_host_when_ready(sink, cancel):
        await wait_for_line(sink, "ready")
        ssh_host.kill()  # sshd and every session die, like a pulled plug

    with pytest.raises(RunnerUnreachable, match="runner-1"):
        execute(transport_for(ssh_host), spec, git_repo.path, mirror, owner, kill_host_when_ready)
    containers, volumes = leftovers(docker_engine, owner)
    assert volumes == [narwhal_docker.volume_name(owner, spec.job_id, 1)]  # left behind for reap

    ssh_host.start()

    async def reap_all():
        transport = transport_for(ssh_host)
        try:
            return await reap(transport, owner, set())
        finally:
            await transport.close()

    removed = asyncio.run(reap_all())
    assert set(removed) == set(containers) | set(volumes)
    assert leftovers(docker_engine, owner) == ([], [])


def test_frozen_runner_is_noticed_by_keepalives(ssh_host):
    async def main():
        transport = transport_for(ssh_host, keepalive_interval=0.5, keepalive_count_max=2,
                                  reconnect_attempts=1, connect_timeout=2)
        try:
            assert (await transport.run(["true"])).ok
            ssh_host.freeze()
            lines: list[str] = []
            with pytest.raises(RunnerUnreachable, match="runner-1"):
                await transport.stream(["sleep", "1000"], on_line=lines.append)
        finally:
            ssh_host.thaw()
            await transport.close()

    asyncio.run(main())


def test_many_channels_on_one_connection(ssh_host):
    async def main():
        transport = transport_for(ssh_host)
        try:
            results = await asyncio.gather(*[transport.run(["echo", str(i)]) for i in range(40)])
            return [r.stdout for r in results]
        finally:
            await transport.close()

    assert asyncio.run(main()) == [f"{i}\n".encode() for i in range(40)]
    with open(ssh_host.log_path, errors="replace") as f:
        assert f.read().count("Accepted publickey") == 1  # one connection for all of them


def test_stream_feeds_stdin_and_flushes_the_last_line(ssh_host):
    async def source():
        for chunk in (b"alpha\nbe", b"ta\n", "gamma \u00e9\n".encode(), b"\xffno-newline"):
            yield chunk

    async def main():
        transport = transport_for(ssh_host)
        lines: list[str] = []
        try:
            code = await transport.stream(["cat"], stdin=source(), on_line=lines.append)
        finally:
            await transport.close()
        return code, lines

    assert asyncio.run(main()) == (0, ["alpha", "beta", "gamma \u00e9", "\ufffdno-newline"])


ARG = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(ARG, min_size=1, max_size=6))
def test_argv_round_trips_byte_exact_through_sshd(ssh_host, args):
    result = _loop().run_until_complete(_shared_transport(ssh_host).run(["printf", "%s\\0", *args]))
    assert result.ok, result
    assert result.stdout == b"".join(arg.encode("utf-8") + b"\0" for arg in args)


# One event loop and one connection for every hypothesis example of a test.
_state: dict = {}


def _loop() -> asyncio.AbstractEventLoop:
    if "loop" not in _state:
        _state["loop"] = asyncio.new_event_loop()
    return _state["loop"]


def _shared_transport(host) -> SSHTransport:
    if _state.get("host") is not host:
        _state["host"] = host
        _state["transport"] = transport_for(host)
    return _state["transport"]


@pytest.fixture(autouse=True)
def _close_shared_transport():
    yield
    transport = _state.pop("transport", None)
    _state.pop("host", None)
    loop = _state.pop("loop", None)
    if loop is not None:
        if transport is not None:
            loop.run_until_complete(transport.close())
        loop.close()


def check_health(host, **settings_) -> health.Health:
    async def main():
        transport = transport_for(host, **settings_)
        try:
            return await health.check(transport)
        finally:
            await transport.close()

    return asyncio.run(main())


def test_health_over_ssh(ssh_host):
    state = check_health(ssh_host)
    assert state.state == "healthy", state.reason
    assert state.docker_version and state.free_disk and state.ncpu


def test_a_remote_command_that_ignores_stdin_ends_the_stream(ssh_host):
    async def endless():
        while True:
            yield b"x" * 65536

    async def main():
        transport = transport_for(ssh_host)
        try:
            return [await transport.stream(argv, stdin=endless(), on_line=print, timeout=120)
                    for argv in (["true"], ["sh", "-c", "head -c 100000 >/dev/null; exit 3"])]
        finally:
            await transport.close()

    assert asyncio.run(main()) == [0, 3]


def test_the_transport_reconnects_after_the_host_comes_back(ssh_host):
    async def main():
        transport = transport_for(ssh_host, reconnect_backoff=0.05)
        try:
            assert (await transport.run(["echo", "one"])).stdout == b"one\n"
            ssh_host.stop()  # drops our connection
            ssh_host.start()
            return (await transport.run(["echo", "two"])).stdout
        finally:
            await transport.close()

    assert asyncio.run(main()) == b"two\n"
