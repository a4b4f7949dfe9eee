"""PagedAttention KV block pool with a prefix cache.

Blocks are fixed-size pages of KV. A block whose tokens are all computed gets the request's chained
block hash and enters the prefix cache (``hash -> block``). Unreferenced blocks stay cached until
their slot is needed: free slots without a hash are used first, then cached blocks are evicted in
LRU order (least recently released first) or LFU order (fewest hits, then oldest). Every change to
the cache emits a vLLM-format KV event at the moment it happens.

With a host tier (``host_blocks > 0``) an evicted block is not forgotten but demoted to host memory,
itself an LRU of block hashes; a prompt whose GPU prefix is followed by blocks held there onboards
them (``onboard``) instead of recomputing them. The tiers are exclusive, as a victim cache: a hash
is in at most one of them, so GPU plus host behave as one LRU of both sizes (what the planner's
two-level Che estimate assumes). Host changes are reported with ``medium="CPU"`` and, as vLLM's
offloading connector reports them, without parent hash or token ids.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvlab.wire.block_hash import BlockHash
from kvlab.wire.kv_events import BlockRemoved, BlockStored, KVEvent

if TYPE_CHECKING:
    from workers.core.request import Request

GPU, CPU = "GPU", "CPU"   # vLLM's medium names (vllm.v1.kv_offload.mediums)


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "hits")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: BlockHash | None = None
        self.hits = 0


class LruOrder:
    """Evictable cached blocks, least recently released first; O(1) push, remove and pop."""

    def __init__(self):
        self._order: OrderedDict[int, None] = OrderedDict()

    def push(self, block: Block) -> None:
        self._order[block.block_id] = None

    def remove(self, block: Block) -> None:
        del self._order[block.block_id]

    def pop(self) -> int:
        return self._order.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._order)


class LfuOrder:
    """Evictable cached blocks, fewest hits first (ties: released longest ago); lazy-deletion heap."""

    def __init__(self):
        self._heap: list[tuple[int, int, int]] = []
        self._live: dict[int, int] = {}   # block id -> tick of its live heap entry
        self._tick = itertools.count()

    def push(self, block: Block) -> None:
        tick = next(self._tick)
        self._live[block.block_id] = tick
        heapq.heappush(self._heap, (block.hits, tick, block.block_id))

    def remove(self, block: Block) -> None:
        del self._live[block.block_id]

    def pop(self) -> int:
        while True:
            _, tick, block_id = heapq.heappop(self._heap)
            if self._live.get(block_id) == tick:
                del self._live[block_id]
                return block_id

    def __len__(self) -> int:
        return len(self._live)


EVICTION_ORDERS: dict[str, type[LruOrder | LfuOrder]] = {"lru": LruOrder, "lfu": LfuOrder}


class HostTier:
    """Block hashes whose KV sits in host memory, least recently demoted first out."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._order: OrderedDict[BlockHash, None] = OrderedDict()

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._order

    def __len__(self) -> int:
        return len(self._order)

    def hashes(self) -> list[BlockHash]:
        return list(self._order)

    def put(self, block_hash: BlockHash) -> BlockHash | None:
        """Hold `block_hash` as the most recent; returns the hash pushed out to make room, if any."""
        self._order[block_hash] = None
        if len(self._order) > self.capacity:
            return self._order.popitem(last=False)[0]
        return None

    def discard(self, block_hash: BlockHash) -> bool:
        """Drop `block_hash`; whether it was held."""
        if block_hash not in self._order:
            return False
        del self._order[block_hash]
        return True


