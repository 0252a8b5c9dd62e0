"""config: loading a whole config directory, settings, warnings, summary."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from narwhal.config.loader import load_config, summarize
from narwhal.config.settings import (
    DEFAULT_SETTINGS,
    Settings,
    parse_public_url,
    parse_settings,
    parse_size,
)
from narwhal.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

PIPELINE = """\
repo: "*"
image: narwhal-test/busybox:latest
steps:
  - name: build
    run: make
"""


def write(root: Path, inventory: str, **pipelines: str) -> Path:
    (root / "inventory.yaml").write_text(inventory)
    if pipelines:
        (root / "pipelines").mkdir(exist_ok=True)
        for name, text in pipelines.items():
            (root / "pipelines" / f"{name}.yaml").write_text(text)
    return root


def problems(root: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(root)
    return str(info.value).splitlines()


def test_shipped_config_loads_without_warnings():
    config = load_config(ROOT)
    assert [r.name for r in config.runners] == ["local"]
    assert [p.name for p in config.pipelines] == ["example"]
    assert config.warnings == []
    assert config.settings == DEFAULT_SETTINGS
    assert config.config_dir == ROOT


def test_settings_defaults_are_declared_once():
    described = {name: (default, help) for name, default, help in Settings.describe()}
    assert described["health_interval"][0] == 5.0
    assert described["health_timeout"][0] == 10.0
    assert described["max_attempts"][0] == 2
    assert described["log_cap"][0] == 4 * 1024 * 1024
    assert described["stop_grace"][0] == 10.0
    assert described["min_free_disk"][0] == 1024**3
    assert described["connect_timeout"][0] == 10.0
    assert described["keepalive_interval"][0] == 5.0
    assert described["keepalive_count_max"][0] == 3
    assert described["max_body"][0] == 1024 * 1024
    assert all(help for _, help in described.values())
    assert len(described) == len(fields(Settings))


def test_settings_overrides(tmp_path):
    write(tmp_path, "runners: [{name: a}]\nsettings:\n  health_interval: 2s\n  log_cap: 1m\n  max_attempts: 5\n  min_free_disk: 0\n", p=PIPELINE)
    settings = load_config(tmp_path).settings
    assert settings.health_interval == 2.0 and settings.log_cap == 1024 * 1024
    assert settings.max_attempts == 5 and settings.min_free_disk == 0
    assert settings.stop_grace == DEFAULT_SETTINGS.stop_grace


def test_bad_settings_are_located(tmp_path):
    write(tmp_path, "settings:\n  health_interval: soon\n  max_attempts: 0\n  log_cap: lots\n  colour: blue\n")
    found = problems(tmp_path)
    assert found[0].startswith("inventory.yaml:2: settings.health_interval: expected a duration > 0")
    assert found[1] == "inventory.yaml:3: settings.max_attempts: expected an integer >= 1, got 0"
    assert found[2].startswith("inventory.yaml:4: settings.log_cap: expected a size in bytes")
    assert found[3].startswith("inventory.yaml:5: settings.colour: unknown key (allowed: health_interval, health_timeout,")
    assert parse_settings(None) is DEFAULT_SETTINGS
    with pytest.raises(ConfigError, match="settings: expected a mapping"):
        parse_settings([1])


@pytest.mark.parametrize("value, spelled", [
    ("https://CI.Example.com/", "https://ci.example.com"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("https://ci.example.com:443/narwhal/", "https://ci.example.com/narwhal"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("none", None),
    (None, None),
])
def test_public_url_has_one_spelling(value, spelled):
    assert parse_public_url(value) == spelled


@pytest.mark.parametrize("value", [
    "ftp://ci.example.com", "https://user:pw@ci.example.com", "https://token@ci.example.com",
    "https://ci.example.com/?a=1", "https://ci.example.com/#top", "https://ci.example.com/a b",
    "https:///jobs", "ci.example.com", "https://ci.example.com/../x", "https://ci.example.com:0",
    "https://ci.example.com:99999", "https://ci.example.com/%2e%2e", "https://ci.exämple.com", 8080, "",
])
def test_public_url_refuses_what_a_link_should_not_carry(value):
    with pytest.raises(ValueError, match="expected the dispatcher's URL"):
        parse_public_url(value)


def test_status_settings(tmp_path):
    write(tmp_path, "runners: [{name: a}]\nsettings:\n  public_url: https://ci.example.com/\n"
                    "  status_deadline: 10m\n  status_retry: 500ms\n  status_retry_max: 1m\n", p=PIPELINE)
    settings = load_config(tmp_path).settings
    assert settings.public_url == "https://ci.example.com"
    assert (settings.status_deadline, settings.status_retry, settings.status_retry_max) == (600.0, 0.5, 60.0)
    assert DEFAULT_SETTINGS.status_deadline == 3600.0 and DEFAULT_SETTINGS.public_url is None


def test_parse_size():
    assert parse_size(10) == 10
    assert parse_size("512k") == 512 * 1024
    assert parse_size("4M") == 4 * 1024**2
    assert parse_size("1GiB") == 1024**3
    for bad in ("-1", "x", True, 1.5, None, -3):
        with pytest.raises(ValueError, match="expected a size in bytes"):
            parse_size(bad)


def test_problems_from_every_file_at_once(tmp_path):
    write(
        tmp_path,
        "runners:\n  - name: a\n    port: ssh\n",
        a=PIPELINE + "privileged: true\n",
        b="repo: x\nimage: x\nsteps: []\n",
    )
    assert problems(tmp_path) == [
        "inventory.yaml:3: runners[0].port: expected an integer, got 'ssh'",
"pipelines/a.yaml:6: privileged: unknown key (allowed: name, repo, branches, image, labels, timeout, env, "
        "secrets, when, schedule, matrix, services, parallel, clone, artifacts, steps, cache)",
        "pipelines/b.yaml:3: steps: expected at least 1 item",
    ]


def test_missing_files(tmp_path):
    assert problems(tmp_path / "nope") == [f"{tmp_path / 'nope'}: config directory not found"]
    assert problems(tmp_path) == ["inventory.yaml: file not found"]


def test_unknown_label_is_a_warning_with_its_line(tmp_path):
    write(tmp_path, "runners:\n  - {name: a, labels: [linux]}\n  - {name: b, labels: [docker]}\n",
          gpu=PIPELINE + "labels: [linux, gpu]\n", both=PIPELINE + "labels:\n  - linux\n  - docker\n", ok=PIPELINE + "labels: [linux]\n")
    config = load_config(tmp_path)
    assert [str(w) for w in config.warnings] == [
        "pipelines/both.yaml:6: labels: no single runner has all of 'linux', 'docker'",
        "pipelines/gpu.yaml:6: labels: no runner has label 'gpu'",
    ]
    assert [r.name for r in config.runners_for(config.pipeline("ok"))] == ["a"]


def test_no_runners_and_no_pipelines_are_warnings(tmp_path):
    write(tmp_path, "")
    config = load_config(tmp_path)
    assert [str(w) for w in config.warnings] == [
        "inventory.yaml: runners: no runners (add them here or with POST /runner)",
        "pipelines: no pipelines (add pipelines/NAME.yaml)",
    ]


# What the summary says of a pipeline with one plain step and no services.
PLAIN = {"step_details": [{"name": "build", "depends_on": [], "when": {}, "allow_failure": False, "retry": 0}],
         "graph": False, "width": 1, "parallel": 4, "services": []}


def test_pipelines_for_and_summary(tmp_path):
    write(tmp_path, "runners:\n  - {name: a, labels: [linux], capacity: 3}\n  - {name: b, host: 127.0.0.2}\n",
          web=PIPELINE.replace('"*"', "/srv/web") + "branches: [main]\nlabels: [linux]\n", all=PIPELINE)
    config = load_config(tmp_path)
    assert [p.name for p in config.pipelines_for("/srv/web", "main")] == ["all", "web"]
    assert [p.name for p in config.pipelines_for("/srv/web", "dev")] == ["all"]
    assert summarize(config) == {
        "runners": [
            {"name": "a", "transport": "ssh", "host": "localhost", "labels": ["linux"], "capacity": 3},
            {"name": "b", "transport": "ssh", "host": "127.0.0.2", "labels": [], "capacity": 1},
        ],
        "pipelines": [
            {"name": "all", "repo": ["*"], "branches": None, "labels": [], "steps": ["build"], **PLAIN,
             "runners": ["a", "b"]},
            {"name": "web", "repo": ["/srv/web"], "branches": ["main"], "labels": ["linux"], "steps": ["build"],
             **PLAIN, "runners": ["a"]},
        ],
        "secrets": [],
        "warnings": [],
    }


def test_default_dir_from_environment(tmp_path, monkeypatch):
    write(tmp_path, "runners: [{name: envrunner}]\n", p=PIPELINE)
    monkeypatch.setenv("NARWHAL_CONFIG", str(tmp_path))
    assert load_config().runners[0].name == "envrunner"


def test_the_summary_shows_the_graph_services_and_policies(tmp_path):
    graph = PIPELINE + """  - {name: lint, run: x, depends_on: [], allow_failure: true}
  - {name: report, run: y, depends_on: [build, lint], when: {status: [failure]}, retry: 1}
services:
  - {name: db, image: postgres, ready: {port: 5432, timeout: 20s}}
"""
    write(tmp_path, "runners: [{name: a}]\n", g=graph)
    [summary] = summarize(load_config(tmp_path))["pipelines"]
    assert summary["graph"] is True and summary["width"] == 2
    assert summary["step_details"][2] == {"name": "report", "depends_on": ["build", "lint"],
                                          "when": {"status": ["failure"]}, "allow_failure": False, "retry": 1}
    assert summary["services"] == [{"name": "db", "image": "postgres", "ready": {"port": 5432, "timeout": 20.0}}]
