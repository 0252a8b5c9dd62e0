"""execution.plan: which steps start, which are skipped and why (pure)."""

from __future__ import annotations

from narwhal.config.conditions import StepWhen
from narwhal.config.pipeline import Pipeline
from narwhal.execution.plan import Facts, Plan, PlanStep, plan_steps
from narwhal.job import StepStatus


def names(steps) -> list[str]:
    return [s.name if isinstance(s, PlanStep) else (s[0].name, s[1]) for s in steps]


def test_a_pipeline_without_depends_on_is_a_chain():
    p = Pipeline.model_validate({"name": "p", "repo": "*", "image": "i", "steps": [
        {"name": "a", "run": "x"}, {"name": "b", "run": "y"}, {"name": "c", "run": "z"}]})
    assert [s.deps for s in plan_steps(p)] == [(), (0,), (1,)]
    plan = Plan(plan_steps(p), Facts())
    assert names(plan.advance(5)[0]) == ["a"]
    assert plan.advance(5) == ([], [])  # b waits for a
    plan.finish(0, StepStatus.PASSED)
    assert names(plan.advance(5)[0]) == ["b"]


def test_free_slots_bound_what_starts_in_pipeline_order():
    plan = Plan([PlanStep(i, n, ()) for i, n in enumerate("abcd")], Facts())
    assert names(plan.advance(2)[0]) == ["a", "b"]
    assert names(plan.advance(0)[0]) == []
    plan.finish(1, StepStatus.PASSED)
    assert names(plan.advance(1)[0]) == ["c"]


def test_a_skip_lets_its_dependents_be_decided_at_once():
    main_only = StepWhen(branch=["main"])
    steps = [PlanStep(0, "deploy", (), main_only), PlanStep(1, "notify", (0,)), PlanStep(2, "after", (1,))]
    plan = Plan(steps, Facts(branch="dev"))
    start, skipped = plan.advance(1)
    assert names(start) == ["notify"] and names(skipped) == [("deploy", "branch dev is not in when.branch [main]")]


def test_a_failure_skips_what_follows_unless_it_runs_on_failure():
    steps = [PlanStep(0, "a", ()), PlanStep(1, "b", (0,)), PlanStep(2, "report", (1,), StepWhen(status=["failure"]))]
    plan = Plan(steps, Facts())
    plan.advance(1)
    plan.finish(0, StepStatus.FAILED, "exit 1 in step a")
    start, skipped = plan.advance(1)
    assert names(start) == ["report"] and names(skipped) == [("b", "not run after a failure (exit 1 in step a)")]
    assert plan.failure == "exit 1 in step a"


def test_an_allowed_failure_is_no_failure():
    plan = Plan([PlanStep(0, "a", ()), PlanStep(1, "b", (0,))], Facts())
    plan.advance(1)
    plan.finish(0, StepStatus.FAILED_ALLOWED, "exit 1 in step a")
    assert names(plan.advance(1)[0]) == ["b"] and plan.failure is None


def test_the_first_failure_is_kept():
    plan = Plan([PlanStep(0, "a", ())], Facts())
    plan.fail("service db exited with 1 during the job")
    plan.finish(0, StepStatus.FAILED, "stopped")
    assert plan.failure == "service db exited with 1 during the job"


def test_end_skips_what_is_left():
    plan = Plan([PlanStep(0, "a", ()), PlanStep(1, "b", (0,))], Facts())
    plan.advance(1)
    assert names(plan.end()) == ["a", "b"]
    assert set(plan.status.values()) == {StepStatus.SKIPPED}
