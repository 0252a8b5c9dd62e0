"""runner.py for issue 13 against the scripted fake Docker: step graph, parallel steps and the
one checkout, conditions, allow_failure, retry, variables, services (the real path: tests/e2e)."""

from __future__ import annotations

import asyncio

import pytest

from narwhal.config.pipeline import Pipeline, Service
from narwhal.execution import docker
from narwhal.execution.runner import Outcome
from narwhal.job import JobStatus, Origin, StepStatus
from tests.test_runner_unit import COMMIT, IMAGE, FakeDocker, _labels, assert_clean, run


def pipe(*steps: dict, **extra) -> Pipeline:
    return Pipeline.model_validate({"name": "p", "repo": ["*"], "image": IMAGE, "steps": list(steps), **extra})


def step(name: str, run: str = "true", **extra) -> dict:
    return {"name": name, "run": run, **extra}


def container(idx: int | str) -> str:
    return f"narwhal-ownera-7-2-{idx}"


def argv_of(fake: FakeDocker, name: str) -> list[str]:
    return next(argv for argv in fake.commands if "--name" in argv and argv[argv.index("--name") + 1] == name)


def env_of(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--env")


def finished(sink) -> dict[str, StepStatus]:
    return {e[2]: e[3] for e in sink.events if e[0] == "finished"}


def overlap(fake: FakeDocker, a: str, b: str) -> bool:
    (a0, a1), (b0, b1) = fake.times[a], fake.times[b]
    return a0 < b1 and b0 < a1


# --- the graph --------------------------------------------------------------------------


def test_independent_steps_run_side_by_side_and_the_last_waits_for_both():
    fake = FakeDocker({"0": (["lint"], 0, 0.2), "1": (["test"], 0, 0.2), "2": (["report"], 0)})
    p = pipe(step("lint", depends_on=[]), step("test", depends_on=[]), step("report", depends_on=["lint", "test"]))
    outcome, sink = run(fake, p, parallel=2)
    assert outcome == Outcome(JobStatus.PASSED, None)
    assert overlap(fake, container(0), container(1))
    assert fake.times[container(2)][0] >= max(fake.times[container(0)][1], fake.times[container(1)][1])
    assert set(finished(sink).values()) == {StepStatus.PASSED}
    assert_clean(fake)


def test_parallel_1_runs_a_graph_one_step_at_a_time():
    fake = FakeDocker({"0": ([], 0, 0.1), "1": ([], 0, 0.1)})
    outcome, _ = run(fake, pipe(step("a", depends_on=[]), step("b", depends_on=[])), parallel=1)
    assert outcome.status is JobStatus.PASSED
    assert not overlap(fake, container(0), container(1))


def test_only_the_first_step_unpacks_the_source():
    fake = FakeDocker({"0": ([], 0, 0.1), "1": ([], 0, 0.1)})
    run(fake, pipe(step("a", depends_on=[]), step("b", depends_on=[])), parallel=2)
    first, second = argv_of(fake, container(0)), argv_of(fake, container(1))
    assert any(docker.CHECKOUT in a for a in first) and "-i" in first
    assert not any(docker.CHECKOUT in a for a in second) and "-i" not in second
    assert fake.stdin == b"tar-bytes-1tar-bytes-2"  # one archive, once


def test_the_checkout_token_line_is_not_logged():
    fake = FakeDocker({"0": (["hello"], 0)})
    _, sink = run(fake, pipe(step("a")))
    token = argv_of(fake, container(0))[-1]
    assert sink.user_lines() == ["hello"] and token not in sink.lines


def test_a_first_step_ending_before_the_source_is_in_fails_the_job_whatever_allow_failure_says():
    fake = FakeDocker({"0": "no-checkout", "1": ([], 0)})
    p = pipe(step("a", depends_on=[], allow_failure=True), step("b", depends_on=[]))
    outcome, sink = run(fake, p, parallel=2)
    assert outcome == Outcome(JobStatus.FAILED, "exit 137 in step a (before the source checkout finished)")
    assert finished(sink) == {"a": StepStatus.FAILED, "b": StepStatus.SKIPPED}
    assert sink.reasons[1] == "not run: the source checkout did not finish"
    assert container(1) not in [a[a.index("--name") + 1] for a in fake.commands if "--name" in a]


def test_graph_lines_say_which_step_wrote_them():
    fake = FakeDocker({"0": (["one"], 0), "1": (["two"], 0)})
    _, sink = run(fake, pipe(step("lint", depends_on=[]), step("unit tests", depends_on=["lint"])))
    assert sink.user_lines() == ["lint | one", "unit tests | two"]
    # a pipeline without depends_on keeps its lines as they were
    _, plain = run(FakeDocker({"0": (["one"], 0)}), pipe(step("lint")))
    assert plain.user_lines() == ["one"]


def test_a_failure_skips_what_has_not_started_and_the_running_step_finishes():
    fake = FakeDocker({"0": (["boom"], 1), "1": (["slow"], 0, 0.2), "2": ([], 0)})
    p = pipe(step("a", depends_on=[]), step("b", depends_on=[]), step("c", depends_on=["a"]))
    outcome, sink = run(fake, p, parallel=2)
    assert outcome == Outcome(JobStatus.FAILED, "exit 1 in step a")
    assert finished(sink) == {"a": StepStatus.FAILED, "b": StepStatus.PASSED, "c": StepStatus.SKIPPED}
    assert sink.reasons[2] == "not run after a failure (exit 1 in step a)"


def test_an_error_in_one_step_stops_the_others():
    fake = FakeDocker({"0": "hang", "1": (["docker: Error response from daemon: pull access denied"], 125, 0.05)})
    p = pipe(step("a", depends_on=[]), step("b", depends_on=[], image="missing/image:1"))
    outcome, sink = run(fake, p, parallel=2)
    assert outcome == Outcome(JobStatus.ERROR, "image not found: missing/image:1")
    assert finished(sink) == {"a": StepStatus.CANCELLED, "b": StepStatus.ERROR}
    assert sink.reasons[0] == "stopped: another step's error ended the job"
    assert_clean(fake)


def test_cancel_stops_every_running_step():
    async def cancel_when_both_run(fake, event):
        while not {container(0), container(1)} <= set(fake.stopped):
            await asyncio.sleep(0.01)
        event.set()

    fake = FakeDocker({"0": "hang", "1": "hang"})
    p = pipe(step("a", depends_on=[]), step("b", depends_on=[]), step("c", depends_on=["a", "b"]))
    outcome, sink = run(fake, p, parallel=2, during=cancel_when_both_run)
    assert outcome == Outcome(JobStatus.CANCELLED, "cancelled")
    assert finished(sink) == {"a": StepStatus.CANCELLED, "b": StepStatus.CANCELLED, "c": StepStatus.SKIPPED}
    assert sink.reasons[2] == "not run: the job was cancelled"
    assert_clean(fake)


# --- conditions ----------------------------------------------------------------------------


def test_a_status_failure_step_runs_only_after_a_failure():
    ok = pipe(step("test"), step("report", when={"status": ["failure"]}))
    outcome, sink = run(FakeDocker(), ok)
    assert outcome.status is JobStatus.PASSED
    assert finished(sink) == {"test": StepStatus.PASSED, "report": StepStatus.SKIPPED}
    assert sink.reasons[1] == "nothing failed (when.status [failure])"
    assert "step report skipped: nothing failed (when.status [failure])" in sink.notes()

    outcome, sink = run(FakeDocker({"0": ([], 2), "1": (["collected"], 0)}), ok)
    assert outcome == Outcome(JobStatus.FAILED, "exit 2 in step test")  # the report does not mend it
    assert finished(sink) == {"test": StepStatus.FAILED, "report": StepStatus.PASSED}


def test_always_steps_and_the_steps_between():
    p = pipe(step("a"), step("b"), step("cleanup", when={"status": ["success", "failure"]}))
    outcome, sink = run(FakeDocker({"0": ([], 1)}), p)
    assert outcome.status is JobStatus.FAILED
    assert finished(sink) == {"a": StepStatus.FAILED, "b": StepStatus.SKIPPED, "cleanup": StepStatus.PASSED}


def test_branch_event_and_paths_conditions():
    p = pipe(step("always"), step("deploy", when={"branch": "main", "event": ["push"]}),
             step("docs", when={"paths": ["docs/**"]}), step("last"))
    outcome, sink = run(FakeDocker(), p, branch="dev", origin=Origin(event="push"), changed=("src/x.py",))
    assert outcome.status is JobStatus.PASSED
    assert finished(sink) == {"always": StepStatus.PASSED, "deploy": StepStatus.SKIPPED,
                              "docs": StepStatus.SKIPPED, "last": StepStatus.PASSED}
    assert sink.reasons[1] == "branch dev is not in when.branch [main]"
    assert sink.reasons[2] == "no changed file matches when.paths [docs/**] (1 file changed)"
    _, sink = run(FakeDocker(), p, branch="main", origin=Origin(event="push"), changed=("docs/a.md",))
    assert set(finished(sink).values()) == {StepStatus.PASSED}


def test_a_skipped_first_step_leaves_the_checkout_to_the_next():
    fake = FakeDocker()
    p = pipe(step("deploy", when={"branch": "main"}), step("test"))
    outcome, _ = run(fake, p, branch="dev")
    assert outcome.status is JobStatus.PASSED
    assert any(docker.CHECKOUT in a for a in argv_of(fake, container(1)))


# --- failure policy --------------------------------------------------------------------------


def test_allow_failure_leaves_the_job_passed():
    fake = FakeDocker({"0": (["flaky lint"], 1)})
    outcome, sink = run(fake, pipe(step("lint", allow_failure=True), step("test")))
    assert outcome == Outcome(JobStatus.PASSED, None)
    assert finished(sink) == {"lint": StepStatus.FAILED_ALLOWED, "test": StepStatus.PASSED}
    assert sink.reasons[0] == "exit 1 in step lint"
    assert "step lint: failure allowed (exit 1 in step lint)" in sink.notes()


def test_retry_runs_a_failing_step_again_in_a_new_container():
    fake = FakeDocker({"0": (["first try"], 1), "0-retry2": (["second try"], 0)})
    outcome, sink = run(fake, pipe(step("flaky", retry=2), step("next")))
    assert outcome == Outcome(JobStatus.PASSED, None)
    assert finished(sink) == {"flaky": StepStatus.PASSED, "next": StepStatus.PASSED}
    assert "step flaky: retrying after exit 1 (run 2 of 3)" in sink.notes()
    first, second = argv_of(fake, container(0)), argv_of(fake, container("0-retry2"))
    assert env_of(first)["NARWHAL_STEP_TRY"] == "1" and env_of(second)["NARWHAL_STEP_TRY"] == "2"
    assert any(docker.CHECKOUT in a for a in first) and not any(docker.CHECKOUT in a for a in second)
    assert [e for e in sink.events if e[2] == "flaky"] == [("started", 0, "flaky"),
                                                           ("finished", 0, "flaky", StepStatus.PASSED, 0)]


def test_retry_gives_up_after_its_runs():
    fake = FakeDocker({"0": ([], 1), "0-retry2": ([], 3), "0-retry3": ([], 0)})
    outcome, _ = run(fake, pipe(step("flaky", retry=1)))
    assert outcome == Outcome(JobStatus.FAILED, "exit 3 in step flaky")


def test_retry_is_not_for_timeouts():
    fake = FakeDocker({"0": "hang"})
    outcome, _ = run(fake, pipe(step("slow", retry=2, timeout=0.05)))
    assert outcome == Outcome(JobStatus.FAILED, "timeout in step slow")
    assert not [a for a in fake.commands if container("0-retry2") in a]


def test_a_step_timeout_with_allow_failure_lets_the_job_go_on():
    fake = FakeDocker({"0": "hang"})
    outcome, sink = run(fake, pipe(step("slow", allow_failure=True, timeout=0.05), step("next")))
    assert outcome.status is JobStatus.PASSED
    assert finished(sink) == {"slow": StepStatus.FAILED_ALLOWED, "next": StepStatus.PASSED}


# --- variables --------------------------------------------------------------------------------


def test_every_narwhal_variable_reaches_the_step():
    fake = FakeDocker()
    origin = Origin(event="tag", ref="refs/tags/v1.2", source_repo=None)
    run(fake, pipe(step("build", env={"NARWHAL_COMMIT": "lie", "OWN": "x"})), origin=origin, branch=None,
        job_url="https://ci.example.com/jobs/7", repo="https://git.example.com/app.git")
    env = env_of(argv_of(fake, container(0)))
    assert env["OWN"] == "x" and env["CI"] == "true"
    assert {k: v for k, v in env.items() if k.startswith("NARWHAL_")} == {
        "NARWHAL_REPO": "https://git.example.com/app.git", "NARWHAL_COMMIT": COMMIT,
        "NARWHAL_SHORT_COMMIT": COMMIT[:8], "NARWHAL_BRANCH": "", "NARWHAL_TAG": "v1.2",
        "NARWHAL_EVENT": "tag", "NARWHAL_REF": "refs/tags/v1.2", "NARWHAL_PR": "", "NARWHAL_SOURCE_REPO": "",
        "NARWHAL_JOB": "7", "NARWHAL_JOB_URL": "https://ci.example.com/jobs/7", "NARWHAL_PIPELINE": "p",
        "NARWHAL_STEP": "build", "NARWHAL_ATTEMPT": "2", "NARWHAL_STEP_TRY": "1",
        "NARWHAL_WORKSPACE": "/workspace"}


# --- services ---------------------------------------------------------------------------------

DB = {"name": "db", "image": "narwhal-test/busybox:latest", "command": "nc -ll -p 5432 -e /bin/echo pong",
      "ready": {"port": 5432}}


def test_services_run_on_the_jobs_own_network_and_go_with_it():
    fake = FakeDocker()
    fake.ready[docker.service_container_name("owner-a", 7, 2, "db")] = 2  # ready on the third check
    outcome, sink = run(fake, pipe(step("test"), services=[DB]))
    assert outcome == Outcome(JobStatus.PASSED, None)
    net = "narwhal-ownera-7-2"
    assert fake.ran("network", "create", "--driver", "bridge", "--internal")  # runner network none: no egress
    service = argv_of(fake, container("svc-db"))
    assert service[service.index("--network") + 1] == net and service[service.index("--network-alias") + 1] == "db"
    assert _labels(service)["narwhal.service"] == "db" and _labels(service)["narwhal.job"] == "7"
    assert service[-3:] == ["/bin/sh", "-c", DB["command"]]
    test = argv_of(fake, container(0))
    assert test[test.index("--network") + 1] == net
    assert len(fake.ran("exec")) == 3
    assert any(note.startswith("service db: ready (") for note in sink.notes())
    assert_clean(fake)  # containers, network and volume


def test_a_runner_that_allows_egress_gets_a_job_network_with_egress():
    fake = FakeDocker()
    run(fake, pipe(step("test"), services=[DB]), network="bridge")
    (create,) = fake.ran("network", "create")
    assert "--internal" not in create


def test_steps_keep_the_runners_network_without_services():
    fake = FakeDocker()
    run(fake, pipe(step("test")), network="bridge")
    test = argv_of(fake, container(0))
    assert test[test.index("--network") + 1] == "bridge"
    assert not fake.ran("network", "create")


def test_a_service_that_dies_mid_job_fails_the_job_naming_it():
    async def stop_the_service(fake, event):
        while container(0) not in fake.stopped:  # the step runs
            await asyncio.sleep(0.01)
        svc = container("svc-db")
        fake.containers.pop(svc)
        fake.stopped[svc].set()  # `docker stop` from outside

    fake = FakeDocker({"0": "hang", "svc-db": "hang"})
    p = pipe(step("test"), step("report", when={"status": ["failure"]}), services=[{**DB, "ready": None}])
    outcome, sink = run(fake, p, during=stop_the_service)
    assert outcome == Outcome(JobStatus.FAILED, "service db exited with 137 during the job")
    assert finished(sink) == {"test": StepStatus.FAILED, "report": StepStatus.PASSED}
    assert sink.reasons[0] == "stopped: service db exited with 137 during the job"
    assert "service db exited with 137 during the job" in sink.notes()
    assert "db | started" in sink.user_lines()  # its last words, as its own lines
    assert_clean(fake)


def test_a_service_that_never_gets_ready_fails_the_job_and_runs_no_step():
    fake = FakeDocker()
    fake.ready[docker.service_container_name("owner-a", 7, 2, "db")] = 10**6
    p = pipe(step("test"), services=[{**DB, "ready": {"command": "pg_isready", "timeout": 0.3}}])
    outcome, sink = run(fake, p)
    assert outcome == Outcome(JobStatus.FAILED, "service db not ready after 0.3s")
    assert finished(sink) == {"test": StepStatus.SKIPPED}
    assert not [a for a in fake.commands if container(0) in a]
    assert fake.ran("exec", "--", container("svc-db"), "/bin/sh", "-c", "pg_isready")
    assert_clean(fake)


def test_a_service_that_exits_at_once():
    fake = FakeDocker({"svc-db": (["bad config"], 2)})
    outcome, sink = run(fake, pipe(step("test"), services=[DB]))
    assert outcome == Outcome(JobStatus.FAILED, "service db exited with 2 before it was ready")
    assert "db | bad config" in sink.user_lines()
    assert_clean(fake)


def test_a_service_image_that_is_missing_is_an_error():
    fake = FakeDocker({"svc-db": (["Unable to find image 'x' locally", "docker: pull access denied"], 125)})
    outcome, _ = run(fake, pipe(step("test"), services=[DB]))
    assert outcome == Outcome(JobStatus.ERROR, f"image not found: {DB['image']} (service db)")
    assert_clean(fake)


def test_reap_removes_networks_too():
    from narwhal.execution.runner import reap

    fake = FakeDocker()
    own = {"narwhal": "1", "narwhal.owner": "me", "narwhal.attempt": "1"}
    fake.networks = {"narwhal-1-1": {**own, "narwhal.job": "1"}, "narwhal-2-1": {**own, "narwhal.job": "2"}}
    assert asyncio.run(reap(fake, "me", {(2, 1)})) == ["narwhal-1-1"]
    assert set(fake.networks) == {"narwhal-2-1"}


@pytest.mark.parametrize("bad", [{"name": "DB"}, {"image": "--privileged"}, {"env": {"A B": "x"}},
                                 {"command": ["a", 1]}])
def test_an_invalid_service_runs_nothing(bad):
    """The model refuses these; a pipeline built around it must not get them to Docker either."""
    fake = FakeDocker()
    p = pipe(step("test"))
    p.services = [Service.model_construct(**{**DB, "ready": None, "env": {}, **bad})]
    outcome, _ = run(fake, p)
    assert outcome.status is JobStatus.ERROR and outcome.reason.startswith("invalid job:")
    assert fake.commands == []


def test_a_lost_runner_during_a_job_with_services_raises_and_leaves_cleanup_to_reap():
    from narwhal.errors import RunnerUnreachable

    fake = FakeDocker({"0": "lost"})
    with pytest.raises(RunnerUnreachable):
        run(fake, pipe(step("test"), services=[{**DB, "ready": None}]))
    assert fake.networks and fake.volumes  # reap() removes them once the runner is back
