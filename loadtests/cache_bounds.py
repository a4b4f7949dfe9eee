"""How many prompt tokens any router could find cached: two reference hit rates for a request stream.

Both walk the requests in arrival order and count, per request, the leading prompt blocks already
seen, with the engine's own rule that a hit covers at most ``prompt_len - 1`` tokens (the last token
must run to give logits); the hit rate is hit tokens over prompt tokens, the definition the simulator
reports per request.

- **infinite cache**: every full block seen before is a hit. No cluster does better.
- **pooled LRU**: one LRU cache of the whole cluster's KV blocks, as if every worker's cache were one.
  A request's blocks are touched tail first, so a prefix's head is the last of it to go (vLLM frees a
  request's blocks in reverse order for the same reason). A router that splits traffic over workers
  fragments this pool, so the pooled LRU is the practical target for a routing policy; it is not a
  strict bound (an LRU is not an optimal cache, and it ignores the blocks in-flight requests pin).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from workers.spec_config import spec_engine


@dataclass(frozen=True)
class Bounds:
    infinite: float      # hit rate of an infinite cache
    pooled_lru: float    # hit rate of one LRU cache the size of the cluster's KV
    capacity_blocks: int
    pooled_tiered: float | None = None   # one LRU of the cluster's KV plus its host tiers (None: no host tier)
    host_blocks: int = 0


def _leading_hits(hashes: Sequence[int], prompt_len: int, block_size: int, cached) -> int:
    usable = min(len(hashes), (prompt_len - 1) // block_size)
    hits = 0
    while hits < usable and hashes[hits] in cached:
        hits += 1
    return hits


def hit_rates(requests: Iterable[tuple[int, Sequence[int]]], capacity_blocks: int, block_size: int) -> Bounds:
    """Both reference hit rates for (prompt_len, full-block hashes) pairs in arrival order."""
    if capacity_blocks < 1:
        raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
    seen: set[int] = set()
    lru: OrderedDict[int, None] = OrderedDict()
    prompt = infinite = pooled = 0
    for prompt_len, hashes in requests:
        prompt += prompt_len
        infinite += _leading_hits(hashes, prompt_len, block_size, seen) * block_size
        pooled += _leading_hits(hashes, prompt_len, block_size, lru) * block_size
        seen.update(hashes)
        for h in reversed(hashes):   # tail first: the head ends most recent
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return Bounds(infinite / prompt if prompt else 0.0, pooled / prompt if prompt else 0.0, capacity_blocks)


def cluster_kv_blocks(spec) -> int:
    """KV blocks of the workers that compute prompts (prefill and colocated): the pooled cache's size."""
    slots = [s for s in spec.worker_list() if s.role != "decode"]
    return sum(spec.kv_blocks(s.pool) for s in slots)


def cluster_host_blocks(spec) -> int:
    """Host-tier KV blocks of the workers that compute prompts (0 without a host tier)."""
    if spec.engine.host_kv_gb <= 0:
        return 0
    slots = [s for s in spec.worker_list() if s.role != "decode"]
    hosts = [spec_engine(spec, s.id).blocks.host for s in slots]
    return sum(h.capacity for h in hosts if h is not None)
