"""What Docker itself saw of a cluster's jobs: the witness the cluster tests trust, not the dispatchers."""

from __future__ import annotations

import threading
from collections import defaultdict


class DockerWitness:
    """Docker's own events for containers of one owner: (job, attempt) -> start and die times."""

    def __init__(self, engine, owner: str):
        self.engine = engine
        self.owner = owner
        self.starts: dict[str, tuple[int, int, float]] = {}  # container id -> job, attempt, start
        self.dies: dict[str, float] = {}
        self._stream = engine.api.events(decode=True, filters={"type": "container",
                                                               "label": [f"narwhal.owner={owner}"]})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                attrs = event.get("Actor", {}).get("Attributes", {})
                cid, status = event.get("id"), event.get("status") or event.get("Action")
                if "narwhal.job" not in attrs or "narwhal.attempt" not in attrs:
                    continue
                at = event.get("timeNano", 0) / 1e9
                if status == "start":
                    self.starts[cid] = (int(attrs["narwhal.job"]), int(attrs["narwhal.attempt"]), at)
                elif status == "die":
                    self.dies[cid] = at
        except Exception:  # noqa: BLE001 - the stream closes at the end
            pass

    def close(self) -> None:
        self._stream.close()

    def attempts(self) -> dict[int, set[int]]:
        seen: dict[int, set[int]] = defaultdict(set)
        for job, attempt, _ in list(self.starts.values()):
            seen[job].add(attempt)
        return seen

    def peak_per_runner(self, runner_of: dict[tuple[int, int], str]) -> dict[str, int]:
        """Most attempts with a live container at once, per runner (an attempt spans its first
        container's start to its last container's death)."""
        spans: dict[tuple[int, int], list[float]] = {}
        for cid, (job, attempt, start) in list(self.starts.items()):
            end = self.dies.get(cid, float("inf"))
            span = spans.setdefault((job, attempt), [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
        points = []
        for key, (start, end) in spans.items():
            runner = runner_of.get(key, "?")
            points += [(start, 1, runner), (end, -1, runner)]
        live: dict[str, int] = defaultdict(int)
        peak: dict[str, int] = defaultdict(int)
        for _, delta, runner in sorted(points, key=lambda p: (p[0], p[1])):
            live[runner] += delta
            peak[runner] = max(peak[runner], live[runner])
        return dict(peak)
