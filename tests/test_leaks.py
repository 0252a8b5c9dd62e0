"""Issue "Trust boundaries", findings 2 and 10d: no error, health reason or log line
carries bytes read from a file, and nothing logs a step's env values."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import asyncssh
import pytest

from narwhal.config.inventory import Runner
from narwhal.errors import CommandFailed, HostKeyMismatch, RunnerUnreachable, redact_argv
from narwhal.execution import health
from narwhal.execution.ssh import SSHTransport, _describe
from narwhal.execution.transport import Transport

SECRET = "root:$6$canary-s3cret-hash:19000:0:99999:7:::"
FAST = {"connect_timeout": 2, "reconnect_attempts": 1, "reconnect_backoff": 0.01}


def _transport(tmp_path, **files) -> SSHTransport:
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = {}
    for field, text in files.items():
        path = tmp_path / field
        if text is None:
            path.mkdir()
        else:
            path.write_text(text)
        paths[field] = str(path)
    runner = Runner(name="r1", host="127.0.0.1", port=9, user="ci",
                                   key=paths.get("key"), known_hosts=paths.get("known_hosts", str(tmp_path / "kh")))
    return SSHTransport(runner, FAST)


def _refusal(transport: SSHTransport, kind: type[Exception]) -> str:
    with pytest.raises(kind) as info:
        asyncio.run(transport.connect())
    reason = asyncio.run(health.check(transport, timeout=5)).reason or ""
    assert str(info.value) in reason or reason == str(info.value)
    return str(info.value)


def test_finding2_known_hosts_file_that_is_not_known_hosts_is_named_not_quoted(tmp_path):
    message = _refusal(_transport(tmp_path, known_hosts=SECRET + "\nsecond\n"), HostKeyMismatch)
    assert "known_hosts file" in message and "is not valid" in message
    assert "canary" not in message and "root:" not in message


def test_finding2_known_hosts_with_a_bad_key_or_marker_is_not_quoted(tmp_path):
    public = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    for text in (f"@{SECRET} x y\n", f"|1|{SECRET} {public}\n", f"|2|a|b {public}\n{SECRET}\n"):
        message = _refusal(_transport(tmp_path / str(len(text)), known_hosts=text), HostKeyMismatch)
        assert "is not valid" in message and "canary" not in message


def test_finding2_unreadable_known_hosts_says_so(tmp_path):
    message = _refusal(_transport(tmp_path, known_hosts=None), HostKeyMismatch)
    assert "cannot read known_hosts file" in message


def test_finding2_private_key_file_that_is_not_a_key_is_named_not_quoted(tmp_path):
    transport = _transport(tmp_path, known_hosts="", key="-----BEGIN OPENSSH PRIVATE KEY-----\n"
                                                        + SECRET + "\n-----END OPENSSH PRIVATE KEY-----\n")
    message = _refusal(transport, RunnerUnreachable)
    assert "private key file" in message and "is not valid" in message and "canary" not in message
    message = _refusal(_transport(tmp_path / "plain", known_hosts="", key=SECRET + "\n"), RunnerUnreachable)
    assert "is not valid" in message and "canary" not in message


def test_an_unexpected_error_in_a_health_check_gives_its_type_not_its_text():
    class Broken(Transport):
        async def run(self, argv, *, input=None, timeout=None):
            raise ValueError(f"Invalid known hosts entry: {SECRET}")

    reason = asyncio.run(health.check(Broken(), timeout=1)).reason  # type: ignore[abstract]
    assert reason == "health check failed: unexpected ValueError"


@pytest.mark.parametrize("exc, said", [
    (ConnectionRefusedError(errno.ECONNREFUSED, f"refused {SECRET}"), "connection refused"),
    (socket.gaierror(-2, SECRET), "host name not found"),
    (OSError(errno.EHOSTUNREACH, SECRET), "no route to host"),
    (TimeoutError(), "timed out"),
    (ValueError(SECRET), "ValueError"),
])
def test_connection_failures_are_described_in_narwhals_words(exc, said):
    assert _describe(exc) == said


def test_finding10_asyncssh_stays_quiet_at_info():
    logging.basicConfig(level=logging.INFO)
    assert logging.getLogger("asyncssh").getEffectiveLevel() >= logging.WARNING
    assert not logging.getLogger("asyncssh").isEnabledFor(logging.INFO)


def test_finding10_command_errors_never_show_env_values():
    argv = ["docker", "run", "--env", f"TOKEN={SECRET}", "-e", "A=b", f"--env=X={SECRET}", f"-eY={SECRET}"]
    assert redact_argv(argv) == ["docker", "run", "--env", "TOKEN=***", "-e", "A=***", "--env=X=***", "-eY=***"]
    assert "canary" not in str(CommandFailed(argv[:4], 1)) and "TOKEN=***" in str(CommandFailed(argv[:4], 1))
    assert "canary" not in str(CommandFailed(["--env", f"TOKEN={SECRET}"], 1))
    assert redact_argv(["docker", "run", "--", "img", "sh", "-c", "a=b"]) == ["docker", "run", "--", "img", "sh", "-c", "a=b"]
