"""Issue "Trust boundaries" (findings 2, 4, 10d) against the real `narwhal serve`:
runners registered over the API are untrusted, and no file's bytes or env value
reaches an API answer or the dispatcher's log."""

from __future__ import annotations

import os

import pytest

from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow

SECRET = "root:$6$canary-first-line-s3cret:19000:0:99999:7:::"
CANARY = "canary-env-value-7f3a9c"


def _problems(r) -> dict[str, str]:
    assert r.status_code == 422, r.text
    return {p["path"]: p["message"] for p in r.json()["problems"]}


def _everything_said(d) -> str:
    return d.get("/runner").text + d.get("/stats").text + d.log_path.read_text(errors="replace")


def test_finding2_known_hosts_naming_any_file_is_refused_and_never_echoed(dispatcher, tmp_path):
    planted = tmp_path / "planted"
    planted.write_text(SECRET + "\nsecond line\n")
    d = dispatcher([], {"ci": simple_pipeline()})
    for path in ("/etc/passwd", "/etc/shadow", str(planted)):
        for field in ("known_hosts", "key"):
            r = d.post("/runner", {"name": "spy", "host": "127.0.0.1", "port": 2, field: path})
            assert "runner_files_dir" in _problems(r)[f"runner.{field}"]
            assert "root:" not in r.text and "s3cret" not in r.text
    assert d.get("/runner").json()["runners"] == []
    assert "s3cret" not in _everything_said(d) and "root:x:0" not in _everything_said(d)


def test_finding2_a_bad_file_inside_runner_files_dir_is_named_never_quoted(dispatcher, tmp_path):
    allowed = tmp_path / "runner-files"
    allowed.mkdir()
    (allowed / "known_hosts").write_text(SECRET + "\n")
    (allowed / "key").write_text(SECRET + "\n")
    (allowed / "good_known_hosts").write_text("")
    (allowed / "escape").symlink_to("/etc/passwd")
    d = dispatcher([], {"ci": simple_pipeline()}, settings={"runner_files_dir": str(allowed)})

    r = d.post("/runner", {"name": "spy0", "host": "127.0.0.1", "port": 2, "known_hosts": "escape"})
    assert "inside the directory" in _problems(r)["runner.known_hosts"]
    r = d.post("/runner", {"name": "spy1", "host": "127.0.0.1", "port": 2, "known_hosts": "known_hosts"})
    assert r.status_code == 201, r.text
    r = d.post("/runner", {"name": "spy2", "host": "127.0.0.1", "port": 2, "known_hosts": "good_known_hosts",
                           "key": str(allowed / "key")})
    assert r.status_code == 201, r.text

    def reasons() -> dict[str, str]:
        return {x["name"]: x["health"]["reason"] or "" for x in d.get("/runner").json()["runners"]
                if x["health"]["state"] == "unhealthy"}
    found = d.wait_for(lambda: len(reasons()) == 2 and reasons(), what="both runners checked")
    assert "known_hosts file" in found["spy1"] and "is not valid" in found["spy1"]
    assert "private key file" in found["spy2"] and "is not valid" in found["spy2"]
    assert "s3cret" not in _everything_said(d)


def test_finding4_api_runner_cannot_take_privileges(dispatcher):
    d = dispatcher([], {"ci": simple_pipeline()})
    base = {"name": "rogue", "host": "127.0.0.1", "port": 2}
    assert "inventory only" in _problems(d.post("/runner", {**base, "transport": "local"}))["runner.transport"]
    assert "inventory only" in _problems(d.post("/runner", {**base, "network": "host"}))["runner.network"]
    assert "api_runner_max_capacity" in _problems(d.post("/runner", {**base, "capacity": 1000}))["runner.capacity"]
    assert "runner.capacity" in _problems(d.post("/runner", {**base, "capacity": 1e23}))
    assert "runner.capacity" in _problems(d.post("/runner", {**base, "capacity": 10**23}))
    assert d.get("/runner").json()["runners"] == []


def test_finding4_and_10_api_ssh_runner_takes_inventory_defaults_and_no_env_is_logged(
        dispatcher, ssh_host, git_repo):
    defaults = {"user": ssh_host.user, "key": ssh_host.key_path, "known_hosts": ssh_host.known_hosts_path,
                "network": "host", "capacity": 2}
    steps = [{"name": "env", "run": f'test "${{#CANARY}}" = {len(CANARY)} && echo canary-present'}]
    d = dispatcher([], {"ci": simple_pipeline(steps, env={"CANARY": CANARY})}, defaults=defaults)
    r = d.post("/runner", {"name": ssh_host.name, "host": ssh_host.address, "port": ssh_host.port})
    assert r.status_code == 201, r.text
    entry = r.json()
    assert (entry["user"], entry["capacity"], entry["transport"]) == (ssh_host.user, 2, "ssh")

    job = d.wait_job(d.submit(git_repo.path, git_repo.commit)[0]["id"])
    assert (job["status"], job["runner"]) == ("passed", ssh_host.name), job
    assert "canary-present" in d.get(f"/jobs/{job['id']}/log").text
    log = d.log_path.read_text(errors="replace")
    assert "narwhal listening" in log  # the log is the one the dispatcher writes at its default level
    assert CANARY not in log
    assert os.path.getsize(d.log_path) > 0
