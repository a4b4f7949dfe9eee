"""Least loaded: the worker with the smallest queue, in-flight count or KV usage."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from router.policies.base import Decision, RouteRequest, StatelessPolicy, WorkerView, healthy

# Engine-reported metrics lag by a scrape, so every metric falls back on the router's own fresh
# in-flight count to separate workers that look equal.
METRICS: dict[str, Callable[[WorkerView], tuple]] = {
    "queue": lambda w: (w.running + w.waiting, w.in_flight),
    "kv_usage": lambda w: (w.kv_usage, w.in_flight),
    "in_flight": lambda w: (w.in_flight,),
}


class LeastLoaded(StatelessPolicy):
    name = "least_loaded"
    prompt_blocks: int | None = 0   # reads loads only

    def __init__(self, metric: str = "queue") -> None:
        if metric not in METRICS:
            raise ValueError(f"least_loaded metric must be one of {sorted(METRICS)}, got {metric!r}")
        self.metric = metric
        self._load = METRICS[metric]
        self._turn = 0  # rotates among equally loaded workers, so ties do not all land on the first

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        alive = healthy(workers)
        n = len(alive)
        start = self._turn % n
        self._turn += 1
        order = alive[start:] + alive[:start]
        worker = min(order, key=self._load)  # min keeps the first of equals: the rotation decides
        return Decision(worker=worker.id, policy=self.name)