class BlockManager:
    """Owns every KV block; the scheduler asks it questions and never touches blocks itself."""

    def __init__(self, num_blocks: int, block_size: int, eviction: str = "lru", host_blocks: int = 0):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        if host_blocks < 0:
            raise ValueError("host_blocks must be >= 0")
        self.block_size = block_size
        self.num_blocks = num_blocks
        # A slot's Block is made at its first allocation (allocate): a large pool (60K blocks and more) is
        # mostly untouched by a short simulation, and building it whole took ~30 ms per engine.
        self.blocks: list[Block] = []
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))  # free slots holding no cached KV
        self._evictable = EVICTION_ORDERS[eviction]()                  # free slots holding cached KV
        self._cached: dict[BlockHash, int] = {}                        # block hash -> block id
        self._events: list[KVEvent] = []
        self.host = HostTier(host_blocks) if host_blocks else None
        self._pending: tuple[type, str, list[BlockHash]] | None = None  # a run of removals/demotions to report
        self.num_used = 0
        self.prefix_queries = 0   # tokens looked up in the prefix cache (vLLM counts tokens)
        self.prefix_hits = 0      # tokens found on the GPU
        self.host_queries = 0     # tokens looked up in host memory: those past the GPU hit
        self.host_hits = 0        # tokens found there (onboarded)
        self.evictions = 0
        self.demotions = 0        # evicted blocks kept in host memory

    # -- questions ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._empty) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (vLLM's kv_cache_usage_perc)."""
        return self.num_used / self.num_blocks

    def cached_prefix_length(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of a hash chain are in the cache (no side effects)."""
        count = 0
        for h in hashes:
            if h not in self._cached:
                break
            count += 1
        return count

    def host_prefix_length(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of `hashes` host memory holds (no side effects; 0 without a host tier)."""
        host = self.host
        if host is None:
            return 0
        count = 0
        for h in hashes:
            if h not in host:
                break
            count += 1
        return count

    def host_hashes(self) -> list[BlockHash]:
        return self.host.hashes() if self.host is not None else []

    def cached_hashes(self) -> list[BlockHash]:
        """Every block hash in the prefix cache now (in use or evictable): the KV index's full state."""
        return list(self._cached)

    def is_cached(self, block_hash: BlockHash) -> bool:
        return block_hash in self._cached

    def block_of(self, block_hash: BlockHash) -> int:
        return self._cached[block_hash]

    # -- allocation --------------------------------------------------------------------------
    def acquire_cached(self, hashes: Sequence[BlockHash], query_tokens: int) -> list[int]:
        """Reference the cached blocks matching the chain's prefix; counts the lookup."""
        block_ids = []
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            self._ref(self.blocks[block_id])
            block_ids.append(block_id)
        self.prefix_queries += query_tokens
        self.prefix_hits += len(block_ids) * self.block_size
        if self.host is not None:   # every lookup goes on to host memory (vLLM counts the whole prompt)
            self.host_queries += query_tokens
        return block_ids

    def onboard(self, hashes: Sequence[BlockHash], parent_hash: BlockHash | None,
                token_ids: Sequence[int]) -> list[int] | None:
        """Fresh GPU blocks for host-held blocks (their KV copied back), moved out of host memory and
        into the GPU prefix cache; None (and nothing changed) if the pool cannot supply them."""
        host = self.host
        assert host is not None and all(h in host for h in hashes), "onboarding needs host-held blocks"
        if len(hashes) > self.num_free:
            return None
        for h in hashes:   # out of host first, so the demotions this allocation causes cannot push them out
            host.discard(h)
            self._note(BlockRemoved, CPU, h)
        ids = self.allocate(len(hashes))
        assert ids is not None
        self.host_hits += len(hashes) * self.block_size
        self.cache_blocks(ids, hashes, parent_hash, token_ids)
        return ids

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks, or None (and nothing taken) if the pool cannot supply them."""
        if count > self.num_free:
            return None
        empty = self._empty
        from_empty = min(count, len(empty))
        ids = empty[len(empty) - from_empty:][::-1]   # the same order as popping one at a time
        del empty[len(empty) - from_empty:]
        evicted = []
        for _ in range(count - from_empty):
            block_id = self._evictable.pop()
            evicted.append(self._evict(self.blocks[block_id]))
            ids.append(block_id)
        if evicted:
            self._report_evictions(evicted)
        blocks = self.blocks
        for block_id in ids:
            if block_id < len(blocks):
                block = blocks[block_id]
            else:   # untouched slots leave the bottom of the empty list in increasing order: the next one
                assert block_id == len(blocks), "an untouched slot out of order"
                block = Block(block_id)
                blocks.append(block)
            block.ref_count = 1
            block.hits = 0
        self.num_used += count
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; tail blocks first so they are evicted first."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more times than referenced"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.num_used -= 1
                if block.block_hash is None:
                    self._empty.append(block_id)
                else:
                    self._evictable.push(block)

    def cache_blocks(self, block_ids: Sequence[int], hashes: Sequence[BlockHash], parent_hash: BlockHash | None,
                     token_ids: Sequence[int]) -> None:
        """Register full, computed blocks under their chain hashes: one BlockStored per contiguous run.

        First writer wins: a block whose hash is already cached elsewhere (two requests computed the
        same prefix at once) stays private and returns to the empty list when freed.
        """
        run_start = None
        for i, (block_id, block_hash) in enumerate(zip(block_ids, hashes, strict=True)):
            block = self.blocks[block_id]
            fresh = block.block_hash is None and block_hash not in self._cached
            if fresh:
                block.block_hash = block_hash
                self._cached[block_hash] = block_id
                if self.host is not None and self.host.discard(block_hash):
                    self._note(BlockRemoved, CPU, block_hash)   # recomputed: the tiers stay exclusive
                run_start = i if run_start is None else run_start
            elif run_start is not None:
                self._stored(run_start, i, hashes, parent_hash, token_ids)
                run_start = None
        if run_start is not None:
            self._stored(run_start, len(hashes), hashes, parent_hash, token_ids)

    def _stored(self, lo: int, hi: int, hashes: Sequence[BlockHash], parent_hash: BlockHash | None,
                token_ids: Sequence[int]) -> None:
        self._flush_pending()  # report evictions that happened first, first
        bs = self.block_size
        self._events.append(BlockStored(block_hashes=list(hashes[lo:hi]),
                                        parent_block_hash=hashes[lo - 1] if lo else parent_hash,
                                        token_ids=list(token_ids[lo * bs:hi * bs]), block_size=bs))

    def take_events(self) -> list[KVEvent]:
        self._flush_pending()
        events, self._events = self._events, []
        return events

    def _note(self, kind: type, medium: str, block_hash: BlockHash) -> None:
        """Queue one hash's removal or demotion; a run of the same kind and medium is one event."""
        pending = self._pending
        if pending is not None and pending[0] is kind and pending[1] == medium:
            pending[2].append(block_hash)
            return
        self._flush_pending()
        self._pending = (kind, medium, [block_hash])

    def _flush_pending(self) -> None:
        if self._pending is None:
            return
        kind, medium, hashes = self._pending
        self._pending = None
        if kind is BlockRemoved:
            self._events.append(BlockRemoved(block_hashes=hashes, medium=medium))
        else:
            self._events.append(BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[],
                                            block_size=self.block_size, medium=medium))

    # -- internals ---------------------------------------------------------------------------
    def _ref(self, block: Block) -> None:
        if block.ref_count == 0:
            self._evictable.remove(block)
            self.num_used += 1
        block.ref_count += 1
        block.hits += 1

    def _evict(self, block: Block) -> BlockHash:
        block_hash = block.block_hash
        assert block_hash is not None, "only cached blocks are evictable"
        del self._cached[block_hash]
        block.block_hash = None
        self.evictions += 1
        return block_hash

    def _report_evictions(self, hashes: list[BlockHash]) -> None:
        """Removed from the GPU, then (with a host tier) demoted: stored on the CPU, the oldest host
        blocks dropped to make room. One run per kind: within one eviction batch no hash is both
        dropped and stored again (it would have to be on the GPU and the host at once), so the order
        across kinds does not change what a reader ends up holding."""
        for h in hashes:
            self._note(BlockRemoved, GPU, h)
        if self.host is None:
            return
        dropped = []
        for h in hashes:   # the copy to host is the offloading connector's store
            self._note(BlockStored, CPU, h)
            out = self.host.put(h)
            if out is not None:
                dropped.append(out)
        self.demotions += len(hashes)
        for h in dropped:
            self._note(BlockRemoved, CPU, h)


def cache_computed_blocks(blocks: BlockManager, req: Request) -> None:
    """Put the request's newly computed full blocks in the prefix cache, hashing them on first need
    (the engine step and the fast-forward of a steady decode batch both call this)."""
    full = req.num_computed // blocks.block_size
    if full <= req.num_cached_blocks:
        return
    req.extend_hashes(blocks.block_size)
    bs, first = blocks.block_size, req.num_cached_blocks
    parent = req.hashes[first - 1] if first else None
    blocks.cache_blocks(req.block_ids[first:full], req.hashes[first:full], parent, req.tokens[first * bs:full * bs])
    req.num_cached_blocks = full
