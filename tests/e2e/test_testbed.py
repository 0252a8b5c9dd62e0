"""The test environment itself, on the real path: sshd runner hosts, dockerd, the test image, git."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

import testbed

pytestmark = pytest.mark.slow


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def canary():
    """A path the runner user may create; removed afterwards."""
    path = f"/tmp/narwhal-canary-{uuid.uuid4().hex}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_container_runs_through_a_real_sshd_runner_host(ssh_host, test_image):
    argv = ["ssh", "-F", "/dev/null", "-i", ssh_host.key_path,
            "-o", f"UserKnownHostsFile={ssh_host.known_hosts_path}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-p", str(ssh_host.port), f"nwrunner@{ssh_host.address}",
            f"docker run --rm --network none {test_image} echo hello"]
    result = run(argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello"


def test_ssh_argv_keeps_arguments_intact(ssh_host):
    result = run(ssh_host.ssh_argv(["printf", "%s|", "two words", "it's", "$HOME"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "two words|it's|$HOME|"


def test_changed_host_key_is_refused_and_nothing_runs(ssh_host, canary, tmp_path):
    old_key = ssh_host.host_pubkey
    ssh_host.regenerate_host_key()
    assert ssh_host.host_pubkey != old_key
    assert old_key in open(ssh_host.known_hosts_path).read()

    refused = run(ssh_host.ssh_argv(["touch", canary]))
    assert refused.returncode != 0
    assert "Host key verification failed" in refused.stderr
    assert not os.path.exists(canary)

    # control: with the new key known, the very same command does run
    fresh = tmp_path / "known_hosts_new"
    fresh.write_text(testbed.known_hosts_line(ssh_host.address, ssh_host.port, ssh_host.host_pubkey))
    argv = [a.replace(ssh_host.known_hosts_path, str(fresh)) for a in ssh_host.ssh_argv(["touch", canary])]
    accepted = run(argv)
    assert accepted.returncode == 0, accepted.stderr
    assert os.path.exists(canary)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_frozen_host_does_not_answer_until_thawed(ssh_host):
    assert run(ssh_host.ssh_argv(["true"])).returncode == 0
    ssh_host.freeze()
    try:
        assert _state(ssh_host.pid) == "T"
        frozen = run(ssh_host.ssh_argv(["true"], connect_timeout=2))
        assert frozen.returncode != 0
    finally:
        ssh_host.thaw()
    thawed = run(ssh_host.ssh_argv(["echo", "back"]))
    assert thawed.returncode == 0, thawed.stderr
    assert thawed.stdout.strip() == "back"


def test_killed_host_refuses_connections_and_restarts(ssh_host):
    ssh_host.kill()
    assert not ssh_host.is_running
    refused = run(ssh_host.ssh_argv(["true"], connect_timeout=5))
    assert refused.returncode != 0
    ssh_host.start()
    assert ssh_host.is_running
    again = run(ssh_host.ssh_argv(["true"]))
    assert again.returncode == 0, again.stderr


def test_several_hosts_share_one_client_key(ssh_hosts):
    hosts = ssh_hosts(2)
    assert [h.name for h in hosts] == ["runner-1", "runner-2"]
    assert len({h.address for h in hosts}) == 2
    assert hosts[0].key_path == hosts[1].key_path
    for host in hosts:
        result = run(host.ssh_argv(["id", "-nG"]))
        assert result.returncode == 0, result.stderr
        assert "docker" in result.stdout.split()
        config = host.runner_config(labels=["linux"])
        assert config["host"] == host.address and config["labels"] == ["linux"]


def test_ensure_functions_are_idempotent(docker_engine, test_image, runner_user):
    testbed.ensure_docker()
    assert testbed.ensure_image() == test_image
    assert testbed.ensure_runner_user() == runner_user
    assert docker_engine.images.get(test_image)


def test_ensure_image_builds_a_missing_image(docker_engine):
    name = f"narwhal-test/scratch-{uuid.uuid4().hex[:8]}:latest"
    try:
        assert testbed.ensure_image(name) == name
        output = docker_engine.containers.run(name, ["sh", "-c", "id -un; ls -d /tmp /workspace; cat /etc/passwd"],
                                              remove=True, network_mode="none")
        lines = output.decode().splitlines()
        assert lines[:3] == ["root", "/tmp", "/workspace"]
        assert any(line.startswith("nobody:") for line in lines)
    finally:
        docker_engine.images.remove(name, force=True)


def test_git_repo_has_a_real_commit(git_repo, tmp_path):
    assert run(["git", "-C", git_repo.path, "cat-file", "-t", git_repo.commit]).stdout.strip() == "commit"
    first = git_repo.commit
    second = git_repo.add_commit({"src/app.py": "print('hi')\n", "README.md": None})
    parent = run(["git", "-C", git_repo.path, "rev-parse", f"{second}^"]).stdout.strip()
    assert parent == first
    tree = run(["git", "-C", git_repo.path, "ls-tree", "-r", "--name-only", second]).stdout.split()
    assert tree == ["build.sh", "src/app.py"]

    path, sha = testbed.make_git_repo(str(tmp_path / "other"), branch="develop")
    assert run(["git", "-C", path, "cat-file", "-t", sha]).stdout.strip() == "commit"
    assert run(["git", "-C", path, "symbolic-ref", "--short", "HEAD"]).stdout.strip() == "develop"

def test_netns_host_runs_a_container_and_can_be_cut(netns_ssh_host, test_image):
    host, link = netns_ssh_host
    out = subprocess.run(host.ssh_argv(["docker", "run", "--rm", "--network", "none", test_image, "echo", "hi"]),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "hi", out
    link.cut()
    cut = subprocess.run(host.ssh_argv(["true"], connect_timeout=2), capture_output=True, text=True, timeout=60)
    assert cut.returncode != 0
    link.restore()
    back = subprocess.run(host.ssh_argv(["echo", "back"]), capture_output=True, text=True, timeout=60)
    assert back.stdout.strip() == "back", back
