"""A pure routing simulation: do prefix policies earn their keep against round robin?

Four workers, each modelled as an LRU set of block hashes holding 60 blocks: one 40-block system
prompt plus recent tails, far below the 8 x 40-block working set, which is where routing decides the
hit rate. Requests pick one of 8 shared system prompts at random and add a random 1-5 block tail;
about 100 are in flight at once (each stays for 40-160 later arrivals), so bounded loads do bind.
A request's hit is the run of its leading blocks its worker already holds.

How 8 prompts fall on 4 workers is luck of the hash: about 38% of rings leave a worker with no prompt
at all, and such a ring reaches ~2.7x rather than ~4x. So the claim is pinned on the mean over 6
independent rings and prompt sets, not on one draw. Measured over 30 seeds: prefix_ring 3.5x,
prefix_bounded 3.2x at eps 0.5 (2.85x at eps 0.25: a tighter cap spills more), kv_aware 4.0x.
"""
import random
from collections import OrderedDict

import numpy as np

from kvlab.wire.kv_events import BlockRemoved, BlockStored, KVEventBatch
from router.policies import PolicySet, RouteRequest, WorkerView
from router.policies.bounded_load import DEFAULT_SLACK, load_cap

WORKERS, PROMPTS, PROMPT_BLOCKS, CACHE_BLOCKS = 4, 8, 40, 60
SEEDS, REQUESTS = range(6), 800


class LruWorker:
    def __init__(self, capacity):
        self.capacity, self.blocks = capacity, OrderedDict()

    def serve(self, hashes):
        """Count the cached leading blocks, then cache the prompt; return (hit, stored, evicted)."""
        hit = 0
        while hit < len(hashes) and hashes[hit] in self.blocks:
            hit += 1
        stored = [h for h in hashes if h not in self.blocks]
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        evicted = [self.blocks.popitem(last=False)[0] for _ in range(len(self.blocks) - self.capacity)]
        return hit, stored, evicted


def simulate(policy, seed):
    """Hit rate (cached prompt blocks / prompt blocks) of one policy on one seeded workload."""
    rnd, rng = random.Random(seed), np.random.default_rng(seed)
    prompts = [rng.integers(1024, 128_000, PROMPT_BLOCKS * 16) for _ in range(PROMPTS)]
    policies = PolicySet(policy, {"prefix_bounded": {"eps": 0.5}, "prefix_ring": {}, "kv_aware": {}})
    workers = [WorkerView(f"w{i}") for i in range(WORKERS)]
    by_id = {w.id: w for w in workers}
    caches = {w.id: LruWorker(CACHE_BLOCKS) for w in workers}
    finishing: dict[int, list[str]] = {}
    hits = blocks = 0
    for t in range(REQUESTS):
        for worker_id in finishing.pop(t, []):
            by_id[worker_id].in_flight -= 1
        tail = rng.integers(1024, 128_000, rnd.randint(16, 80))
        request = RouteRequest.from_tokens(np.concatenate([prompts[rnd.randrange(PROMPTS)], tail]))
        cap = load_cap(sum(w.in_flight for w in workers), WORKERS, 0.5, DEFAULT_SLACK)
        decision = policies.choose(request, workers)
        worker = by_id[decision.worker]
        worker.in_flight += 1
        if policy == "prefix_bounded":
            assert worker.in_flight <= cap
        finishing.setdefault(t + rnd.randint(40, 160), []).append(worker.id)
        hit, stored, evicted = caches[worker.id].serve(list(request.blocks))
        policies.index.apply(worker.id, KVEventBatch(float(t), [BlockStored(stored, None, [], 16),
                                                                 BlockRemoved(evicted)]))
        hits, blocks = hits + hit, blocks + len(request.blocks)
    return hits / blocks


def mean_hit_rate(policy):
    return sum(simulate(policy, seed) for seed in SEEDS) / len(SEEDS)


def test_prefix_policies_reach_three_times_round_robins_hit_rate():
    baseline = mean_hit_rate("round_robin")
    assert 0.05 < baseline < 0.2  # the cache really is too small for cache-blind routing
    for policy in ("prefix_ring", "prefix_bounded", "kv_aware"):
        assert mean_hit_rate(policy) >= 3 * baseline, policy
