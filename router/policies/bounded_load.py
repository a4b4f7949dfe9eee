"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018), with an
absolute slack for small totals and a KV-aware choice among the workers under the cap.

The cap. With T requests in flight over n healthy workers, a worker may hold at most

    cap(T) = max(ceil((1 + eps) * (T + 1) / n),  ceil((T + 1) / n) + slack)

of them once the next request is placed. The caps sum to at least T + 1, so some worker is always
under its cap. **Guarantee** (tests/router/policies/test_bounded_load.py checks it with hypothesis): no placement
lifts a worker above max((1 + eps) * a, a + slack) + 1, where a = (T + 1) / n is the average load
after the placement; with slack = 0 this is the paper's (1 + eps) * a + 1.

Why the slack: the paper's bound is relative, which is tight when loads are small. Long-context
traffic runs ~10 requests over 8 workers, where (1 + eps) * a rounds up to a cap of 2: a prefix spills
as soon as its worker holds two requests, and every spill re-prefills a conversation's history on a
worker that lacks it (measured on the Mooncake conversation trace: 29% of requests spilled at caps of
1 to 3, and prefix_bounded reached 71% of the pooled-LRU bound where the unbounded ring reached 97%;
benchmarks/routing_quality.py).
An absolute allowance of a few requests above the average keeps histories home at low totals; at
large totals the relative term dominates and the cap is the paper's.

The choice, among the workers under the cap. Without a KV index it is the paper's: the owner of
the prompt's ring key, else the next worker clockwise under the cap. With the router's KV index, the
worker holding the longest cached prefix of the prompt wins, then the least loaded, then the first
clockwise (with a host KV tier, host-held blocks count at the index's host_credit); a match counts
only where it runs past the ring key (the key's blocks are usually a prefix every worker holds, like
a common system prompt, and crediting them draws all traffic to the workers that cached it first).
So a conversation follows its history, an overflowing prefix lands on a worker that already holds
it, replicas of a hot prefix share its load, and a cold prompt goes to the least loaded worker
(measured: sending cold prompts to the ring owner instead cost up to 9 points of the pooled-LRU
bound on the trace and raised TTFT p99 on the RAG and agentic mixes by 5-17%). ``overflow_skips``
counts the workers at the cap that the ring walk passed before the first one under it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from operator import attrgetter

from router.policies.base import Decision, RouteRequest, WorkerView, prefix_key
from router.policies.hash_ring import DEFAULT_VNODES
from router.policies.kv_index import KvIndex
from router.policies.prefix_ring import DEFAULT_PREFIX_BLOCKS, RingPolicy

# Vimeo ran the paper's algorithm at 1.25x the mean; for LLM serving we default looser, to 1.5x (the
# example value in HAProxy's hash-balance-factor docs): a prefix-cache miss costs a whole prefill,
# while a somewhat larger decode batch costs little (decode steps are memory-bound).
DEFAULT_EPS = 0.5
# Requests a worker may hold above the average share whatever the total; 0 is the paper's cap.
# 2: measured best of 0-4 on the Mooncake trace and the synthetic mixes (benchmarks/routing_quality.py).
DEFAULT_SLACK = 2
_in_flight = attrgetter("in_flight")


def load_cap(total_load: int, workers: int, eps: float, slack: int = 0) -> int:
    """Most in-flight requests one worker may hold once the next request is placed."""
    share = (total_load + 1) / workers
    # The tolerance keeps float error from rounding an exact integer like 3.0000000000000004 up to 4.
    return max(math.ceil((1.0 + eps) * share - 1e-9), math.ceil(share - 1e-9) + slack)


class PrefixBounded(RingPolicy):
    name = "prefix_bounded"

    def __init__(self, eps: float = DEFAULT_EPS, prefix_blocks: int = DEFAULT_PREFIX_BLOCKS,
                 vnodes: int = DEFAULT_VNODES, seed: int = 0, slack: int = DEFAULT_SLACK,
                 index: KvIndex | None = None, kv_choice: bool = True) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if slack < 0 or slack != int(slack):
            raise ValueError(f"slack must be a whole number >= 0, got {slack}")
        super().__init__(prefix_blocks, vnodes, seed)
        self.eps = eps
        self.slack = int(slack)
        self.index = index if kv_choice else None
        self.prompt_blocks = prefix_blocks if self.index is None else None   # the index matches past the key
        self.overflow_total = 0  # skips over the policy's lifetime (a metrics counter)

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        alive = self._alive(workers)
        cap = load_cap(sum(map(_in_flight, alive.values())), len(alive), self.eps, self.slack)
        order = [alive[w] for w in self.ring.order(prefix_key(request, self.prefix_blocks)) if w in alive]
        under = [w for w in order if w.in_flight < cap]
        if not under:
            raise AssertionError("the caps sum past the total load, so some worker is under its cap")
        winner, matched = under[0], None   # without an index: the key's owner, else clockwise
        if self.index is not None:
            matched = self.index.credited_match(request.blocks)   # host-held blocks at their credit
            # Python's min keeps the first of equal keys, so ring order breaks the last ties. With no
            # match anywhere every credit is 0, and the key is the in-flight count alone.
            winner = min(under, key=lambda w: (-self._credit(matched, w), w.in_flight)) if matched \
                else min(under, key=_in_flight)
        skips = order.index(under[0])   # workers at the cap passed over on the walk
        self.overflow_total += skips
        return Decision(worker=winner.id, policy=self.name, overflow_skips=skips,
                        matched_blocks=None if matched is None else round(matched.get(winner.id, 0)))

    def _credit(self, matched: Mapping[str, float], worker: WorkerView) -> float:
        """Cached blocks that count for `worker`: only a match longer than the ring key. The key's
        blocks are what the ring itself places (often a prefix every worker holds, such as a common
        system prompt); crediting them would draw all traffic to the workers that hold them first."""
        hit = matched.get(worker.id, 0)
        return hit if hit > self.prefix_blocks else 0
