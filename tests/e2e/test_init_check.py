"""A newcomer's start, end to end: ``narwhal init``, ``check`` (and ``--runners``) asking the real Docker
engine for images, the dispatcher on that config, a build, and ``--json`` with readable times
and absolute job URLs."""

from __future__ import annotations

import re
import signal

import pytest
import yaml

from narwhal.api.server import ServeProcess, free_port
from tests.e2e.cli import run, run_json

pytestmark = pytest.mark.slow


def test_init_check_runners_serve_and_build(docker_engine, test_image, git_repo, tmp_path):
    config = tmp_path / "ci"
    made = run("init", str(config), "--local-root", str(tmp_path), cwd=str(tmp_path))
    assert made.returncode == 0, made.stderr
    assert f"narwhal check --config {config}" in made.stdout

    (config / "pipelines" / "odd.yaml").write_text(yaml.safe_dump(
        {"repo": "*", "image": "narwhal-test/not-built:1", "labels": ["linux"],
         "steps": [{"name": "s", "run": "true"}]}))
    checked = run("check", "--config", str(config), "--runners")
    assert checked.returncode == 0, checked.stderr
    warnings = [line for line in checked.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: pipelines/odd.yaml:1: image: image narwhal-test/not-built:1 is on none of the "
                        "runners that take pipeline odd (local: not there); its first job pulls it, which fails "
                        "without a registry"], checked.stdout
    answer = run_json("check", "--config", str(config), "--runners")
    assert answer["ok"] is True and len(answer["warnings"]) == 1
    plain = run("check", "--config", str(config))  # the reachable runners are asked by default
    assert [line for line in plain.stdout.splitlines() if line.startswith("warning:")] == warnings, plain.stdout
    offline = run_json("check", "--config", str(config), "--offline")
    assert offline["warnings"] == []
    (config / "pipelines" / "odd.yaml").unlink()

    inventory = yaml.safe_load((config / "inventory.yaml").read_text())
    inventory["settings"]["public_url"] = "https://ci.example.com"
    (config / "inventory.yaml").write_text(yaml.safe_dump(inventory))
    server = ServeProcess(config_dir=config, state_dir=tmp_path / "state", port=free_port(),
                          log_path=tmp_path / "serve.log").start()
    try:
        built = run("submit", git_repo.path, "HEAD", "--wait", "--url", server.url)
        assert built.returncode == 0, (built.stdout, built.stderr, server.log_tail())
        assert "example" in built.stdout and "passed" in built.stdout
        [job] = run_json("jobs", "--url", server.url)["jobs"]
        assert job["url"] == f"https://ci.example.com/jobs/{job['id']}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", job["created_at_iso"])
        assert job["finished_at_iso"] >= job["created_at_iso"]
    finally:
        server.stop(signal.SIGTERM)
