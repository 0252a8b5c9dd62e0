"""Following jobs from the command line: step headers and times in logs, failures told when
they happen, messages in the pipeline's words, and Ctrl-C that says the job goes on."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest

from tests.e2e.cli import CLI, LOCAL, cli_env, run
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow
STAMP = r"\d\d:\d\d:\d\d\.\d{3} "


def test_logs_show_step_headers_and_times_and_timeouts_in_the_pipelines_words(dispatcher, git_repo):
    d = dispatcher([LOCAL], {
        "two": simple_pipeline([{"name": "one", "run": "echo first"}, {"name": "two", "run": "echo second"}]),
        "hang": simple_pipeline([{"name": "hang", "run": "echo hanging; sleep 120", "timeout": "2s"}]),
    })
    jobs = {j["pipeline"]: j["id"] for j in d.submit(git_repo.path, git_repo.commit)}
    assert d.wait_job(jobs["two"])["status"] == "passed"
    url = ["--url", d.url]

    for follow in ([], ["-f"]):
        shown = run("logs", str(jobs["two"]), "-t", *follow, *url).stdout.splitlines()
        body = [line for line in shown if not line.startswith("narwhal: job")]
        assert body and all(re.match(STAMP, line) for line in body), shown
        text = [re.sub(STAMP, "", line, count=1) for line in body]
        assert text.index("[narwhal] ── step one ──") < text.index("first") \
            < text.index("[narwhal] ── step two ──") < text.index("second"), text
    plain = run("logs", str(jobs["two"]), *url).stdout.splitlines()
    assert "[narwhal] ── step one ──" in plain and not re.match(STAMP, plain[0])
    rows = [json.loads(line) for line in run("logs", str(jobs["two"]), "-f", "-t", "--json", *url).stdout.splitlines()]
    assert all(isinstance(row["at"], float) for row in rows if "line" in row)
    assert run("logs", str(jobs["two"]), "--raw", "-t", *url).returncode == 2

    hung = d.wait_job(jobs["hang"])
    assert (hung["status"], hung["reason"]) == ("failed", "timeout in step hang")
    notes = [line for line in run("logs", str(jobs["hang"]), *url).stdout.splitlines() if line.startswith("[narwhal]")]
    assert "[narwhal] step hang timed out after 2s; stopping it" in notes, notes
    assert not [line for line in notes if "narwhal-" in line], notes  # no container names

    done = run("cancel", str(jobs["hang"]), *url)
    assert done.returncode == 0
    assert done.stdout.strip() == (f"job {jobs['hang']} hang had already finished: failed (timeout in step hang); "
                                   "nothing to cancel")
    assert d.get(f"/jobs/{jobs['hang']}").json()["status"] == "failed"


def test_wait_tells_a_failure_at_once_and_ctrl_c_says_the_job_goes_on(dispatcher, git_repo):
    d = dispatcher([LOCAL], {"fast": simple_pipeline([{"name": "lint", "run": "echo bad style; exit 4"}]),
                             "slow": simple_pipeline([{"name": "soak", "run": "echo soaking; sleep 300"}])})
    proc = subprocess.Popen([*CLI, "--url", d.url, "submit", git_repo.path, "HEAD", "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if re.match(r"job \d+ fast failed", line):
                break
        slow = next(j for j in d.get("/jobs").json()["jobs"] if j["pipeline"] == "slow")
        assert slow["status"] in ("queued", "running"), seen  # told while the other still runs
        for line in proc.stdout:  # then the tail of its log
            seen.append(line)
            if "bad style" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (seen, rest, err)
    assert f"job {slow['id']} continues: narwhal logs {slow['id']} -f" in rest, (seen, rest)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert d.get(f"/jobs/{slow['id']}").json()["status"] in ("queued", "running")
    d.post(f"/jobs/{slow['id']}/cancel")
    assert d.wait_job(slow["id"])["status"] == "cancelled"
