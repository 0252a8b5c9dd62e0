"""execution.variables: one declaration of the NARWHAL_* set, what steps get, and the docs' table."""

from __future__ import annotations

from pathlib import Path

from narwhal.execution import variables
from narwhal.job import Origin

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def job(**origin) -> dict[str, str]:
    return variables.job_variables(repo="https://git.example.com/app.git", commit=COMMIT, branch="main",
                                   origin=Origin(**origin), job_id=12, attempt=2, pipeline="ci",
                                   job_url="https://ci.example.com/jobs/12")


def test_every_declared_variable_is_set_and_no_other():
    values = variables.step_variables(job(), "build", 3)
    assert set(values) == set(variables.VARIABLES)
    assert values["NARWHAL_STEP"] == "build" and values["NARWHAL_STEP_TRY"] == "3"
    assert values["NARWHAL_SHORT_COMMIT"] == "01234567" and values["NARWHAL_ATTEMPT"] == "2"


def test_tag_ref_and_pull_request():
    assert job(event="tag", ref="refs/tags/v2.0")["NARWHAL_TAG"] == "v2.0"
    assert job(event="push", ref="refs/heads/main")["NARWHAL_TAG"] == ""
    pr = job(event="pull_request", ref="refs/pull/7/head", pr=7, source_repo="https://git.example.com/fork.git")
    assert (pr["NARWHAL_PR"], pr["NARWHAL_REF"], pr["NARWHAL_SOURCE_REPO"]) == (
        "7", "refs/pull/7/head", "https://git.example.com/fork.git")
    no_url = variables.job_variables(repo="r", commit=COMMIT, branch=None, origin=Origin(), job_id=1, attempt=1,
                                     pipeline="p", job_url=None)
    assert no_url["NARWHAL_JOB_URL"] == "" and no_url["NARWHAL_BRANCH"] == ""


def test_design_md_table_is_generated_from_variables():
    text = (ROOT / "docs" / "design.md").read_text()
    start = text.index(variables.TABLE_BEGIN)
    end = text.index(variables.TABLE_END) + len(variables.TABLE_END)
    assert text[start:end] == variables.variables_table(), "run: python -m narwhal.execution.variables"
