"""The ``narwhal`` command end to end: ``python -m narwhal ...`` subprocesses against a real
dispatcher process, a real git repository and a real Docker engine (``local`` runner)."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from narwhal.api.server import free_port
from tests.conftest import need
from tests.e2e.cli import CLI, LOCAL, cli_env, run, run_json
from tests.e2e.conftest import simple_pipeline

# --- no dispatcher needed --------------------------------------------------------------------


def test_unreachable_dispatcher_is_one_line_and_exit_2():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["report"], ["runners"], ["jobs", "--json"], ["logs", "1", "-f"], ["cancel", "3"]):
        proc = run("--url", url, *args, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert url in lines[0] and "narwhal serve" in lines[0] and "connection refused" in lines[0]


def test_url_from_environment_and_help_has_examples():
    url = f"http://127.0.0.1:{free_port()}"
    proc = run("runners", env=cli_env(NARWHAL_URL=url))
    assert proc.returncode == 2 and url in proc.stderr
    for command in ("report", "submit", "logs", "runner", "demo", "serve", "jobs"):
        help_text = run(command, "--help")
        assert help_text.returncode == 0
        assert "example" in help_text.stdout.lower(), (command, help_text.stdout)


def test_bad_usage_exits_2():
    proc = run("jobs", "--limit", "many")
    assert proc.returncode == 2 and "many" in proc.stderr
    proc = run("submit", "/nonexistent-dir-for-narwhal", "HEAD", "--url", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2


def test_follow_log_resumes_after_a_dropped_connection():
    """A stream cut mid-way (truncated chunked body) is resumed with Last-Event-ID: no line lost or repeated."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from narwhal.cli.client import Client

    asked: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            asked.append(self.headers.get("Last-Event-ID"))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(text: str) -> None:
                data = text.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            if len(asked) == 1:
                chunk("retry: 1000\n\nid: 1\ndata: one\n\nid: 2\ndata: two\n\nid: 3\ndata: thr")
                self.close_connection = True  # cut mid-event, without the closing chunk
                return
            chunk("id: 3\ndata: three\n\n: keepalive\n\n")
            chunk('event: end\ndata: {"status": "passed", "reason": null, "id": 1}\n\n')
            self.wfile.write(b"0\r\n\r\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        items = list(Client(f"http://127.0.0.1:{server.server_address[1]}").follow_log(1))
    finally:
        server.shutdown()
        server.server_close()
    assert items == [(1, "one", "step"), (2, "two", "step"), (3, "three", "step"),
                     {"status": "passed", "reason": None, "id": 1}]
    assert asked == ["0", "2"]


def test_serve_usage_errors_exit_2(tmp_path):
    proc = run("serve", "--config", str(tmp_path))
    assert proc.returncode == 2 and "inventory.yaml" in proc.stderr
    (tmp_path / "inventory.yaml").write_text("runners:\n  - name: local\n    transport: local\n")
    proc = run("serve", "--config", str(tmp_path), "--listen", "nowhere")
    assert proc.returncode == 2 and "--listen" in proc.stderr
    proc = run("serve", "--config", str(tmp_path), "--listen", "0.0.0.0:0")
    assert proc.returncode == 2 and "token" in proc.stderr


# --- against a real dispatcher ---------------------------------------------------------------


@pytest.mark.slow
def test_submit_wait_report_and_read_commands(dispatcher, git_repo):
    d = dispatcher([LOCAL], {"ci": simple_pipeline([
        {"name": "build", "run": "echo building; sh build.sh"},
        {"name": "test", "run": "echo testing"},
    ])})
    url = d.url

    # A short ref in a local repository is resolved to the full sha before posting.
    proc = run("--url", url, "submit", git_repo.path, "HEAD", "--branch", "main", "--wait")
    assert proc.returncode == 0, (proc.stdout, proc.stderr, d.log())
    assert "ci" in proc.stdout and "passed" in proc.stdout and "build" in proc.stdout
    assert "\x1b" not in proc.stdout

    jobs = run_json("jobs", "--url", url)["jobs"]
    assert len(jobs) == 1 and jobs[0]["commit"] == git_repo.commit and jobs[0]["status"] == "passed"
    job_id = jobs[0]["id"]

    # human report without a tty: names things, no colour codes, no box drawing
    proc = run("report", "--url", url)
    assert proc.returncode == 0, proc.stderr
    for word in ("Now: the latest job", "Repositories", "Runners", "Recent jobs", "Queue", "local", "ci", "passed",
                 git_repo.commit[:10], "\nrepo "):  # the repository by its short name
        assert word in proc.stdout, (word, proc.stdout)
    assert "\x1b" not in proc.stdout
    assert not any(ch in proc.stdout for ch in "╭│─┃━")

    data = run_json("report", "--url", url)
    assert set(data) >= {"stats", "runners", "jobs", "queue"}
    assert data["stats"]["repos"][0]["passed"] == 1
    assert [r["name"] for r in data["runners"]] == ["local"]
    assert data["jobs"][0]["id"] == job_id and data["queue"] == []

    runners = run_json("runners", "--url", url)["runners"]
    assert runners[0]["name"] == "local" and runners[0]["capacity"] == 2
    human = run("runners", "--url", url)
    assert human.returncode == 0 and "local" in human.stdout and "healthy" in human.stdout

    job = run_json("job", str(job_id), "--url", url)
    assert job["status"] == "passed" and [s["name"] for s in job["steps"]] == ["build", "test"]
    human = run("job", str(job_id), "--url", url)
    assert "passed" in human.stdout and "build" in human.stdout and "test" in human.stdout

    log = run("logs", str(job_id), "--url", url)
    assert log.returncode == 0 and "building" in log.stdout and "testing" in log.stdout

    assert run_json("jobs", "--status", "failed", "--url", url)["jobs"] == []
    assert len(run_json("jobs", "--repo", git_repo.path, "--limit", "5", "--url", url)["jobs"]) == 1

    # retry: a new attempt of the same job, which passes again
    retried = run_json("retry", str(job_id), "--url", url)
    assert retried["id"] == job_id and retried["status"] == "queued"
    assert d.wait_job(job_id)["status"] == "passed"

    # errors: 404 exits 1 with the server's message; bad input exits 2
    missing = run("job", "999999", "--url", url)
    assert missing.returncode == 1 and "no job 999999" in missing.stderr
    bad = run("submit", "https://example.invalid/x.git", "not-a-sha", "--url", url)
    assert bad.returncode == 2 and "commit" in bad.stderr
    unknown_ref = run("submit", git_repo.path, "no-such-branch", "--url", url)
    assert unknown_ref.returncode == 2 and "no-such-branch" in unknown_ref.stderr


@pytest.mark.slow
def test_failed_job_exits_1_and_cancel(dispatcher, git_repo):
    d = dispatcher([LOCAL], {
        "broken": simple_pipeline([{"name": "compile", "run": "echo oops; exit 3"}]),
    })
    proc = run("--url", d.url, "submit", git_repo.path, git_repo.commit, "--wait")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "failed" in proc.stdout and "compile" in proc.stdout and "broken" in proc.stdout

    job_id = run_json("jobs", "--url", d.url)["jobs"][0]["id"]
    follow = run("logs", str(job_id), "-f", "--url", d.url)
    assert follow.returncode == 1 and "oops" in follow.stdout and "failed" in follow.stdout

    # cancelling a finished job changes nothing
    done = run("cancel", str(job_id), "--url", d.url)
    assert done.returncode == 0 and "failed" in done.stdout

    # a long job: cancel it while it runs
    git_repo.add_commit({"slow": "1"})
    d2 = dispatcher([LOCAL], {"slow": simple_pipeline([{"name": "sleep", "run": "echo started; sleep 120"}])})
    job = d2.submit(git_repo.path, git_repo.commit)[0]
    d2.wait_for(lambda: d2.get(f"/jobs/{job['id']}").json()["status"] == "running", what="job running")
    # retrying a job that has not ended is a conflict: exit 1 with the server's message
    busy = run("retry", str(job["id"]), "--url", d2.url)
    assert busy.returncode == 1 and busy.stderr.startswith("narwhal: error: "), busy.stderr
    cancelled = run_json("cancel", str(job["id"]), "--url", d2.url)
    assert cancelled["id"] == job["id"]
    assert d2.wait_job(job["id"])["status"] == "cancelled"
    human = run("jobs", "--url", d2.url)
    assert "cancelled" in human.stdout


@pytest.mark.slow
def test_logs_follow_prints_lines_as_they_arrive(dispatcher, git_repo):
    steps = [{"name": "talk", "run": "echo first line; sleep 120; echo never"}]
    d = dispatcher([LOCAL], {"ci": simple_pipeline(steps)})
    job = d.submit(git_repo.path, git_repo.commit)[0]
    proc = subprocess.Popen([*CLI, "--url", d.url, "logs", str(job["id"]), "-f"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert proc.stdout.readline() == "[narwhal] ── step talk ──\n"  # the step's header, then its output
        first = proc.stdout.readline()
        assert "first line" in first
        # the step is still sleeping: the line was streamed, not read at the end
        assert d.get(f"/jobs/{job['id']}").json()["status"] == "running"
        d.post(f"/jobs/{job['id']}/cancel")
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (rest, err)  # the job ended, and not with "passed"
    assert "Traceback" not in err
    assert "cancelled" in rest and "never" not in rest


@pytest.mark.slow
def test_logs_follow_ctrl_c_leaves_the_job_running(dispatcher, git_repo):
    d = dispatcher([LOCAL], {"slow": simple_pipeline([{"name": "wait", "run": "echo waiting; sleep 120"}])})
    job = d.submit(git_repo.path, git_repo.commit)[0]
    proc = subprocess.Popen([*CLI, "--url", d.url, "logs", str(job["id"]), "-f"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert "step wait" in proc.stdout.readline()
        assert "waiting" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert d.get(f"/jobs/{job['id']}").json()["status"] == "running"
    d.post(f"/jobs/{job['id']}/cancel")
    assert d.wait_job(job["id"])["status"] == "cancelled"


@pytest.mark.slow
def test_report_under_a_terminal_has_colour_and_tables(dispatcher, git_repo):
    need(shutil.which("script"), "script (util-linux) is not installed")
    d = dispatcher([LOCAL], {"ci": simple_pipeline()})
    job = d.submit(git_repo.path, git_repo.commit, branch="main")[0]
    assert d.wait_job(job["id"])["status"] == "passed"
    command = shlex.join([*CLI, "--url", d.url, "report"])
    env = cli_env(TERM="xterm-256color", COLUMNS="160", LINES="50")
    proc = subprocess.run(["script", "-qfec", command, "/dev/null"], capture_output=True, text=True,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)
    screen = proc.stdout
    assert proc.returncode == 0, (screen, proc.stderr)
    assert "Traceback" not in screen
    for word in ("Repositories", "Runners", "Recent jobs", "Queue", "local", "ci", "passed"):
        assert word in screen, (word, screen)
    assert "\x1b[" in screen  # colour escapes (the layouts: tests/e2e/test_report_screens.py)

    # and piped: the same words, no escapes
    piped = run("--url", d.url, "report")
    assert "passed" in piped.stdout and "\x1b" not in piped.stdout


@pytest.mark.slow
def test_report_watch_refreshes_until_ctrl_c(dispatcher, git_repo):
    d = dispatcher([LOCAL], {"ci": simple_pipeline()})
    proc = subprocess.Popen([*CLI, "--url", d.url, "report", "--watch"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        seen = 0
        for line in proc.stdout:  # without a tty, each refresh prints the report again
            seen += line.startswith("Runners")
            if seen == 2:
                break
        assert seen == 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err


@pytest.mark.slow
def test_report_queue_says_why_jobs_wait(dispatcher, git_repo):
    d = dispatcher([{**LOCAL, "capacity": 1}], {"slow": simple_pipeline([{"name": "s", "run": "sleep 120"}])})
    first = d.submit(git_repo.path, git_repo.commit)[0]
    d.wait_for(lambda: d.get(f"/jobs/{first['id']}").json()["status"] == "running", what="first running")
    git_repo.add_commit({"more": "1"})
    second = d.submit(git_repo.path, git_repo.commit)[0]
    data = run_json("report", "--url", d.url)
    assert [q["id"] for q in data["queue"]] == [second["id"]]
    assert data["queue"][0]["waiting"][0]["runner"] == "local"
    human = run("report", "--url", d.url)
    assert "local: capacity full" in human.stdout, human.stdout
    for job in (first, second):
        d.post(f"/jobs/{job['id']}/cancel")


@pytest.mark.slow
def test_runner_add_drain_resume_remove_with_token(dispatcher, git_repo):
    d = dispatcher([LOCAL], {"ci": simple_pipeline()}, token="s3cret",
                   settings={"api_runner_labels": ["big", "linux"]})
    denied = run("runner", "add", "extra", "--host", "localhost", "--transport", "local", "--url", d.url)
    assert denied.returncode == 2 and "token" in denied.stderr.lower()

    env = cli_env(NARWHAL_TOKEN="s3cret", NARWHAL_URL=d.url)
    local = run("runner", "add", "extra", "--host", "localhost", "--transport", "local", env=env)
    assert local.returncode == 2 and "transport" in local.stderr  # inventory only
    added = run("runner", "add", "extra", "--host", "localhost", "--label", "big",
                "--label", "linux", "--capacity", "3", "--json", env=env)
    assert added.returncode == 0, added.stderr
    data = json.loads(added.stdout)
    assert data["name"] == "extra" and data["labels"] == ["big", "linux"] and data["capacity"] == 3

    assert json.loads(run("runner", "drain", "extra", "--json", env=env).stdout)["draining"] is True
    human = run("runners", env=env)
    assert "extra" in human.stdout and "draining" in human.stdout
    assert json.loads(run("runner", "resume", "extra", "--json", env=env).stdout)["draining"] is False
    duplicate = run("runner", "add", "extra", "--host", "localhost", env=env)
    assert duplicate.returncode == 1 and "exists" in duplicate.stderr
    invalid = run("runner", "add", "bad name!", "--host", "h", env=env)
    assert invalid.returncode == 2 and invalid.stderr.strip()

    removed = run("runner", "remove", "extra", env=env)
    assert removed.returncode == 0 and "extra" in removed.stdout
    names = [r["name"] for r in json.loads(run("runners", "--json", env=env).stdout)["runners"]]
    assert names == ["local"]
    inventory = run("runner", "remove", "local", env=env)
    assert inventory.returncode == 1 and "inventory" in inventory.stderr
    missing = run("runner", "drain", "ghost", env=env)
    assert missing.returncode == 1 and "ghost" in missing.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(docker_engine, test_image, tmp_path):
    port = free_port()
    proc = run("demo", "--dir", str(tmp_path / "demo"), "--port", str(port), timeout=300)
    assert proc.returncode == 0, (proc.stdout, proc.stderr,
                                  (tmp_path / "demo" / "dispatcher.log").read_text(errors="replace"))
    out = proc.stdout
    for word in ("example", "passed", "Runners", "local"):
        assert word in out, (word, out)
    # the log, live: each step under its header, with its output (the README's example pipeline)
    assert out.index("[narwhal] ── step list ──") < out.index("README.md") < out.index("[narwhal] ── step count ──")
    assert "source lines:" in out
    assert (tmp_path / "demo" / "config" / "inventory.yaml").is_file()
    # the dispatcher it started is gone again
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _port_free(port):
        time.sleep(0.1)
    assert _port_free(port)

    # Its closing hint works as copied: the same config, state and port, with the demo's job.
    hint = next(line.strip() for line in out.splitlines() if line.strip().startswith("narwhal serve "))
    argv = shlex.split(hint)
    assert argv[:2] == ["narwhal", "serve"] and "--state" in argv and f"127.0.0.1:{port}" in argv
    url = next(line.split()[-1] for line in out.splitlines() if "narwhal report --url" in line)
    server = subprocess.Popen([*CLI, *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=cli_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and run("jobs", "--url", url).returncode != 0:
            time.sleep(0.2)
        jobs = run_json("jobs", "--url", url)["jobs"]
        assert [(j["pipeline"], j["status"]) for j in jobs] == [("example", "passed")]
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0 and "Traceback" not in err


def _port_free(port: int) -> bool:
    from testbed import port_free

    return port_free("127.0.0.1", port)
