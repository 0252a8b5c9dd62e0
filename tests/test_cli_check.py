"""``narwhal check``: in-process through main() and as the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from narwhal.api.server import free_port
from narwhal.cli.main import main
from narwhal.execution import probe
from narwhal.execution.probe import Images

ROOT = Path(__file__).resolve().parent.parent
BAD_INVENTORY = """\
# a comment first, so the line is not just the index
runners:
  - name: good
  - name: broken
    host: 127.0.0.3
    port: ssh
"""
BAD_LINE = "inventory.yaml:6: runners[1].port: expected an integer, got 'ssh'"


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    (tmp_path / "inventory.yaml").write_text(BAD_INVENTORY)
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    return tmp_path


def narwhal(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("narwhal")
    assert exe, "the narwhal console script is installed (pip install -e .)"
    full_env = {k: v for k, v in os.environ.items() if k != "NARWHAL_CONFIG"}
    full_env.update(env or {})
    return subprocess.run([exe, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60)


# --- in-process --------------------------------------------------------------------


def test_check_shipped_config_in_process(capsys):
    assert main(["check", "--config", str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert "local" in out and "example" in out and "config ok: 1 runner, 1 pipeline" in out


def test_check_json_in_process(capsys):
    assert main(["check", "--config", str(ROOT), "--json", "--offline"]) == 0  # whatever this machine's Docker holds
    summary = json.loads(capsys.readouterr().out)
    assert summary["runners"][0]["name"] == "local"
    assert summary["pipelines"][0]["runners"] == ["local"]
    assert summary["warnings"] == []


def test_bad_port_in_process_exits_2_with_the_line(bad_config, capsys):
    assert main(["check", "--config", str(bad_config)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [BAD_LINE]
    assert captured.out == ""


def test_every_problem_is_printed(tmp_path, capsys):
    (tmp_path / "inventory.yaml").write_text("runners:\n  - name: a\n    port: ssh\n    cpus: 3\n")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "p.yaml").write_text("repo: x\nimage: x\nsteps: []\n")
    assert main(["check", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "inventory.yaml:3: runners[0].port: expected an integer, got 'ssh'"
    assert err[1].startswith("inventory.yaml:4: runners[0].cpus: unknown key (allowed: name, host,")
    assert err[2] == "pipelines/p.yaml:3: steps: expected at least 1 item"
    assert len(err) == 3


def test_warnings_are_shown_and_still_exit_0(tmp_path, capsys):
    (tmp_path / "inventory.yaml").write_text("runners: [{name: a, labels: [linux]}]\n")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "gpu.yaml").write_text("repo: '*'\nimage: x\nlabels: [gpu]\nsteps: [{name: s, run: 'true'}]\n")
    assert main(["check", "--config", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "warning: pipelines/gpu.yaml:3: labels: no runner has label 'gpu'" in out


def test_config_dir_from_environment(bad_config, monkeypatch, capsys):
    monkeypatch.setenv("NARWHAL_CONFIG", str(bad_config))
    assert main(["check"]) == 2
    assert BAD_LINE in capsys.readouterr().err


def test_missing_config_dir_and_usage_errors(tmp_path, capsys):
    assert main(["check", "--config", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == (f"{tmp_path / 'nope'}: config directory not found (narwhal init "
                                               f"writes a starter config: narwhal init {tmp_path / 'nope'})")
    assert main(["check", "--bogus"]) == 2
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_hostile_yaml_is_one_message_not_a_traceback(tmp_path, capsys):
    bomb = "a0: &a0 [" + ",".join(["lol"] * 10) + "]\n" + "".join(
        f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 12)
    )
    (tmp_path / "inventory.yaml").write_text(bomb)
    assert main(["check", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "YAML too large after alias expansion" in err and "Traceback" not in err


# --- the installed console script --------------------------------------------------


def test_console_script_on_shipped_config():
    result = narwhal("check", "--config", ".")
    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout and result.stderr == ""


def test_console_script_uses_cwd_by_default():
    result = narwhal("check", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pipelines"][0]["name"] == "example"


def test_console_script_bad_port_exits_2(bad_config):
    result = narwhal("check", "--config", str(bad_config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [BAD_LINE]
    assert "Traceback" not in result.stderr
    via_env = narwhal("check", cwd=Path("/"), env={"NARWHAL_CONFIG": str(bad_config)})
    assert via_env.returncode == 2 and via_env.stderr.splitlines() == [BAD_LINE]


# --- images on the runners ---------------------------------------------------------------

TWO_RUNNERS = """\
runners:
  - {name: near, transport: local, labels: [near]}
  - {name: far, host: 127.0.0.1, port: PORT, labels: [far], known_hosts: KNOWN}
