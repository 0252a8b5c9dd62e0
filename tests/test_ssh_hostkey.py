"""Host keys against a real SSH server, in process: asyncssh on 127.0.0.1 with its own key.

SSHTransport must refuse a server whose key is not in the runner's known_hosts (changed,
or simply unknown); passing ``known_hosts=None`` to asyncssh would turn the check off,
and these tests would then connect. The control test shows the same server is reachable
when its key is known, so a refusal is about the key and nothing else.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh
import pytest

from narwhal.config.inventory import Runner
from narwhal.errors import HostKeyMismatch
from narwhal.execution.ssh import SSHTransport

FAST = {"connect_timeout": 10, "reconnect_attempts": 1, "reconnect_backoff": 0.01}


def _answer(process: asyncssh.SSHServerProcess) -> None:
    process.stdout.write(f"ran: {process.command}\n")
    process.exit(0)


async def _with_server(tmp_path: Path, known_hosts_key: asyncssh.SSHKey | str | None, body):
    """Start a server with a fresh host key; write known_hosts (KNOWN_HOSTS_KEY, or the
    server's own key when it is "server"); run BODY(transport)."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key.write_private_key(str(tmp_path / "client_key"))
    server = await asyncssh.create_server(
        asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(
            client_key.export_public_key().decode()),
        process_factory=_answer)
    port = server.sockets[0].getsockname()[1]
    known = host_key if known_hosts_key == "server" else known_hosts_key
    lines = [] if known is None else [f"[127.0.0.1]:{port} " + known.export_public_key().decode().strip()]
    (tmp_path / "known_hosts").write_text("".join(line + "\n" for line in lines))
    runner = Runner(name="r1", host="127.0.0.1", port=port, user="ci",
                                   key=str(tmp_path / "client_key"),
                                   known_hosts=str(tmp_path / "known_hosts"))
    transport = SSHTransport(runner, FAST)
    try:
        return await body(transport)
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()


async def _run(transport: SSHTransport):
    return await transport.run(["echo", "hi"], timeout=10)


def test_a_known_key_connects(tmp_path):
    result = asyncio.run(_with_server(tmp_path, "server", _run))
    assert result.ok and result.stdout == b"ran: echo hi\n"


def test_a_changed_key_is_refused(tmp_path):
    other = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(HostKeyMismatch, match="host key mismatch for r1"):
        asyncio.run(_with_server(tmp_path, other, _run))


def test_an_unknown_host_is_refused(tmp_path):
    """known_hosts exists but does not name this host: no trust on first use."""
    with pytest.raises(HostKeyMismatch, match="host key mismatch for r1"):
        asyncio.run(_with_server(tmp_path, None, _run))


def test_the_options_keep_checking_on(tmp_path, monkeypatch):
    """What ssh.py hands asyncssh: the runner's known_hosts file, no ssh config, no agent."""
    seen: dict = {}

    async def fake_connect(host, port, **kwargs):
        seen.update(kwargs)
        raise asyncssh.HostKeyNotVerifiable("stop here")

    monkeypatch.setattr(asyncssh, "connect", fake_connect)
    (tmp_path / "kh").write_text("")
    runner = Runner(name="r1", host="127.0.0.1", port=22, user="ci", key=None,
                                   known_hosts=str(tmp_path / "kh"))
    with pytest.raises(HostKeyMismatch):
        asyncio.run(SSHTransport(runner, FAST).connect())
    assert isinstance(seen["known_hosts"], asyncssh.SSHKnownHosts)  # read by narwhal: errors in its words
    assert seen["config"] is None and seen["agent_path"] is None
