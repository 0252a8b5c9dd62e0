"""``narwhal check``: in-process through main() and as the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from narwhal.cli.main import main

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
    assert main(["check", "--config", str(ROOT), "--json"]) == 0
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
