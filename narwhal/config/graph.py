"""The step graph of a pipeline: which step waits for which, checked and measured.

A graph is a mapping from each step's name to the names it depends on, in pipeline
order. A pipeline whose steps name no ``depends_on`` is a chain (each step waits for the
one before it), which is how narwhal ran every pipeline before steps had dependencies.
Everything here is pure, and linear or polynomial in the number of steps (a pipeline has
tens of steps, not thousands).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Graph = Mapping[str, Sequence[str]]


def chain(names: Sequence[str]) -> dict[str, list[str]]:
    """Each step depends on the one before it: the order of a pipeline without ``depends_on``."""
    return {name: ([names[i - 1]] if i else []) for i, name in enumerate(names)}


def unknown(graph: Graph) -> list[tuple[str, int, str]]:
    """(step, position in its depends_on, name) for every dependency that names no step."""
    return [(step, i, dep) for step, deps in graph.items() for i, dep in enumerate(deps) if dep not in graph]


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle as the names along it, first name repeated last (``[a, b, a]``); None if there is none.

    Unknown names are ignored (``unknown`` reports them). The first cycle found from the
    steps in pipeline order is returned, so the message is stable.
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if state.get(start):
            continue
        path: list[str] = [start]
        stack = [iter(graph[start])]
        state[start] = 1
        while stack:
            dep = next(stack[-1], None)
            if dep is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if dep not in graph or state.get(dep) == 2:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            state[dep] = 1
            path.append(dep)
            stack.append(iter(graph[dep]))
    return None


def ancestors(graph: Graph) -> dict[str, set[str]]:
    """Every step's transitive dependencies (the graph must have no cycle)."""
    out: dict[str, set[str]] = {}

    def visit(name: str) -> set[str]:
        if name not in out:
            found: set[str] = set()
            for dep in graph.get(name, ()):
                if dep in graph:
                    found |= {dep} | visit(dep)
            out[name] = found
        return out[name]

    for name in graph:
        visit(name)
    return out


def width(graph: Graph) -> int:
    """The most steps that can run at once: the largest set of steps none of which depends,
    directly or not, on another (the graph must have no cycle).

    By Dilworth's theorem that is the number of steps less a maximum matching in the
    bipartite graph of "comes before" pairs; the matching is Kuhn's augmenting paths.
    """
    names = list(graph)
    if not names:
        return 0
    before = ancestors(graph)
    after: dict[str, list[str]] = {n: [m for m in names if n in before[m]] for n in names}
    match: dict[str, str] = {}  # later step -> the earlier step matched to it

    def augment(name: str, seen: set[str]) -> bool:
        for later in after[name]:
            if later in seen:
                continue
            seen.add(later)
            if later not in match or augment(match[later], seen):
                match[later] = name
                return True
        return False

    matched = sum(augment(name, set()) for name in names)
    return len(names) - matched
