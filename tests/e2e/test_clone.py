"""clone: on the real path: `narwhal serve`, an sshd runner host, dockerd, images made by `docker import`.

`clone: {git: true}` gives the step a real .git made on the dispatcher (the step has no
network: `--network none`, so it could not have fetched anything): `git describe` and
`git log -1` report the submitted commit. `submodules: true` ships a submodule, fetched by
the dispatcher from a git server on loopback, at the commit the superproject records;
hostile `.gitmodules` entries are refused with a note and never fetched. Without
`clone:` the workspace is `git archive` as before.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from narwhal.cli.gitrepo import GIT_ENV, add_commit
from testbed import GitHttpServer, make_git_repo
from testbed.images import ensure_git_image
from tests.conftest import require
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow
ENV = {**os.environ, **GIT_ENV}


@pytest.fixture(scope="module")
def git_image(docker_engine) -> str:
    return require(ensure_git_image)


def git(path: str | Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], env=ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


def log_of(d, job_id: int) -> str:
    return d.get(f"/jobs/{job_id}/log").text


def run_one(d, repo: str, commit: str) -> tuple[dict, str]:
    [job] = d.submit(repo, commit, "main")
    done = d.wait_job(job["id"])
    return done, log_of(d, job["id"])


def test_clone_git_describe_and_log_report_the_submitted_commit(dispatcher, ssh_host, git_image, tmp_path):
    repo, _ = make_git_repo(str(tmp_path / "app"), {"README.md": "# app\n", "version.txt": "$Format:%H$\n"})
    Path(repo, ".gitattributes").write_text("version.txt export-subst\nci-only.txt export-ignore\n")
    Path(repo, "ci-only.txt").write_text("kept out of git archive\n")
    tagged = add_commit(repo, {"a.txt": "1\n"})
    git(repo, "tag", "-a", "v1.0", "-m", "release 1.0")
    head = add_commit(repo, {"a.txt": "2\n"})
    steps = [{"name": "version", "run": "\n".join([
        "echo describe=$(git describe --tags)",
        "echo head=$(git log -1 --format=%H)",
        "echo status=[$(git status --porcelain)]",
        "echo dirty=$(git describe --tags --dirty)",
        "echo origin=$(git config remote.origin.url)",
        "echo subst=$(cat version.txt)",
        "test -f ci-only.txt && echo ci-only=present",
        "git rev-parse --abbrev-ref HEAD",
    ])}]
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps, image=git_image, clone={"git": True})})
    job, text = run_one(d, repo, head)
    assert job["status"] == "passed", text
    assert f"describe=v1.0-1-g{head[:7]}" in text
    assert f"head={head}" in text
    assert "status=[]" in text and f"dirty=v1.0-1-g{head[:7]}\n" in text  # a clean checkout
    assert f"origin={repo}" in text
    assert "subst=$Format:%H$" in text and "ci-only=present" in text  # a checkout, not git archive
    assert "HEAD\n" in text  # detached
    assert "[narwhal] workspace with clone: ready, " in text
    job, text = run_one(d, repo, tagged)
    assert job["status"] == "passed", text
    assert "describe=v1.0\n" in text and f"head={tagged}" in text


def test_without_clone_the_workspace_is_git_archive_as_before(dispatcher, ssh_host, git_repo):
    steps = [{"name": "look", "run": "ls -a; test ! -e .git && echo no-git-dir"}]
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps)})
    job, text = run_one(d, git_repo.path, git_repo.commit)
    assert job["status"] == "passed", text
    assert "no-git-dir" in text and "README.md" in text
    assert "workspace with clone" not in text and "GIT_CONFIG" not in text


def test_a_later_step_of_another_owner_still_reads_the_repository(dispatcher, ssh_host, git_image, git_repo):
    # The workspace handed to a step whose user does not own it: safe.directory is set for
    # /workspace in the command scope (GIT_CONFIG_*), so git does not refuse it as dubious.
    steps = [{"name": "chown", "run": "chown -R 1234:1234 /workspace"},
             {"name": "read", "run": "echo head=$(git log -1 --format=%H)"}]
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps, image=git_image, clone={"git": True})})
    job, text = run_one(d, git_repo.path, git_repo.commit)
    assert job["status"] == "passed", text
    assert f"head={git_repo.commit}" in text and "dubious ownership" not in text


@pytest.fixture
def served(tmp_path):
    server = GitHttpServer(tmp_path / "served").start()
    yield server
    server.stop()


def publish(server: GitHttpServer, source: str, name: str) -> str:
    target = server.root / name
    if target.exists():
        subprocess.run(["git", "-C", str(target), "fetch", "-q", source, "+refs/heads/*:refs/heads/*"],
                       env=ENV, check=True)
    else:
        subprocess.run(["git", "clone", "-q", "--bare", source, str(target)], env=ENV, check=True)
    subprocess.run(["git", "-C", str(target), "update-server-info"], env=ENV, check=True)
    return server.url_for(name)


def test_submodules_ship_at_the_recorded_commit_and_hostile_ones_are_refused(dispatcher, ssh_host, git_image,
                                                                            served, tmp_path):
    lib, first = make_git_repo(str(tmp_path / "lib"), {"lib.txt": "lib at the recorded commit\n"})
    add_commit(lib, {"lib.txt": "lib moved on\n"})
    publish(served, lib, "org/lib.git")
    app, _ = make_git_repo(str(tmp_path / "app"), {"README.md": "# app\n"})
    Path(app, ".gitmodules").write_text("\n".join([
        '[submodule "lib"]', "\tpath = vendor/lib", "\turl = ../lib.git",
        '[submodule "etc"]', "\tpath = vendor/etc", "\turl = file:///etc",
        '[submodule "escape"]', "\tpath = ../../x", "\turl = ../lib.git",
        '[submodule "option"]', "\tpath = vendor/opt", "\turl = -uhack", ""]))
    git(app, "add", ".gitmodules")
    for path in ("vendor/lib", "vendor/etc", "vendor/opt"):
        git(app, "update-index", "--add", "--cacheinfo", f"160000,{first},{path}")
    git(app, "commit", "-q", "-m", "submodules")
    commit = git(app, "rev-parse", "HEAD")
    url = publish(served, app, "org/app.git")
    files = {"name": "files", "run": "cat vendor/lib/lib.txt; ls -A vendor/etc vendor/opt | wc -l"}
    with_git = {"name": "history", "run": "echo lib-head=$(git -C vendor/lib log -1 --format=%H); "
                                          "echo super=[$(git status --porcelain)]"}
    d = dispatcher([ssh_host.runner_config()], {
        "plain": simple_pipeline([files], repo=f"{served.url}/**", clone={"submodules": True}),
        "full": simple_pipeline([files, with_git], repo=f"{served.url}/**", image=git_image,
                                clone={"git": True, "submodules": True})})
    served.seen.clear()
    jobs = d.submit(url, commit, "main")
    assert len(jobs) == 2
    for job in jobs:
        done = d.wait_job(job["id"])
        text = log_of(d, job["id"])
        assert done["status"] == "passed", text
        assert "lib at the recorded commit" in text and "lib moved on" not in text
        assert "submodule 'etc' not shipped: url is a path on the dispatcher" in text
        assert "submodule 'escape' not shipped: path '../../x'" in text
        assert "submodule 'option' not shipped: url starts with '-'" in text
        assert "submodule 'lib' at vendor/lib" in text
        if job["pipeline"] == "full":
            assert f"lib-head={first}" in text and "super=[]" in text
    # The dispatcher fetched the superproject and the one allowed submodule, nothing else.
    assert {p.split("/")[2] for p in served.seen if p.startswith("/org/")} == {"app.git", "lib.git"}
    assert not (tmp_path.parent / "x").exists()


def test_a_workspace_over_clone_max_bytes_errs_the_job_with_the_reason(dispatcher, ssh_host, git_image, git_repo):
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(image=git_image, clone={"git": True})},
                   settings={"clone_max_bytes": 4096})
    job, text = run_one(d, git_repo.path, git_repo.commit)
    assert job["status"] == "error", text
    assert "larger than clone_max_bytes" in job["reason"]



def test_a_job_cancelled_while_its_workspace_is_prepared_ends_at_once(dispatcher, ssh_host, git_image, tmp_path):
    # The submodule's git server holds every request: the preparation waits on it, and a
    # cancel ends the job without waiting for the fetch.
    from testbed import PrivateGitServer

    lib, first = make_git_repo(str(tmp_path / "lib"), {"lib.txt": "lib\n"})
    app, _ = make_git_repo(str(tmp_path / "app"), {"README.md": "# app\n"})
    Path(app, ".gitmodules").write_text('[submodule "lib"]\n\tpath = vendor/lib\n\turl = ../lib.git\n')
    git(app, "add", ".gitmodules")
    git(app, "update-index", "--add", "--cacheinfo", f"160000,{first},vendor/lib")
    git(app, "commit", "-q", "-m", "submodule")
    commit = git(app, "rev-parse", "HEAD")
    root = tmp_path / "served"
    for name, source in (("app.git", app), ("lib.git", lib)):
        subprocess.run(["git", "clone", "-q", "--bare", source, str(root / "team" / name)], env=ENV, check=True)
    server = PrivateGitServer(str(root), None).start()
    try:
        d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(
            repo=f"{server.url}/**", image=git_image, clone={"git": True, "submodules": True})})
        [job] = d.submit(server.repo_url("team/app.git"), commit, "main")  # the superproject's fetch
        server.hold()
        assert server.holding.wait(60), "the submodule's fetch never reached the server"
        assert d.post(f"/jobs/{job['id']}/cancel").status_code == 200
        done = d.wait_job(job["id"], timeout=30)
        assert done["status"] == "cancelled", done
    finally:
        server.release()
        server.stop()
