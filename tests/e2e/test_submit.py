"""``narwhal submit`` the way people use it: from inside a checkout, more than once."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.e2e.cli import LOCAL, run, run_json
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow


def test_dot_is_the_repository_and_the_branch_is_the_checkouts(dispatcher, git_repo):
    d = dispatcher([LOCAL], {"ci": simple_pipeline(), "release": simple_pipeline(branches=["main"])})
    top = os.path.realpath(git_repo.path)
    deep = os.path.join(git_repo.path, "src", "deep")
    os.makedirs(deep)

    answer = run_json("submit", ".", "HEAD", "--url", d.url, cwd=deep)
    assert answer["commit"] == {"repo": top, "commit": git_repo.commit, "branch": "main"}
    # a pipeline with branches: runs only for a known branch, so both ran
    assert sorted(j["pipeline"] for j in answer["jobs"]) == ["ci", "release"]
    for job in answer["jobs"]:
        assert d.wait_job(job["id"])["status"] == "passed"

    again = run("submit", ".", "main", "--url", d.url, cwd=deep)
    assert again.returncode == 0 and f"{git_repo.commit[:10]} on main" in again.stdout

    jobs = run_json("jobs", "--repo", ".", "--url", d.url, cwd=deep)["jobs"]
    assert sorted(j["pipeline"] for j in jobs) == ["ci", "release"]
    assert {j["branch"] for j in jobs} == {"main"}
    report = run_json("report", "--repo", ".", "--url", d.url, cwd=deep)
    assert [r["repo"] for r in report["stats"]["repos"]] == [top] and len(report["jobs"]) == 2
    elsewhere = run_json("jobs", "--repo", ".", "--url", d.url, cwd="/")["jobs"]
    assert elsewhere == []


def test_a_resubmission_marks_old_jobs_and_answers_for_its_own(dispatcher, git_repo):
    d = dispatcher([LOCAL], {"ci": simple_pipeline([{"name": "unit", "run": "echo broken; exit 3"}])})
    first = run("submit", git_repo.path, "HEAD", "--wait", "--url", d.url)
    assert first.returncode == 1, (first.stdout, first.stderr)
    old = run_json("jobs", "--url", d.url)["jobs"][0]

    (d.config_dir / "pipelines" / "lint.yaml").write_text(yaml.safe_dump(simple_pipeline()))
    assert run("reload", "--url", d.url).returncode == 0

    second = run("submit", git_repo.path, "HEAD", "--wait", "--url", d.url)
    assert second.returncode == 0, (second.stdout, second.stderr)  # the failed ci job is not this submission's
    assert f"job {old['id']} ci" in second.stdout
    assert f"failed (submitted before; narwhal retry {old['id']} runs it again)" in second.stdout
    assert "lint" in second.stdout and "passed" in second.stdout

    answer = run_json("submit", git_repo.path, "HEAD", "--url", d.url)
    assert {j["pipeline"]: j["created"] for j in answer["jobs"]} == {"ci": False, "lint": False}

    third = run("submit", git_repo.path, "HEAD", "--wait", "--url", d.url)
    assert third.returncode == 0 and "nothing new to run" in third.stdout

