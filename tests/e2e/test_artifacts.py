"""Artifacts on the real path: `narwhal serve`, an sshd runner host, dockerd, busybox images.

A step makes files; the collector sends them back over the runner's SSH connection; they are
served by the API (Range included) and fetched by the CLI byte for byte; escapes are refused
(a symbolic link out, and, from an image whose `tar` lies, absolute and `..` names); the quota,
the expiry and `when:` hold.
"""

from __future__ import annotations

import hashlib
import io
import re
import signal
import tarfile
import time
from pathlib import Path

import pytest
import requests

from testbed import TEST_IMAGE
from tests.e2e.cli import cli_env, run
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow

MAKE = ("mkdir -p dist sub && head -c 3000017 /dev/urandom > dist/app.whl && echo '<r/>' > report.xml "
        "&& echo inner > sub/deep.txt && ln -s ../report.xml dist/report-link.xml "
        "&& ln -s /etc/passwd dist/passwd-link && ln -s ../../../../etc/hostname dist/up-link")
CHECK = "sha256sum dist/app.whl && test -s dist/app.whl"  # a later step sees the files in the workspace


def log_of(d, job_id: int) -> str:
    return d.get(f"/jobs/{job_id}/log").text


def listing(d, job_id: int) -> dict[str, dict]:
    r = d.get(f"/jobs/{job_id}/artifacts")
    assert r.status_code == 200, r.text
    return {a["path"]: a for a in r.json()["artifacts"]}


def objects_of(state: Path) -> list[Path]:
    return [p for p in (state / "artifacts" / "objects").rglob("*") if p.is_file()]


def test_artifacts_come_back_byte_identical_and_are_served_with_range(dispatcher, ssh_host, git_repo, tmp_path):
    pipeline = simple_pipeline([{"name": "build", "run": MAKE}, {"name": "check", "run": CHECK}],
                               artifacts={"paths": ["dist/*", "report.xml", "sub", "missing*"]})
    d = dispatcher([ssh_host.runner_config()], {"ci": pipeline})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    job = d.wait_job(job_id)
    text = log_of(d, job_id)
    assert job["status"] == "passed", (job, text)
    made = re.search(r"^([0-9a-f]{64})  dist/app.whl$", text, re.M)
    assert made, text
    files = listing(d, job_id)
    assert sorted(files) == ["dist/app.whl", "dist/report-link.xml", "report.xml", "sub/deep.txt"]
    assert files["dist/app.whl"]["sha256"] == made.group(1) and files["dist/app.whl"]["size"] == 3000017
    assert files["dist/report-link.xml"]["sha256"] == files["report.xml"]["sha256"]  # a link inside: the file
    # The collection and the refusals are in the job's log, by path, never by content.
    assert re.search(r"\[narwhal\] artifacts: 4 files, 3\.0 MB \(", text), text
    assert "[narwhal] artifacts: refused ./dist/passwd-link: a symbolic link that points out of the workspace" in text
    assert "[narwhal] artifacts: refused ./dist/up-link: a symbolic link that points out of the workspace" in text
    assert "root:" not in text

    # The API: the whole file, its type and name, a Range, a conditional GET.
    url = d.url + files["dist/app.whl"]["url"]
    whole = requests.get(url, timeout=60)
    assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == made.group(1)
    assert whole.headers["Content-Disposition"].startswith('attachment; filename="app.whl"')
    assert whole.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in whole.headers["Content-Security-Policy"]
    part = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=30)
    assert part.status_code == 206 and part.content == whole.content[1000:2000]
    assert part.headers["Content-Range"] == "bytes 1000-1999/3000017"
    tail = requests.get(url, headers={"Range": "bytes=-17"}, timeout=30)
    assert tail.status_code == 206 and tail.content == whole.content[-17:]
    again = requests.get(url, headers={"If-None-Match": whole.headers["ETag"]}, timeout=30)
    assert again.status_code == 304
    report = requests.get(d.url + files["report.xml"]["url"], timeout=30)
    assert report.content == b"<r/>\n" and report.headers["Content-Type"].split(";")[0] in ("application/xml",
                                                                                           "text/xml")
    for hostile in ("..%2F..%2Fnarwhal.db", "../../narwhal.db", "%2Fetc%2Fpasswd", "dist%00app.whl",
                    "dist/passwd-link", "objects"):
        r = requests.get(f"{d.url}/jobs/{job_id}/artifacts/{hostile}", timeout=30)
        assert r.status_code in (400, 404) and r.headers["Content-Type"] == "application/json", (hostile, r.text)

    # The CLI: the list, everything into a directory, one file to stdout; each checked by sha256.
    env = cli_env(NARWHAL_URL=d.url)
    listed = run("artifacts", str(job_id), env=env)
    assert listed.returncode == 0 and "dist/app.whl" in listed.stdout and "3.0 MB" in listed.stdout, listed
    out = tmp_path / "fetched"
    fetched = run("artifacts", str(job_id), "-o", str(out), env=env)
    assert fetched.returncode == 0, fetched
    assert hashlib.sha256((out / "dist" / "app.whl").read_bytes()).hexdigest() == made.group(1)
    assert (out / "sub" / "deep.txt").read_text() == "inner\n"
    assert (out / "dist" / "report-link.xml").read_text() == "<r/>\n" and not (out / "dist" / "report-link.xml").is_symlink()
    one = run("artifacts", str(job_id), "report.xml", "-o", "-", env=env)
    assert one.returncode == 0 and one.stdout == "<r/>\n"
    missing = run("artifacts", str(job_id), "nope.txt", env=env)
    assert missing.returncode == 2 and "no artifact" in missing.stderr


