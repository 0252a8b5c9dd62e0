"""config.graph: chains, unknown names, cycles and width; a pipeline's graph errors at file:line."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from narwhal.config import graph
from narwhal.config.pipeline import Pipeline, parse_pipeline
from narwhal.config.yamlfile import parse_yaml
from narwhal.errors import ConfigError


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_pipeline(parse_yaml(text, "pipelines/p.yaml"))
    return [str(p) for p in info.value.problems]


HEAD = 'repo: "*"\nimage: busybox\nsteps:\n'


# --- the algorithms ---------------------------------------------------------------------


def test_a_chain_waits_for_the_step_before():
    assert graph.chain(["a", "b", "c"]) == {"a": [], "b": ["a"], "c": ["b"]}
    assert graph.width(graph.chain(["a", "b", "c"])) == 1


def test_unknown_names_are_listed_with_their_place():
    assert graph.unknown({"a": [], "b": ["a", "x"], "c": ["y"]}) == [("b", 1, "x"), ("c", 0, "y")]


@pytest.mark.parametrize("deps, cycle", [
    ({"a": [], "b": ["a"]}, None),
    ({"a": ["a"]}, ["a", "a"]),
    ({"a": ["b"], "b": ["a"]}, ["a", "b", "a"]),
    ({"a": ["c"], "b": ["a"], "c": ["b"]}, ["a", "c", "b", "a"]),
    ({"x": [], "a": ["x", "b"], "b": ["c"], "c": ["a"]}, ["a", "b", "c", "a"]),
    ({"a": ["missing"]}, None),
])
def test_find_cycle(deps, cycle):
    assert graph.find_cycle(deps) == cycle


@pytest.mark.parametrize("deps, width", [
    ({"a": []}, 1),
    ({"a": [], "b": [], "c": []}, 3),
    ({"lint": [], "test": [], "report": ["lint", "test"]}, 2),
    ({"build": [], "t1": ["build"], "t2": ["build"], "t3": ["build"], "pub": ["t1", "t2", "t3"]}, 3),
    # a diamond beside a chain: {b, c} or {b, e}... at most 3 ({b, c, x})
    ({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "x": [], "y": ["x"]}, 3),
    # a zigzag where a greedy count would say 3: a1->b1, a2->b1, a2->b2; max antichain {a1, a2} or {b1, b2}
    ({"a1": [], "a2": [], "b1": ["a1", "a2"], "b2": ["a2"]}, 2),
])
def test_width_is_the_largest_set_of_independent_steps(deps, width):
    assert graph.width(deps) == width


def brute_width(deps: dict[str, list[str]]) -> int:
    before = graph.ancestors(deps)
    names = list(deps)
    for size in range(len(names), 0, -1):
        for group in itertools.combinations(names, size):
            if all(a not in before[b] and b not in before[a] for a, b in itertools.combinations(group, 2)):
                return size
    return 0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.lists(
    st.lists(st.integers(0, n - 1), max_size=3), min_size=n, max_size=n)))
def test_width_matches_brute_force(raw):
    # step i may depend only on steps before it: no cycles
    deps = {f"s{i}": sorted({f"s{j}" for j in targets if j < i}) for i, targets in enumerate(raw)}
    assert graph.width(deps) == brute_width(deps)


# --- pipelines ----------------------------------------------------------------------------


def test_without_depends_on_a_pipeline_is_a_chain():
    p = Pipeline.model_validate({"name": "p", "repo": "*", "image": "busybox",
                                 "steps": [{"name": "a", "run": "x"}, {"name": "b", "run": "y"}]})
    assert not p.is_graph and p.graph() == {"a": [], "b": ["a"]} and p.width() == 1


def test_width_is_bounded_by_parallel():
    steps = [{"name": n, "run": "x", "depends_on": []} for n in "abcdef"] + [
        {"name": "z", "run": "x", "depends_on": list("abcdef")}]
    p = Pipeline.model_validate({"name": "p", "repo": "*", "image": "busybox", "steps": steps})
    assert p.is_graph is True and p.width() == 4  # the default parallel
    assert Pipeline.model_validate({"name": "p", "repo": "*", "image": "busybox", "parallel": 2,
                                    "steps": steps}).width() == 2
    assert Pipeline.model_validate({"name": "p", "repo": "*", "image": "busybox", "parallel": 10,
                                    "steps": steps}).width() == 6


def test_an_unknown_dependency_is_a_problem_at_its_line():
    text = HEAD + "  - name: a\n    run: x\n  - name: b\n    run: y\n    depends_on: [a, c]\n"
    assert problems(text) == ["pipelines/p.yaml:8: steps[1].depends_on[1]: unknown step 'c' (steps: a, b)"]


def test_a_cycle_is_a_problem_at_the_line_of_its_first_step():
    text = (HEAD + "  - name: a\n    run: x\n    depends_on: [c]\n  - name: b\n    run: y\n    depends_on: a\n"
            "  - name: c\n    run: z\n    depends_on:\n      - b\n")
    assert problems(text) == ["pipelines/p.yaml:6: steps[0].depends_on: steps depend on each other in a cycle: "
                              "a -> c -> b -> a"]


def test_a_step_depending_on_itself():
    text = HEAD + "  - name: a\n    run: x\n    depends_on: [a]\n"
    assert problems(text) == ["pipelines/p.yaml:6: steps[0].depends_on: step 'a' depends on itself"]


def test_the_model_alone_refuses_a_cycle_too():
    with pytest.raises(ValidationError, match="cycle: a -> b -> a"):
        Pipeline.model_validate({"name": "p", "repo": "*", "image": "busybox", "steps": [
            {"name": "a", "run": "x", "depends_on": ["b"]}, {"name": "b", "run": "y", "depends_on": ["a"]}]})


def test_graph_problems_come_with_the_others():
    text = HEAD + "  - name: a\n    run: x\n    depends_on: [nope]\n    retry: -1\n"
    assert problems(text) == ["pipelines/p.yaml:6: steps[0].depends_on[0]: unknown step 'nope' (steps: a)",
                              "pipelines/p.yaml:7: steps[0].retry: expected a number >= 0, got -1"]


def test_an_explicit_empty_depends_on_makes_a_graph_of_independent_steps():
    p = Pipeline.model_validate({"name": "p", "repo": "*", "image": "busybox", "steps": [
        {"name": "a", "run": "x", "depends_on": []}, {"name": "b", "run": "y"}]})
    assert p.is_graph and p.graph() == {"a": [], "b": []} and p.width() == 2
