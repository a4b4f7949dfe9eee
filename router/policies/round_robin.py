"""Round robin over the healthy workers: the cache-blind baseline."""
from __future__ import annotations

from collections.abc import Sequence

from router.policies.base import Decision, RouteRequest, StatelessPolicy, WorkerView, healthy


class RoundRobin(StatelessPolicy):
    name = "round_robin"
    prompt_blocks: int | None = 0   # reads no prompt

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        alive = healthy(workers)
        worker = alive[self._next % len(alive)]
        self._next += 1
        return Decision(worker=worker.id, policy=self.name)