def _hostile_image(docker_engine) -> str:
    """The test image with a /bin/sh that, when run as the collector, sends a crafted tar stream
    instead: what a hostile pipeline image could do (busybox's sh runs its own tar whatever PATH
    says). Made with `docker import`, nothing pulled."""
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("./good.txt", b"good\n"), ("/abs.txt", b"ABSOLUTE-CONTENT"),
                           ("../../up.txt", b"UP-CONTENT"), ("./a/../../b.txt", b"B-CONTENT")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        out = tarfile.TarInfo("./shadow")
        out.type, out.linkname = tarfile.LNKTYPE, "/etc/shadow"
        tar.addfile(out)
    script = (b'#!/bin/busybox sh\n[ "$3" = narwhal-artifacts ] && exec /bin/busybox cat /evil.tar\n'
              b'exec /bin/busybox sh "$@"\n')
    base = docker_engine.api.create_container(TEST_IMAGE, command=["true"])
    try:
        exported = b"".join(docker_engine.api.export(base["Id"]))
    finally:
        docker_engine.api.remove_container(base["Id"], force=True)
    root = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(exported)) as src, tarfile.open(fileobj=root, mode="w") as dst:
        for member in src:
            if member.name.lstrip("./") == "bin/sh":
                continue
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
        for name, data, mode in (("bin/sh", script, 0o755), ("evil.tar", stream.getvalue(), 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            dst.addfile(info, io.BytesIO(data))
    tag = "narwhal-test/hostile-tar:artifacts"
    docker_engine.api.import_image_from_data(root.getvalue(), repository=tag.split(":")[0], tag="artifacts")
    assert docker_engine.api.images(name=tag), "the hostile image was not built"
    return tag


def test_names_that_escape_are_refused_whatever_the_images_tar_says(dispatcher, ssh_host, git_repo, docker_engine):
    image = _hostile_image(docker_engine)
    pipeline = simple_pipeline([{"name": "build", "run": "echo good > good.txt"}], image=image,
                               artifacts={"paths": ["good.txt"]})
    d = dispatcher([ssh_host.runner_config()], {"ci": pipeline})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    job = d.wait_job(job_id)
    text = log_of(d, job_id)
    assert job["status"] == "passed", (job, text)
    assert sorted(listing(d, job_id)) == ["good.txt"]
    for name in ("/abs.txt", "../../up.txt", "./a/../../b.txt"):
        assert f"[narwhal] artifacts: refused {name}: not a path inside the workspace" in text, text
    assert "[narwhal] artifacts: refused ./shadow: a hard link that points out of the workspace" in text
    assert "CONTENT" not in text


def test_config_refuses_patterns_that_escape(dispatcher, ssh_host, tmp_path):
    from narwhal.config.pipeline import load_pipelines
    from narwhal.errors import ConfigError

    for bad in ("../secret", "/etc/passwd", "dist/../../x"):
        (tmp_path / "p").mkdir(exist_ok=True)
        (tmp_path / "p" / "ci.yaml").write_text(
            f"repo: '*'\nimage: {TEST_IMAGE}\nartifacts: {{paths: ['{bad}']}}\nsteps: [{{name: a, run: 'true'}}]\n")
        with pytest.raises(ConfigError) as info:
            load_pipelines(tmp_path / "p")
        assert "ci.yaml:3: artifacts.paths[0]" in str(info.value)


def test_quota_and_expiry_are_enforced(dispatcher, ssh_host, git_repo, tmp_path):
    steps = [{"name": "make", "run": "head -c 61440 /dev/urandom > one.bin && head -c 61440 /dev/urandom > two.bin"}]
    pipeline = simple_pipeline(steps, artifacts={"paths": ["one.bin", "two.bin"], "expire": "4s"})
    d = dispatcher([ssh_host.runner_config()], {"ci": pipeline}, settings={"artifacts_quota": "100k"})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    job = d.wait_job(job_id)
    text = log_of(d, job_id)
    assert job["status"] == "passed", (job, text)  # a collection cut short never turns a job red
    assert "the artifact store's quota (102400 bytes, 61440 used) is reached" in text, text
    files = listing(d, job_id)
    assert sorted(files) == ["one.bin"]
    url = d.url + files["one.bin"]["url"]
    assert requests.get(url, timeout=30).status_code == 200
    state = d.state_dir
    assert len(objects_of(state)) == 1
    d.wait_for(lambda: requests.get(url, timeout=30).status_code == 410, 30, "the artifact expired")
    gone = requests.get(url, timeout=30)
    assert gone.headers["Content-Type"] == "application/json" and "expired" in gone.json()["error"]
    assert listing(d, job_id)["one.bin"]["expired"] is True and listing(d, job_id)["one.bin"]["url"] is None
    # The sweep (at start, then every few minutes) removes the object; the row still says 410.
    d.stop(signal.SIGTERM, timeout=30)
    d.start()
    d.wait_for(lambda: not objects_of(state), 30, "the expired object swept")
    assert requests.get(url, timeout=30).status_code == 410
    # The quota has room again: the next job keeps a file again (and the second goes over).
    second = d.submit(git_repo.path, git_repo.add_commit({"x.txt": "x"}))[0]["id"]
    assert d.wait_job(second)["status"] == "passed"
    assert sorted(listing(d, second)) == ["one.bin"]


@pytest.mark.parametrize("when, fails, kept", [
    ("on_failure", True, True), ("on_failure", False, False), ("always", True, True), ("always", False, True),
    ("on_success", True, False),
])
def test_when(dispatcher, ssh_host, git_repo, when, fails, kept):
    run_ = "echo out > out.txt" + (" && exit 3" if fails else "")
    pipeline = simple_pipeline([{"name": "build", "run": run_}], artifacts={"paths": ["out.txt"], "when": when})
    d = dispatcher([ssh_host.runner_config()], {"ci": pipeline})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    job = d.wait_job(job_id)
    assert job["status"] == ("failed" if fails else "passed")
    assert sorted(listing(d, job_id)) == (["out.txt"] if kept else [])
    text = log_of(d, job_id)
    assert ("[narwhal] artifacts: 1 file, " in text) is kept
    if not kept:
        assert f"[narwhal] artifacts: not collected (when: {when}; the job {job['status']})" in text


def test_a_cancelled_job_keeps_nothing(dispatcher, ssh_host, git_repo):
    pipeline = simple_pipeline([{"name": "slow", "run": "echo out > out.txt; echo started; sleep 60"}],
                               artifacts={"paths": ["out.txt"], "when": "always"})
    d = dispatcher([ssh_host.runner_config()], {"ci": pipeline})
    job_id = d.submit(git_repo.path, git_repo.commit)[0]["id"]
    d.wait_for(lambda: "started" in log_of(d, job_id), 60, "the step running")
    assert d.post(f"/jobs/{job_id}/cancel").status_code == 200
    assert d.wait_job(job_id)["status"] == "cancelled"
    time.sleep(0.5)
    assert listing(d, job_id) == {}
    assert "artifacts:" not in log_of(d, job_id)
