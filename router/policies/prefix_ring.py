"""Prefix ring: requests whose first K blocks match go to the same worker, via a consistent-hash ring.

Locality without any feedback from the workers: the same system prompt keeps landing where its KV
blocks already are. Unhealthy workers are walked past (their keys fall to the next worker clockwise
and come back on recovery); only ``remove_worker`` takes a worker off the ring.
"""
from __future__ import annotations

from collections.abc import Sequence

from router.policies.base import Decision, RouteRequest, WorkerView, healthy, prefix_key
from router.policies.hash_ring import DEFAULT_VNODES, HashRing

DEFAULT_PREFIX_BLOCKS = 4  # 64 tokens at 16 tokens a block: enough to tell system prompts apart


class RingPolicy:
    """Shared ring bookkeeping; workers seen in a snapshot join the ring automatically."""
    name = "ring"

    def __init__(self, prefix_blocks: int = DEFAULT_PREFIX_BLOCKS, vnodes: int = DEFAULT_VNODES,
                 seed: int = 0) -> None:
        if prefix_blocks < 1:
            raise ValueError(f"prefix_blocks must be >= 1, got {prefix_blocks}")
        self.prefix_blocks = prefix_blocks
        self.prompt_blocks: int | None = prefix_blocks   # the ring key's blocks
        self.ring = HashRing(vnodes, seed)

    def add_worker(self, worker_id: str) -> None:
        self.ring.add(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        self.ring.remove(worker_id)

    def _alive(self, workers: Sequence[WorkerView]) -> dict[str, WorkerView]:
        alive = {w.id: w for w in workers if w.healthy}
        if not alive:
            healthy(workers)   # raises NoWorkerAvailable, as for every policy
        if not self.ring.holds(alive):   # one set comparison a decision while none is missing
            for worker_id in alive:
                if worker_id not in self.ring:
                    self.ring.add(worker_id)
        return alive


class PrefixRing(RingPolicy):
    name = "prefix_ring"

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        alive = self._alive(workers)
        for worker_id in self.ring.walk(prefix_key(request, self.prefix_blocks)):
            if worker_id in alive:
                return Decision(worker=worker_id, policy=self.name)
        raise AssertionError("every healthy worker is on the ring")  # _alive added them all
