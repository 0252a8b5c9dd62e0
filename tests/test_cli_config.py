"""``narwhal check``, ``init`` and ``--json`` as a newcomer meets them, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from narwhal.cli.commands.config import runner_warnings
from narwhal.cli.common import iso_time, with_iso_times
from narwhal.cli.main import main
from narwhal.config import hosts
from narwhal.config.loader import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_check_in_an_empty_directory_names_the_file_and_the_way_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NARWHAL_CONFIG", raising=False)
    assert main(["check"]) == 2
    assert capsys.readouterr().err.strip() == (f"{tmp_path}/inventory.yaml: file not found (narwhal init writes a "
                                               f"starter config: narwhal init {tmp_path})")
    assert main(["check", "--config", str(tmp_path / "nowhere")]) == 2
    assert "config directory not found (narwhal init writes a starter config" in capsys.readouterr().err


def test_check_json_prints_the_problems_too(tmp_path, capsys):
    (tmp_path / "inventory.yaml").write_text("runners:\n  - name: a\n    port: ssh\n")
    assert main(["check", "--config", str(tmp_path), "--json"]) == 2
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] is False and answer["config_dir"] == str(tmp_path)
    assert answer["problems"] == [{"file": "inventory.yaml", "line": 3, "path": "runners[0].port",
                                   "message": "expected an integer, got 'ssh'"}]
    assert main(["check", "--config", str(ROOT), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_check_warns_about_key_and_known_hosts_files_that_are_not_there(tmp_path, capsys):
    key = tmp_path / "id_ed25519"
    key.write_text("key\n")
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump({
        "defaults": {"known_hosts": str(tmp_path / "gone_known_hosts")},
        "runners": [{"name": "a", "host": "10.0.0.1", "key": str(key)},
                    {"name": "b", "host": "10.0.0.2", "key": str(tmp_path / "missing")},
                    {"name": "here", "transport": "local"}]}, sort_keys=False))
    found = [str(w) for w in hosts.file_warnings(load_config(tmp_path))]
    assert found == [
        f"inventory.yaml:2: runners[0].known_hosts: file not found: {tmp_path}/gone_known_hosts (the runner's "
        "host key cannot be checked, so it is refused)",
        f"inventory.yaml:9: runners[1].key: file not found: {tmp_path}/missing (the runner cannot log in with it)",
        f"inventory.yaml:2: runners[1].known_hosts: file not found: {tmp_path}/gone_known_hosts (the runner's "
        "host key cannot be checked, so it is refused)",
    ]
    assert main(["check", "--config", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "runners[1].key: file not found" in out


def test_images_no_runner_has(tmp_path):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump({"runners": [
        {"name": "a", "host": "10.0.0.1", "labels": ["x"]}, {"name": "b", "host": "10.0.0.2", "labels": ["x"]}]}))
    (tmp_path / "pipelines" / "ci.yaml").write_text(yaml.safe_dump({
        "repo": "*", "image": "python:3.12", "labels": ["x"],
        "steps": [{"name": "s", "run": "true"}, {"name": "t", "run": "true", "image": "node:20"}]}, sort_keys=False))
    config = load_config(tmp_path)
    assert hosts.wanted_images(config) == {"a": ["node:20", "python:3.12"], "b": ["node:20", "python:3.12"]}
    found = [str(w) for w in hosts.image_warnings(config, {"a": {"python:3.12"}, "b": set()}, {"b": "refused"})]
    assert found == ["pipelines/ci.yaml:10: steps.1.image: image node:20 is on none of the runners that take "
                     "pipeline ci (a: not there; b: unreachable (refused)); its first job pulls it, which fails "
                     "without a registry"]


def test_check_runners_asks_a_runner_it_cannot_reach(tmp_path):
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump({"runners": [
        {"name": "gone", "host": "127.0.0.1", "port": 1, "known_hosts": str(tmp_path / "kh")}],
        "settings": {"connect_timeout": 5}}))
    (tmp_path / "kh").write_text("")
    found = [str(w) for w in runner_warnings(load_config(tmp_path), strict=True)]  # --runners
    assert found and found[0].startswith("inventory.yaml: runners.gone: not reachable to ask for images: ")


def test_init_writes_a_config_that_checks_and_never_overwrites(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "ci", "--local-root", str(tmp_path / "src")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path}/ci/inventory.yaml" in out and "narwhal check --config" in out
    config = load_config(tmp_path / "ci")
    assert [r.name for r in config.runners] == ["local"] and [p.name for p in config.pipelines] == ["example"]
    assert config.settings.local_roots == (str(tmp_path / "src"),) and config.warnings == []
    assert main(["init", "ci"]) == 2
    assert "exist already (--force overwrites)" in capsys.readouterr().err
    assert main(["init", "ci", "--force"]) == 0
    assert main(["check", "--config", "ci"]) == 0


def test_json_times_have_an_iso_twin():
    data = with_iso_times({"jobs": [{"id": 1, "created_at": 0, "finished_at": None, "reason": "x_at"}],
                           "updated_at": 1700000000.25, "flag_at": True})
    assert data["jobs"][0] == {"id": 1, "created_at": 0, "created_at_iso": "1970-01-01T00:00:00.000Z",
                               "finished_at": None, "reason": "x_at"}
    assert data["updated_at_iso"] == "2023-11-14T22:13:20.250Z" == iso_time(1700000000.25)
    assert "flag_at_iso" not in data
