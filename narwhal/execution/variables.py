"""The variables narwhal gives every step: declared once here, with what each one holds.

A step's environment is its pipeline's ``env:``, then the step's own, then these (so a
pipeline cannot make ``NARWHAL_COMMIT`` lie). ``docs/design.md`` carries the table
``python -m narwhal.execution.variables docs/design.md`` writes from ``VARIABLES``; a test
checks it is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

from narwhal.execution.docker import WORKSPACE
from narwhal.job import Origin

SHORT_COMMIT = 8  # hex digits of NARWHAL_SHORT_COMMIT

VARIABLES: dict[str, str] = {
    "CI": "`true`",
    "NARWHAL_REPO": "the repository, in its canonical spelling",
    "NARWHAL_COMMIT": "the commit: 40 hex digits",
    "NARWHAL_SHORT_COMMIT": f"its first {SHORT_COMMIT} hex digits",
    "NARWHAL_BRANCH": "the branch (a pull request's target branch); empty when the job has none",
    "NARWHAL_TAG": "the tag of a `tag` job; else empty",
    "NARWHAL_EVENT": "what started the job: `push`, `pull_request`, `tag`, `cron`, `manual` or `api`",
    "NARWHAL_REF": "the ref the forge named (`refs/heads/main`, `refs/pull/7/head`); else empty",
    "NARWHAL_PR": "the pull request's number; else empty",
    "NARWHAL_SOURCE_REPO": "a pull request's source repository; else empty",
    "NARWHAL_JOB": "the job's id",
    "NARWHAL_JOB_URL": "the job on the dispatcher, `public_url` + `/jobs/ID`; empty without the `public_url` setting",
    "NARWHAL_PIPELINE": "the pipeline's name",
    "NARWHAL_STEP": "the step's name",
    "NARWHAL_ATTEMPT": "the job's attempt: 1, and 2... when a runner's failure made narwhal run it again",
    "NARWHAL_STEP_TRY": "the step's run within the attempt: 1, and 2... when `retry:` runs it again",
    "NARWHAL_WORKSPACE": f"the workspace, `{WORKSPACE}` (also the working directory)",
}

TABLE_BEGIN = "<!-- step variables: generated from narwhal.execution.variables.VARIABLES; do not edit -->"
TABLE_END = "<!-- end of step variables -->"


def job_variables(*, repo: str, commit: str, branch: str | None, origin: Origin, job_id: int, attempt: int,
                  pipeline: str, job_url: str | None) -> dict[str, str]:
    """Every variable but the step's own (``step_variables`` adds those)."""
    ref = origin.ref or ""
    values = {
        "CI": "true",
        "NARWHAL_REPO": repo,
        "NARWHAL_COMMIT": commit,
        "NARWHAL_SHORT_COMMIT": commit[:SHORT_COMMIT],
        "NARWHAL_BRANCH": branch or "",
        "NARWHAL_TAG": ref[len("refs/tags/"):] if origin.event == "tag" and ref.startswith("refs/tags/") else "",
        "NARWHAL_EVENT": origin.event,
        "NARWHAL_REF": ref,
        "NARWHAL_PR": str(origin.pr) if origin.pr is not None else "",
        "NARWHAL_SOURCE_REPO": origin.source_repo or "",
        "NARWHAL_JOB": str(int(job_id)),
        "NARWHAL_JOB_URL": job_url or "",
        "NARWHAL_PIPELINE": pipeline,
        "NARWHAL_ATTEMPT": str(int(attempt)),
        "NARWHAL_WORKSPACE": WORKSPACE,
    }
    return values


def step_variables(job: dict[str, str], step: str, run: int) -> dict[str, str]:
    """The job's variables plus the step's name and its run (1-based, counting retries)."""
    return {**job, "NARWHAL_STEP": step, "NARWHAL_STEP_TRY": str(int(run))}


def variables_table() -> str:
    """The Markdown table of ``VARIABLES``, between its markers."""
    rows = [TABLE_BEGIN, "| variable | value |", "|---|---|"]
    rows += [f"| `{name}` | {meaning} |" for name, meaning in VARIABLES.items()]
    rows.append(TABLE_END)
    return "\n".join(rows)


def _rewrite(path: Path) -> None:
    text = path.read_text()
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    path.write_text(text[:start] + variables_table() + text[end:])


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["docs/design.md"]:
        _rewrite(Path(arg))
