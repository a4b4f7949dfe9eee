"""Invariants of the KV block pool under arbitrary request traffic (hypothesis state machine)."""
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvlab.wire.block_hash import block_hashes
from kvlab.wire.kv_events import BlockRemoved, BlockStored
from workers.core.block_manager import BlockManager

BS = 4
PREFIXES = [[p * 100 + i for i in range(4 * BS)] for p in range(3)]


class BlockPoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockManager(num_blocks=12, block_size=BS)
        self.live: dict[int, list[int]] = {}   # request -> block ids it references
        self.next_id = 0
        self.released_order: list[int] = []    # hashes in the order they became unreferenced

    @rule(prefix=st.sampled_from(PREFIXES), extra=st.integers(0, 2))
    def start_request(self, prefix, extra):
        tokens = prefix + [9000 + self.next_id * 10 + i for i in range(extra * BS)]
        hashes = block_hashes(tokens, BS)
        hit = self.pool.cached_prefix_length(hashes)
        hit_ids = [self.pool.block_of(h) for h in hashes[:hit]]
        evictable = sum(1 for b in hit_ids if self.pool.blocks[b].ref_count == 0)
        need = len(hashes) - hit
        if need > self.pool.num_free - evictable:
            return
        ids = self.pool.acquire_cached(hashes[:hit], len(tokens))
        ids += self.pool.allocate(need)
        self.pool.cache_blocks(ids[hit:], hashes[hit:], hashes[hit - 1] if hit else None, tokens[hit * BS:])
        self.live[self.next_id] = ids
        self.next_id += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish_request(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        ids = self.live.pop(rid)
        before = {b for b in ids if self.pool.blocks[b].ref_count == 1}
        self.pool.free(ids)
        for b in reversed(ids):
            if b in before and self.pool.blocks[b].block_hash is not None:
                self.released_order.append(self.pool.blocks[b].block_hash)

    @rule(count=st.integers(1, 4))
    def allocate_and_check_lru(self, count):
        """Evictions take the least recently released unreferenced cached blocks first."""
        self.pool.take_events()
        evictable = _dedupe([h for h in self.released_order if self._unreferenced_cached(h)])
        empty = self.pool.num_free - len(evictable)
        ids = self.pool.allocate(count)
        if ids is None:
            assert count > self.pool.num_free
            return
        evicted = [h for e in self.pool.take_events() if type(e).__name__ == "BlockRemoved" for h in e.block_hashes]
        expected = max(0, count - empty)
        assert evicted == evictable[:expected]
        self.pool.free(ids)

    def _unreferenced_cached(self, h):
        if not self.pool.is_cached(h):
            return False
        return self.pool.blocks[self.pool.block_of(h)].ref_count == 0

    @invariant()
    def no_block_is_both_free_and_referenced(self):
        referenced = {b for ids in self.live.values() for b in ids}
        assert all(self.pool.blocks[b].ref_count > 0 for b in referenced)
        free_slots = set(self.pool._empty) | set(getattr(self.pool._evictable, "_order", {}))
        assert not (free_slots & referenced)

    @invariant()
    def refcounts_match_references(self):
        counts = {}
        for ids in self.live.values():
            for b in ids:
                counts[b] = counts.get(b, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_count == counts.get(block.block_id, 0) >= 0

    @invariant()
    def every_block_is_accounted_for(self):
        assert self.pool.num_used + self.pool.num_free == self.pool.num_blocks
        assert 0.0 <= self.pool.usage <= 1.0


def _dedupe(hashes):
    """The most recent release of a hash is the one that counts for its LRU position."""
    last = {h: i for i, h in enumerate(hashes)}
    return [h for i, h in enumerate(hashes) if last[h] == i]


TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_finished_requests_return_every_block():
    pool = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(3 * BS))
    hashes = block_hashes(tokens, BS)
    ids = pool.allocate(3)
    pool.cache_blocks(ids, hashes, None, tokens)
    pool.free(ids)
    assert pool.num_free == 8 and pool.num_used == 0
    assert pool.cached_prefix_length(hashes) == 3   # freed but still cached for the next request


def test_lfu_evicts_the_least_hit_block_first():
    pool = BlockManager(num_blocks=2, block_size=BS, eviction="lfu")
    a, b = ([i] * BS for i in (1, 2))
    ha, hb = block_hashes(a, BS)[0], block_hashes(b, BS)[0]
    ida, idb = pool.allocate(2)
    pool.cache_blocks([ida], [ha], None, a)
    pool.cache_blocks([idb], [hb], None, b)
    pool.free([ida, idb])
    for _ in range(3):                 # `a` is popular
        pool.free(pool.acquire_cached([ha], BS))
    pool.allocate(1)
    assert pool.is_cached(ha) and not pool.is_cached(hb)


class TieredPoolMachine(RuleBasedStateMachine):
    """A pool with a host tier: evicted blocks are demoted, host hits onboarded, and a reader of the
    KV events (per medium) always holds exactly what each tier holds."""

    def __init__(self):
        super().__init__()
        self.pool = BlockManager(num_blocks=10, block_size=BS, host_blocks=6)
        self.live: dict[int, list[int]] = {}
        self.next_id = 0
        self.seen = {"GPU": set(), "CPU": set()}   # what a KV-event reader holds, per medium

    def _read_events(self):
        events = self.pool.take_events()
        for e in events:
            held = self.seen[e.medium]
            if isinstance(e, BlockStored):
                held.update(e.block_hashes)
            else:
                held.difference_update(e.block_hashes)
        return events

    @rule(prefix=st.sampled_from(PREFIXES), extra=st.integers(0, 2))
    def start_request(self, prefix, extra):
        tokens = prefix + [9000 + self.next_id * 10 + i for i in range(extra * BS)]
        hashes = block_hashes(tokens, BS)
        gpu = self.pool.cached_prefix_length(hashes)
        host = self.pool.host_prefix_length(hashes[gpu:])
        evictable = sum(1 for h in hashes[:gpu] if self.pool.blocks[self.pool.block_of(h)].ref_count == 0)
        if len(hashes) - gpu > self.pool.num_free - evictable:
            return
        hits_before = self.pool.host_hits
        ids = self.pool.acquire_cached(hashes[:gpu], len(tokens))
        ids += self.pool.onboard(hashes[gpu:gpu + host], hashes[gpu - 1] if gpu else None,
                                 tokens[gpu * BS:(gpu + host) * BS]) if host else []
        assert self.pool.host_hits - hits_before == host * BS
        assert all(self.pool.is_cached(h) and h not in self.pool.host for h in hashes[:gpu + host])
        done = gpu + host
        ids += self.pool.allocate(len(hashes) - done)
        self.pool.cache_blocks(ids[done:], hashes[done:], hashes[done - 1] if done else None, tokens[done * BS:])
        self.live[self.next_id] = ids
        self.next_id += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish_request(self, data):
        self.pool.free(self.live.pop(data.draw(st.sampled_from(sorted(self.live)))))

    @rule(count=st.integers(1, 6))
    def pressure_demotes_evicted_blocks(self, count):
        """Blocks evicted to make room go to host memory as its most recent entries."""
        self._read_events()
        ids = self.pool.allocate(count)
        if ids is None:
            return
        events = self._read_events()
        evicted = [h for e in events if isinstance(e, BlockRemoved) and e.medium == "GPU" for h in e.block_hashes]
        kept = self.pool.host_hashes()
        assert kept[len(kept) - min(len(evicted), len(kept)):] == evicted[len(evicted) - min(len(evicted), len(kept)):]
        self.pool.free(ids)

    @invariant()
    def tiers_are_exclusive_and_bounded(self):
        gpu = set(self.pool.cached_hashes())
        host = set(self.pool.host_hashes())
        assert not gpu & host
        assert len(host) <= 6

    @invariant()
    def kv_events_per_medium_track_each_tier(self):
        self._read_events()
        assert self.seen["GPU"] == set(self.pool.cached_hashes())
        assert self.seen["CPU"] == set(self.pool.host_hashes())

    @invariant()
    def every_block_is_accounted_for(self):
        assert self.pool.num_used + self.pool.num_free == self.pool.num_blocks


TestTieredPool = TieredPoolMachine.TestCase
TestTieredPool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
