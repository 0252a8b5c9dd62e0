"""Issue "Pipelines", matrix: one commit gives one job per combination, each with its values,
on the real dispatcher, runner and Docker."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow


def test_a_2x2_matrix_with_an_exclude_runs_three_jobs_with_their_variables(dispatcher, git_repo):
    pipeline = simple_pipeline([{"name": "show", "run": 'echo "py=$PY db=$DB url=$DATABASE_URL"'}],
                               env={"DATABASE_URL": "postgres://${DB}:5432"},
                               matrix={"PY": ["3.11", "3.12"], "DB": ["pg15", "pg16"],
                                       "exclude": [{"PY": "3.11", "DB": "pg16"}]})
    d = dispatcher([{"name": "local", "transport": "local", "capacity": 3}], {"ci": pipeline})
    jobs = d.submit(git_repo.path, git_repo.commit, "main")
    assert sorted(j["pipeline"] for j in jobs) == ["ci[PY=3.11,DB=pg15]", "ci[PY=3.12,DB=pg15]", "ci[PY=3.12,DB=pg16]"]
    for job in jobs:
        done = d.wait_job(job["id"])
        assert done["status"] == "passed", d.log()
        values = dict(part.split("=") for part in job["pipeline"][3:-1].split(","))
        log = d.get(f"/jobs/{job['id']}/log").text
        assert f"py={values['PY']} db={values['DB']} url=postgres://{values['DB']}:5432" in log
