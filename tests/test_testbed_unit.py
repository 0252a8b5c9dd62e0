"""Fast checks of testbed's pieces that need neither root nor a running engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import testbed
from narwhal.cli import engine
from narwhal.cli.engine import EngineUnavailable
from narwhal.errors import NarwhalError
from testbed import SshHost, TestbedUnavailable, system
from tests.conftest import need, need_module, require


def make_host(tmp_path, port: int = 22) -> SshHost:
    return SshHost(name="runner-1", address="127.0.0.20", port=port, user="nwrunner",
                   key_path=str(tmp_path / "key"), known_hosts_path=str(tmp_path / "kh"),
                   host_pubkey="ssh-ed25519 AAAAC3Nza", workdir=str(tmp_path), pid=None)


def test_testbed_unavailable_is_a_narwhal_error():
    assert issubclass(TestbedUnavailable, NarwhalError)


def test_known_hosts_line_brackets_only_non_default_ports():
    assert testbed.known_hosts_line("127.0.0.20", 22, "ssh-ed25519 AAAA") == "127.0.0.20 ssh-ed25519 AAAA\n"
    assert testbed.known_hosts_line("127.0.0.20", 2222, "ssh-ed25519 AAAA") == "[127.0.0.20]:2222 ssh-ed25519 AAAA\n"


def test_runner_config_is_an_inventory_entry(tmp_path):
    host = make_host(tmp_path, port=2200)
    assert host.runner_config() == {
        "name": "runner-1", "host": "127.0.0.20", "port": 2200, "user": "nwrunner",
        "key": str(tmp_path / "key"), "known_hosts": str(tmp_path / "kh"), "transport": "ssh",
        "labels": [], "capacity": 1}
    assert host.runner_config(capacity=3, labels=["gpu"])["capacity"] == 3


def test_ssh_argv_is_strict_and_ignores_user_config(tmp_path):
    argv = make_host(tmp_path).ssh_argv(["echo", "a b"])
    assert argv[:3] == ["ssh", "-F", "/dev/null"]
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
    assert argv[-2:] == ["--", "echo 'a b'"]


def test_sshd_config_has_the_settings_hosts_depend_on(tmp_path):
    host = make_host(tmp_path, port=2222)
    host._keys_dir = "/tmp/keys"
    config = host._sshd_config().splitlines()
    for line in ("ListenAddress 127.0.0.20:2222", "UsePAM no", "StrictModes no", "PasswordAuthentication no",
                 "AuthorizedKeysFile /tmp/keys/%u", "MaxSessions 100", "MaxStartups 100:30:200"):
        assert line in config


def test_nothing_missing_means_no_apt(monkeypatch):
    monkeypatch.setattr(engine, "_apt_install", lambda pkgs: pytest.fail("apt-get must not run"))
    engine.ensure_apt_packages({"sh": "dash", sys.executable: "python3"})


def test_missing_package_without_root_says_what_and_how(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(engine, "_apt_install", lambda pkgs: pytest.fail("apt-get must not run"))
    with pytest.raises(EngineUnavailable) as info:
        engine.ensure_apt_packages({"no-such-command-xyz": "xyz-tools"})
    message = str(info.value)
    assert "no-such-command-xyz (Debian package xyz-tools)" in message
    assert "not running as root (uid 1000)" in message
    assert "apt-get install -y xyz-tools" in message


def test_missing_package_off_debian_says_so(monkeypatch):
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if p == "/etc/debian_version" else real_exists(p))
    with pytest.raises(EngineUnavailable, match="not a Debian system"):
        engine.ensure_apt_packages({"no-such-command-xyz": "xyz-tools"})


def test_static_elf_detection():
    assert not engine._is_static_elf(os.path.realpath("/bin/sh"))  # dash is dynamically linked
    if os.path.exists("/bin/busybox") and subprocess.run(["dpkg", "-s", "busybox-static"],
                                                         capture_output=True).returncode == 0:
        assert engine._is_static_elf("/bin/busybox")
    assert not engine._is_static_elf(__file__)


def test_busybox_rootfs_layout(tmp_path):
    need(os.path.exists("/bin/busybox"), "busybox not installed")
    engine._build_busybox_rootfs("/bin/busybox", str(tmp_path))
    assert os.access(tmp_path / "bin" / "busybox", os.X_OK)
    assert not os.path.islink(tmp_path / "bin" / "busybox")
    assert os.readlink(tmp_path / "bin" / "sh") == "busybox"
    assert (tmp_path / "workspace").is_dir()
    assert oct((tmp_path / "tmp").stat().st_mode & 0o7777) == "0o1777"
    users = [line.split(":")[0] for line in (tmp_path / "etc" / "passwd").read_text().splitlines()]
    assert users == ["root", "nobody"]


def test_descendants_finds_grandchildren():
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        assert testbed.wait_until(lambda: len(system._descendants(parent.pid)) == 2, 30)
    finally:
        system._signal(system._descendants(parent.pid), 9)
        parent.kill()
        parent.wait()


def test_invalid_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="invalid address"):
        testbed.start_ssh_host("r1", "not-an-ip", str(tmp_path))
    with pytest.raises(ValueError, match="invalid host name"):
        testbed.start_ssh_host("../r1", "127.0.0.2", str(tmp_path))
    with pytest.raises(ValueError, match="invalid user name"):
        testbed.ensure_runner_user("Bad User")
    with pytest.raises(ValueError, match="addresses end"):
        testbed.start_ssh_hosts(10, str(tmp_path), first=250)


def test_git_repo_files_must_stay_inside(tmp_path):
    need(shutil.which("git"), "git not installed")
    path, _ = testbed.make_git_repo(str(tmp_path / "r"))
    for bad in ("../escape", "/etc/x", ".git/config"):
        with pytest.raises(ValueError, match="inside the repository"):
            testbed.add_commit(path, {bad: "x"})
    with pytest.raises(ValueError, match="invalid branch"):
        testbed.make_git_repo(str(tmp_path / "r2"), branch="bad..branch")


def test_fixture_helper_fails_under_ci_and_skips_elsewhere(monkeypatch):
    def missing():
        raise TestbedUnavailable("no dockerd")

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no dockerd"):
        require(missing)
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no dockerd"):
        require(missing)


def test_need_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no such tool"):
        need(shutil.which("no-such-tool-here"), "no such tool")
    with pytest.raises(pytest.fail.Exception, match="no_such_module"):
        need_module("no_such_module")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no such tool"):
        need(None, "no such tool")
    with pytest.raises(pytest.skip.Exception, match="no_such_module"):
        need_module("no_such_module")
    need(True, "present")
    assert need_module("json").dumps(1) == "1"


def test_home_is_not_the_developers():
    assert not os.path.exists(os.path.expanduser("~/.ssh"))


def test_the_demo_engine_announces_each_change_before_making_it(monkeypatch):
    """`narwhal demo` on a fresh machine says what it installs, starts and builds, before doing it."""
    events: list[str] = []
    monkeypatch.setattr(engine, "say", lambda text: events.append("say: " + text))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: True if p == "/etc/debian_version" else real_exists(p))
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "no-such-command-xyz" else "/bin/" + cmd)
    monkeypatch.setattr(engine, "_present", lambda cmd: events.count("apt-get") > 0)
    monkeypatch.setattr(engine, "_apt_install", lambda pkgs: events.append("apt-get"))
    engine.ensure_apt_packages({"no-such-command-xyz": "xyz-tools"})
    assert events == ["say: installing Debian packages: xyz-tools (apt-get)", "apt-get"]

    events.clear()
    monkeypatch.setattr(engine, "ensure_docker", lambda: None)
    monkeypatch.setattr(engine, "_image_exists", lambda name: False)
    monkeypatch.setattr(engine, "_static_busybox", lambda: "/bin/busybox")
    monkeypatch.setattr(engine, "_build_busybox_rootfs", lambda busybox, root: events.append("rootfs"))
    monkeypatch.setattr(engine, "_docker_import", lambda root, name: events.append("docker import"))
    assert engine.ensure_image("narwhal-test/x:1") == "narwhal-test/x:1"
    assert events == ["say: building the image narwhal-test/x:1 from /bin/busybox (docker import)",
                      "rootfs", "docker import"]


# --- the HAProxy example (deploy/haproxy.cfg) as the HA test renders it ----------------------


def test_rendering_the_haproxy_example_changes_only_bind_and_servers():
    from testbed.haproxy import EXAMPLE, render

    example = EXAMPLE.read_text().splitlines()
    made = render(EXAMPLE.read_text(), "127.0.0.1:4321", ["127.0.0.1:1001", "127.0.0.1:1002"]).splitlines()
    servers = [line.split() for line in example if line.split()[:1] == ["server"]]
    assert servers and all(words[3:] == ["cookie", words[1]] for words in servers)  # cookie = name
    assert [line.strip() for line in made if line.split()[:1] == ["server"]] == [
        "server node1 127.0.0.1:1001 cookie node1", "server node2 127.0.0.1:1002 cookie node2"]
    assert [line.strip() for line in made if line.split()[:1] == ["bind"]] == ["bind 127.0.0.1:4321"]
    kept = [line for line in example if line.split()[:1] not in (["server"], ["bind"])]
    assert [line for line in made if line.split()[:1] not in (["server"], ["bind"])] == kept


def test_rendering_refuses_an_example_of_another_shape():
    from testbed.haproxy import render

    with pytest.raises(ValueError, match="2 bind lines"):
        render("frontend a\n  bind :80\n  bind :81\nbackend b\n  server s 1.2.3.4:80\n", "127.0.0.1:1", ["x:1"])
    with pytest.raises(ValueError, match="consecutive"):
        render("frontend a\n  bind :80\nbackend b\n  server s 1.2.3.4:80\n  # x\n  server t 1.2.3.5:80\n",
               "127.0.0.1:1", ["x:1"])
    with pytest.raises(ValueError, match="no servers"):
        render("frontend a\n  bind :80\nbackend b\n  server s 1.2.3.4:80\n", "127.0.0.1:1", [])
    # a bind line's options stay; a commented-out bind is not one
    made = render("frontend a\n  # bind :443 ssl\n  bind :80 name web\nbackend b\n  server s 1.2.3.4:80 check\n",
                  "127.0.0.1:9", ["127.0.0.1:10"])
    assert "  bind 127.0.0.1:9 name web\n" in made and "  # bind :443 ssl\n" in made
    assert "  server node1 127.0.0.1:10 check\n" in made


def test_the_haproxy_example_is_valid_for_debians_haproxy():
    from testbed.haproxy import EXAMPLE, HAPROXY

    need(os.path.exists(HAPROXY), f"{HAPROXY} (Debian package haproxy; .ci/run installs it)")
    check = subprocess.run([HAPROXY, "-c", "-f", str(EXAMPLE)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and "Configuration file is valid" in check.stdout, check.stdout + check.stderr
