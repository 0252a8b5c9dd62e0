"""Private repositories on the real path: ``narwhal serve`` fetches from a loopback git
server that wants a token (``git http-backend`` behind an Authorization check), and over
a real sshd with a deploy key; a job on a real Docker engine builds what it fetched.

While git waits on the server, the token is on no command line on the machine; after
the job it is nowhere in the mirror, the state directory, the dispatcher's debug log or
any API answer, and a hostile server that echoes it gets it back masked.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from testbed import RUNNER_USER, PrivateGitServer, every_cmdline, everything_under
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow

TOKEN = "tok-E2E-private-repo-31d7c0"
ROTATED = "tok-E2E-rotated-value-88ab4e"
USERNAME = "oauth2"
LOCAL = {"name": "local", "transport": "local", "capacity": 2}


def basic(value: str) -> str:
    return "Basic " + base64.b64encode(f"{USERNAME}:{value}".encode()).decode()


def spellings(value: str) -> list[bytes]:
    return [value.encode(), base64.b64encode(value.encode()), basic(value).split()[1].encode()]


def leaks(data: bytes | str, values: tuple[str, ...] = (TOKEN, ROTATED)) -> list[str]:
    data = data.encode("utf-8", "replace") if isinstance(data, str) else data
    return [s.decode() for value in values for s in spellings(value) if s in data]


def bare_copy(source: str, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--bare", source, str(target)], check=True)
    return str(target)


def test_finding11_a_private_https_repository_builds_and_its_token_leaks_nowhere(dispatcher, git_repo, tmp_path):
    root = tmp_path / "served"
    bare_copy(git_repo.path, root / "team" / "app.git")
    bare_copy(git_repo.path, root / "other" / "app.git")
    server = PrivateGitServer(str(root), basic(TOKEN)).start()
    hostile_root = tmp_path / "hostile"
    bare_copy(git_repo.path, hostile_root / "team" / "app.git")
    hostile = PrivateGitServer(str(hostile_root), None).start()
    hostile.remote_error(lambda headers: f"I got {headers.get('Authorization')}")
    token_file = tmp_path / "git_token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    try:
        pipeline = simple_pipeline([{"name": "show", "run": "cat README.md; env | sort"}],
                                   repo=[f"{server.url}/**", f"{hostile.url}/**"])
        d = dispatcher([LOCAL], {"ci": pipeline}, args=("--log-level", "debug"), inventory={
            "secrets": {"GIT_TOKEN": {"file": str(token_file), "repos": []}},  # for git, not for jobs
            "repos": [{"url": f"{server.url}/team/*", "token": "GIT_TOKEN", "username": USERNAME},
                      {"url": f"{hostile.url}/team/*", "token": "GIT_TOKEN", "username": USERNAME}]})
        answers: list[str] = []

        # No credential for this repository: a clear 422, and the server saw no token.
        r = d.post("/commit", {"repo": server.repo_url("other/app.git"), "commit": git_repo.commit,
                               "branch": "main"})
        answers.append(r.text)
        assert r.status_code == 422, r.text
        assert "the server wants credentials and none is configured for this repository" in r.json()["error"]
        assert all(s.authorization is None for s in server.seen)

        # With one: while git waits on the server, no command line holds the token.
        server.hold()
        url = server.repo_url("team/app.git")
        r = d.post("/commit", {"repo": url, "commit": git_repo.commit, "branch": "main"})
        answers.append(r.text)
        assert r.status_code == 202 and r.json()["status"] == "resolving", r.text
        assert server.holding.wait(30), d.log()
        cmdlines = every_cmdline()
        assert b"remote-http" in cmdlines  # git is mid-request
        assert leaks(cmdlines) == []
        server.release()
        job_id = d.wait_for(lambda: [j["id"] for j in d.get("/jobs").json()["jobs"] if j["repo"] == url],
                            60, "the job of the fetched commit")[0]
        job = d.wait_job(job_id)
        assert job["status"] == "passed", (job, d.get(f"/jobs/{job_id}/log").text, d.log())
        assert "# demo" in d.get(f"/jobs/{job_id}/log").text
        assert {s.authorization for s in server.seen if s.path.startswith("/team/")} == {basic(TOKEN)}

        # A hostile server that echoes the header back: the 422 and the log show it masked.
        r = d.post("/commit", {"repo": hostile.repo_url("team/app.git"), "commit": git_repo.commit,
                               "branch": "main"})
        answers.append(r.text)
        assert r.status_code == 422 and "I got [masked:GIT_TOKEN]" in r.json()["error"], r.text

        # A rotated token applies to the next fetch after a reload.
        server.authorization = basic(ROTATED)
        token_file.write_text(ROTATED + "\n")
        assert d.post("/reload").status_code == 200
        newer = git_repo.add_commit({"new.txt": "new\n"})
        subprocess.run(["git", "-C", git_repo.path, "push", "-q", str(root / "team" / "app.git"), "main"],
                       check=True)
        r = d.post("/commit", {"repo": url, "commit": newer, "branch": "main"})
        answers.append(r.text)
        assert r.status_code == 202 and r.json()["jobs"], r.text
        assert d.wait_job(r.json()["jobs"][0]["id"])["status"] == "passed"

        for path in ("/jobs", f"/jobs/{job_id}", f"/jobs/{job_id}/log", "/commit", "/stats", "/health",
                     "/runner", "/secrets"):
            answers.append(d.get(path).text)
        assert leaks("\n".join(answers)) == []
        assert "GIT_TOKEN" in d.get("/secrets").text
        assert leaks(d.log_path.read_bytes()) == [], d.log()
        assert leaks(everything_under(d.state_dir)) == []
        mirrors = list((d.state_dir / "mirrors").glob("*/config"))
        assert mirrors and all("extraheader" not in m.read_text().lower() for m in mirrors)
    finally:
        server.stop()
        hostile.stop()


@pytest.fixture
def runner_home_repo(git_repo, runner_user) -> str:
    """A bare copy of git_repo in the runner user's home, owned by that user (git refuses others')."""
    home = pwd.getpwnam(runner_user).pw_dir
    path = Path(home) / f"narwhal-e2e-{uuid.uuid4().hex[:8]}.git"
    bare_copy(git_repo.path, path)
    shutil.chown(path, runner_user, runner_user)
    for base, dirs, files in os.walk(path):
        for name in dirs + files:
            shutil.chown(os.path.join(base, name), runner_user, runner_user)
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)


def key_dirs(pid: int) -> list[str]:
    return [n for base in ("/dev/shm", "/tmp") if os.path.isdir(base)
            for n in os.listdir(base) if n.startswith(f"narwhal-gitkey-{pid}-")]


def test_finding11_a_deploy_key_fetches_over_real_sshd_and_is_gone_after(dispatcher, ssh_host, runner_home_repo,
                                                                        git_repo, tmp_path):
    """The runner host's sshd doubles as the git server (git is installed there: the same machine)."""
    assert ssh_host.user == RUNNER_USER
    key = Path(ssh_host.key_path).read_text()
    key_file = tmp_path / "deploy_key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    where = ssh_host.address if ssh_host.port == 22 else f"{ssh_host.address}:{ssh_host.port}"
    url = f"ssh://{ssh_host.user}@{where}{runner_home_repo}"
    other = url[:-len(".git")] + "-other.git"
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(
        [{"name": "show", "run": "cat README.md"}], repo=[f"ssh://{ssh_host.user}@{where}/**"])},
        args=("--log-level", "debug"), inventory={
            "secrets": {"DEPLOY_KEY": {"file": str(key_file), "repos": []}},
            "repos": [{"url": url, "ssh_key": "DEPLOY_KEY", "known_hosts": ssh_host.known_hosts_path}]})

    r = d.post("/commit", {"repo": other, "commit": git_repo.commit, "branch": "main"})
    assert r.status_code == 422, r.text  # no key configured for it: root's own ssh set-up cannot get in
    assert "Host key verification failed" in r.text or "Permission denied" in r.text, r.text

    start = time.monotonic()
    [job] = d.submit(url, git_repo.commit, "main")
    done = d.wait_job(job["id"])
    assert done["status"] == "passed", (done, d.get(f"/jobs/{job['id']}/log").text, d.log())
    assert "# demo" in d.get(f"/jobs/{job['id']}/log").text
    assert key_dirs(d.pid) == [], "the deploy key outlived its git command"
    body = key.split("\n")[1].encode()  # a line of the key's base64
    assert body not in d.log_path.read_bytes() and body not in everything_under(d.state_dir)
    assert body not in json.dumps(d.get(f"/jobs/{job['id']}").json()).encode()
    assert time.monotonic() - start < 60