"""


def two_runners(tmp_path: Path, port: int = 1) -> Path:
    (tmp_path / "known_hosts").write_text("")
    (tmp_path / "inventory.yaml").write_text(TWO_RUNNERS.replace("PORT", str(port)).replace(
        "KNOWN", str(tmp_path / "known_hosts")))
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "here.yaml").write_text(
        "repo: '*'\nimage: img/here:1\nlabels: [near]\nsteps: [{name: s, run: 'true'}]\n")
    (tmp_path / "pipelines" / "there.yaml").write_text(
        "repo: '*'\nimage: img/there:1\nlabels: [far]\nsteps: [{name: s, run: 'true'}]\n")
    return tmp_path


@pytest.fixture
def asked(monkeypatch) -> list[tuple[dict, float]]:
    """probe_images stood in for: near answers without the image, far does not answer."""
    calls: list[tuple[dict, float]] = []

    def fake(wanted, runners, settings, timeout=probe.PROBE_TIMEOUT):
        calls.append((wanted, timeout))
        return [Images("near", missing=set(wanted.get("near", []))) if name == "near" else
                Images(name, unreachable="connection refused") for name in wanted]

    monkeypatch.setattr(probe, "probe_images", fake)
    return calls


def test_plain_check_asks_the_runners_briefly_and_notes_the_silent_ones_in_one_line(tmp_path, asked, capsys):
    assert main(["check", "--config", str(two_runners(tmp_path))]) == 0
    assert asked == [({"near": ["img/here:1"], "far": ["img/there:1"]}, probe.QUICK_TIMEOUT)]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: inventory.yaml: runners: images not checked on 1 runner that did not answer within 5s: far "
        "(connection refused) (--runners waits longer, --offline asks none)",
        "warning: pipelines/here.yaml:2: image: image img/here:1 is on none of the runners that take pipeline "
        "here (near: not there); its first job pulls it, which fails without a registry",
    ]  # nothing said about pipeline there: far, its only runner, may have the image


def test_check_offline_asks_no_runner(tmp_path, asked, capsys):
    assert main(["check", "--config", str(two_runners(tmp_path)), "--offline", "--json"]) == 0
    assert asked == [] and json.loads(capsys.readouterr().out)["warnings"] == []
    assert main(["check", "--offline", "--runners"]) == 2  # one or the other


def test_check_runners_waits_longer_and_warns_about_each_runner(tmp_path, asked, capsys):
    assert main(["check", "--config", str(two_runners(tmp_path)), "--runners", "--json"]) == 0
    assert [timeout for _, timeout in asked] == [probe.PROBE_TIMEOUT]
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert warnings[0] == "inventory.yaml: runners.far: not reachable to ask for images: connection refused"
    assert any("img/there:1" in w and "far: unreachable (connection refused)" in w for w in warnings)


def test_a_runner_that_refuses_the_connection_is_one_line_not_a_wait(tmp_path, capsys):
    """The real probe: this machine's Docker for near, a closed port for far."""
    assert main(["check", "--config", str(two_runners(tmp_path, port=free_port()))]) == 0
    out = capsys.readouterr().out
    silent = [line for line in out.splitlines() if "did not answer" in line]
    assert len(silent) == 1 and "far (" in silent[0], out
