"""Transport pieces without a runner: line splitting, exit codes, local subprocesses, picking a transport."""

from __future__ import annotations

import asyncio
import types

import pytest

from narwhal.config.inventory import Runner
from narwhal.errors import HostKeyMismatch, RunnerUnreachable, SourceError
from narwhal.execution.ssh import SSHTransport
from narwhal.execution.transport import (
    LineSplitter,
    LocalTransport,
    exit_code_of,
    make_transport,
    setting,
)


def split(*chunks: bytes) -> list[str]:
    lines: list[str] = []
    splitter = LineSplitter(lines.append)
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.flush()
    return lines


def test_line_splitter_keeps_order_and_flushes_the_tail():
    assert split(b"a\nb", b"c\n", b"", b"\n", b"tail") == ["a", "bc", "", "tail"]
    assert split(b"caf\xc3", b"\xa9\n") == ["caf\u00e9"]  # a character split across chunks
    assert split(b"bad \xff\n") == ["bad \ufffd"]
    assert split(b"x\r\n") == ["x\r"]  # only '\n' splits; what the step wrote is kept
    assert split() == []


def test_exit_codes_follow_the_shell():
    assert exit_code_of(0) == 0 and exit_code_of(3) == 3
    assert exit_code_of(-9) == 137 and exit_code_of(-15) == 143


def test_make_transport_picks_by_runner_field(tmp_path):
    local = make_transport(Runner(name="here", transport="local"))
    assert isinstance(local, LocalTransport) and local.name == "here"
    runner = Runner(name="build-1", host="127.0.0.5", port=22, user="ci", key="~/k",
                                   known_hosts=str(tmp_path / "kh"), transport="ssh")
    ssh = make_transport(runner, {"command_timeout": 5})
    assert isinstance(ssh, SSHTransport) and ssh.address == "127.0.0.5:22"
    assert not ssh.key.startswith("~")
    with pytest.raises(ValueError, match="unknown transport 'telnet'"):
        make_transport(Runner.model_construct(name="x", transport="telnet"))


def test_settings_from_dict_object_or_defaults():
    assert setting(None, "keepalive_count_max") == 3
    assert setting({"keepalive_count_max": 9}, "keepalive_count_max") == 9
    assert setting(types.SimpleNamespace(connect_timeout=1.5), "connect_timeout") == 1.5


def test_missing_known_hosts_fails_closed(tmp_path):
    runner = Runner(name="build-1", host="127.0.0.5", port=22, user="ci", key=None,
                                   known_hosts=str(tmp_path / "nope"))
    with pytest.raises(HostKeyMismatch, match=r"cannot verify the host key of build-1 \(127.0.0.5:22\)"):
        asyncio.run(SSHTransport(runner).run(["true"]))


def test_local_run_keeps_streams_apart_and_never_uses_a_shell():
    result = asyncio.run(LocalTransport().run(["sh", "-c", 'echo out; echo err >&2; exit 5']))
    assert (result.exit_status, result.stdout, result.stderr, result.ok) == (5, b"out\n", b"err\n", False)
    literal = asyncio.run(LocalTransport().run(["echo", "$(id)", ";", "`id`"]))
    assert literal.stdout == b"$(id) ; `id`\n"
    assert asyncio.run(LocalTransport().run(["cat"], input=b"in")).stdout == b"in"


def test_local_stream_merges_and_feeds_stdin():
    async def source():
        yield b"one\ntw"
        yield b"o\nthree"

    lines: list[str] = []
    code = asyncio.run(LocalTransport().stream(["sh", "-c", "cat; echo; echo err >&2; exit 2"],
                                               stdin=source(), on_line=lines.append))
    assert code == 2
    assert lines == ["one", "two", "three", "err"]


def test_local_stream_reads_no_further_while_pace_waits_and_loses_nothing():
    """Back-pressure: while the consumer's pace holds, nothing more is read, so the command
    blocks on its full pipe; released, every line arrives, once and in order."""
    lines: list[str] = []
    held_at: list[int] = []

    async def main() -> int:
        release = asyncio.Event()

        async def pace() -> None:
            if not release.is_set():
                await release.wait()

        task = asyncio.ensure_future(LocalTransport().stream(["sh", "-c", "seq 1 300000"], on_lines=lines.extend,
                                                             pace=pace))
        await asyncio.sleep(0.5)
        held_at.append(sum(len(line) + 1 for line in lines))
        release.set()
        return await task

    assert asyncio.run(main()) == 0
    assert 0 < held_at[0] <= 64 * 1024  # one read of at most 64 KiB, of the 2 MB seq prints
    assert lines == [str(i) for i in range(1, 300001)]


def test_local_timeouts_kill_the_command():
    with pytest.raises(TimeoutError):
        asyncio.run(LocalTransport().run(["sleep", "100"], timeout=0.05))
    with pytest.raises(TimeoutError):
        asyncio.run(LocalTransport().stream(["sleep", "100"], on_line=print, timeout=0.05))


def test_a_failing_stdin_source_still_ends_the_command():
    async def broken():
        yield b"partial\n"
        raise SourceError("git archive failed")

    lines: list[str] = []
    with pytest.raises(SourceError, match="git archive failed"):
        asyncio.run(LocalTransport().stream(["cat"], stdin=broken(), on_line=lines.append, timeout=60))
    assert lines == ["partial"]


def test_a_command_that_ignores_stdin_is_not_an_error():
    async def endless():
        while True:
            yield b"x" * 65536

    assert asyncio.run(LocalTransport().stream(["true"], stdin=endless(), on_line=print, timeout=60)) == 0


def test_missing_or_broken_client_key_is_explained(tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    runner = Runner(name="build-1", host="127.0.0.5", port=22, user="ci",
                                   key=str(tmp_path / "missing"), known_hosts=str(known_hosts))
    with pytest.raises(RunnerUnreachable, match="client key .*missing not found"):
        asyncio.run(SSHTransport(runner).run(["true"]))


def test_line_splitter_batches_and_keeps_partial_lines():
    from narwhal.execution.transport import LineSplitter

    batches: list[list[str]] = []
    splitter = LineSplitter(on_lines=batches.append)
    splitter.feed(b"one\ntw")
    splitter.feed("o\nthr\u00e9e\nfour".encode())
    splitter.feed(b"")
    splitter.flush()
    assert batches == [["one"], ["two", "thr\u00e9e"], ["four"]]
    one_by_one: list[str] = []
    splitter = LineSplitter(on_line=one_by_one.append)
    splitter.feed(b"a\nb\n")
    assert one_by_one == ["a", "b"]
    with pytest.raises(TypeError):
        LineSplitter()


def test_the_preferred_ciphers_are_all_known_to_asyncssh_and_aead_first():
    import asyncssh.encryption

    from narwhal.execution import ssh

    known = {alg.decode() for alg in asyncssh.encryption.get_encryption_algs()}
    assert set(ssh.ENCRYPTION_ALGS) <= known
    assert ssh.ENCRYPTION_ALGS[0].endswith("-gcm@openssh.com")
    assert "chacha20-poly1305@openssh.com" in ssh.ENCRYPTION_ALGS  # servers and CPUs without AES-NI
