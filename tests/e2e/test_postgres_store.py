"""``narwhal serve`` on PostgreSQL: the real dispatcher process with ``settings.store`` naming a
database of a throwaway cluster (password from a secret), running real jobs on an sshd runner."""

from __future__ import annotations

import pytest
import requests

from testbed import every_cmdline, everything_under
from tests.e2e.conftest import simple_pipeline, sse_events

pytestmark = pytest.mark.slow


def test_serve_on_postgresql_runs_a_job_on_an_ssh_runner_and_keeps_it_across_a_restart(
        dispatcher, ssh_host, git_repo, postgres):
    database = postgres.cluster.create_database(postgres.template)
    url = postgres.cluster.url(database)
    password = postgres.cluster.password
    try:
        settings = {"store": url, "store_password": "PGPASS"}
        inventory = {"secrets": {"PGPASS": {"env": "NARWHAL_TEST_PGPASS"}}}
        steps = [{"name": "build", "run": "for i in 1 2 3; do echo line $i; done; printf 'nul:\\000:end\\n'"},
                 {"name": "test", "run": "echo branch=$NARWHAL_BRANCH"}]
        env = {"NARWHAL_TEST_PGPASS": password}
        d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps)}, settings=settings,
                       inventory=inventory, env=env)
        [job] = d.submit(git_repo.path, git_repo.commit, branch="main")
        done = d.wait_job(job["id"])
        assert done["status"] == "passed", (done, d.get(f"/jobs/{job['id']}/log").text, d.log())
        assert done["runner"] == ssh_host.name and [s["status"] for s in done["steps"]] == ["passed", "passed"]
        text = d.get(f"/jobs/{job['id']}/log").text
        assert text.index("line 1") < text.index("line 3") < text.index("branch=main")
        assert "nul:" in text  # a NUL in step output reaches a bytea column, not an error
        with requests.get(d.url + "/events?after=0", headers={"Accept": "text/event-stream"},
                          stream=True, timeout=10) as r:
            kinds = []
            for event in sse_events(r):
                kinds.append(event.get("event"))
                if event.get("event") == "job.finished":
                    break
        jobs = [k for k in kinds if k and k.startswith("job.")]
        assert jobs[0] == "job.queued" and "job.started" in jobs and "job.step" in jobs and "runner.health" in kinds
        stats = d.get("/stats").json()
        assert stats["repos"][0]["passed"] == 1 and stats["runners"][0]["jobs"] == 1
        assert "store: postgresql" in d.log()
        node = d.get("/health").json()["node"]
        assert (node["store"], node["holds_database"], len(node["id"])) == ("postgresql", True, 32)

        # the state directory holds the mirrors and the lock, not a SQLite store
        assert not (d.state_dir / "narwhal.db").exists()
        # the password: never an argument, never in the log, never in the state directory
        assert password.encode() not in every_cmdline()
        assert password not in d.log()
        assert password.encode() not in everything_under(d.state_dir)
        d.stop()

        # a new dispatcher (another state directory) on the same database has the job, and goes on
        again = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps)}, settings=settings,
                           inventory=inventory, env=env)
        assert again.get(f"/jobs/{job['id']}").json()["status"] == "passed"
        assert again.get("/health").json()["node"]["id"] != node["id"]  # each start is a node of its own
        second = git_repo.add_commit({"more.txt": "x"})
        [job2] = again.submit(git_repo.path, second, branch="main")
        assert job2["id"] > job["id"]
        assert again.wait_job(job2["id"])["status"] == "passed"
        assert again.get("/stats").json()["repos"][0]["passed"] == 2
    finally:
        postgres.cluster.drop_database(database)


def test_serve_says_why_it_cannot_use_the_database(dispatcher, postgres, tmp_path):
    """A wrong password: serve exits with a one-line reason naming the database, not the password."""
    from narwhal.api.server import ServeFailed, ServeProcess, free_port
    from tests.e2e.conftest import write_config

    config_dir = tmp_path / "config"
    write_config(config_dir, [{"name": "local", "transport": "local"}], {"ci": simple_pipeline()},
                 settings={"store": postgres.cluster.url(postgres.template), "store_password": "PGPASS"},
                 inventory_extra={"secrets": {"PGPASS": {"env": "NARWHAL_TEST_PGPASS"}}})
    serve = ServeProcess(config_dir=config_dir, state_dir=tmp_path / "state", port=free_port(),
                         log_path=tmp_path / "serve.log", env={"NARWHAL_TEST_PGPASS": "wrong-password-123"})
    with pytest.raises(ServeFailed, match="exited with status"):
        serve.start(timeout=20)
    serve.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "password authentication failed" in log and postgres.cluster.url(postgres.template) in log
    assert "wrong-password-123" not in log and "Traceback" not in log


def test_one_serve_per_database_and_a_killed_one_frees_it_at_once(dispatcher, postgres, tmp_path):
    """A second narwhal serve on the same database exits 2 naming the first; after kill -9 of the
    first, the database has freed the hold (its session ended with the process) and a new one starts."""
    import signal
    import time

    from narwhal.api.server import ServeFailed, ServeProcess, free_port
    from tests.e2e.conftest import write_config

    database = postgres.cluster.create_database(postgres.template)
    try:
        settings = {"store": postgres.cluster.url(database), "store_password": "PGPASS"}
        inventory = {"secrets": {"PGPASS": {"env": "NARWHAL_TEST_PGPASS"}}}
        env = {"NARWHAL_TEST_PGPASS": postgres.cluster.password}
        runners = [{"name": "local", "transport": "local"}]
        first = dispatcher(runners, {"ci": simple_pipeline()}, settings=settings, inventory=inventory, env=env)
        node = first.get("/health").json()["node"]["id"]

        config_dir = tmp_path / "second-config"
        write_config(config_dir, runners, {"ci": simple_pipeline()}, settings=settings, inventory_extra=inventory)
        second = ServeProcess(config_dir=config_dir, state_dir=tmp_path / "second-state", port=free_port(),
                              log_path=tmp_path / "second.log", env=env)
        with pytest.raises(ServeFailed, match="exited with status 2"):
            second.start(timeout=30)
        log = (tmp_path / "second.log").read_text()
        assert "in use by another narwhal serve" in log and f"narwhal {node[-8:]}" in log and "Traceback" not in log

        first.stop(signal.SIGKILL)
        started = time.monotonic()
        third = dispatcher(runners, {"ci": simple_pipeline()}, settings=settings, inventory=inventory, env=env)
        assert time.monotonic() - started < 20
        assert third.get("/health").json()["node"]["holds_database"] is True
    finally:
        postgres.cluster.drop_database(database)
