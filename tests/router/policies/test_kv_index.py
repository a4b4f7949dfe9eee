"""The global KV index agrees with a plain reference model under random event sequences."""
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.wire.block_hash import block_hashes
from kvlab.wire.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from router.policies import KvIndex, LazyBlockHashes

WORKERS = ["a", "b", "c"]
HASHES = list(range(1, 9))  # a small universe so that events collide often

event_st = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(WORKERS), st.lists(st.sampled_from(HASHES), min_size=1, max_size=4)),
    st.tuples(st.just("remove"), st.sampled_from(WORKERS), st.lists(st.sampled_from(HASHES), min_size=1, max_size=4)),
    st.tuples(st.just("clear"), st.sampled_from(WORKERS), st.just([])),
    st.tuples(st.just("leave"), st.sampled_from(WORKERS), st.just([])),
)


class Reference:
    """Per worker, a multiset of held blocks (an engine may hold two copies of one hash)."""

    def __init__(self):
        self.held = {w: Counter() for w in WORKERS}

    def apply(self, op, worker, hashes):
        if op == "store":
            self.held[worker].update(hashes)
        elif op == "remove":
            for h in hashes:
                if self.held[worker][h]:
                    self.held[worker][h] -= 1
            self.held[worker] += Counter()  # drop zeros
        else:
            self.held[worker] = Counter()

    def match(self, blocks):
        out = {}
        for worker, held in self.held.items():
            depth = 0
            while depth < len(blocks) and held[blocks[depth]]:
                depth += 1
            if depth:
                out[worker] = depth
        return out


def feed(index, op, worker, hashes):
    if op == "store":
        index.apply(worker, KVEventBatch(0.0, [BlockStored(hashes, None, [], 16)]))
    elif op == "remove":
        index.apply(worker, KVEventBatch(0.0, [BlockRemoved(hashes)]))
    elif op == "clear":
        index.apply(worker, KVEventBatch(0.0, [AllBlocksCleared()]))
    else:
        index.remove_worker(worker)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(st.lists(event_st, max_size=40), st.lists(st.lists(st.sampled_from(HASHES), max_size=6), min_size=1, max_size=5))
def test_index_matches_the_reference_model(events, probes):
    index, ref = KvIndex(), Reference()
    for event in events:
        feed(index, *event)
        ref.apply(*event)
    for probe in probes:
        assert index.match(probe) == ref.match(probe)
    for h in HASHES:
        assert index.workers_with(h) == {w for w in WORKERS if ref.held[w][h]}
    assert len(index) == len({h for held in ref.held.values() for h in held})


LONG_TOKENS = list(range(16 * 700))
LONG_CHAIN = block_hashes(LONG_TOKENS)
holding_st = st.lists(st.tuples(st.integers(0, 700), st.lists(st.integers(0, 699), max_size=5)),
                      min_size=1, max_size=5)  # per worker: a held prefix length, then holes in it


@settings(max_examples=60, derandomize=True, deadline=None)
@given(holding_st)
def test_long_prompts_match_across_chunk_boundaries(holdings):
    index, expected = KvIndex(), {}
    for i, (length, holes) in enumerate(holdings):
        held = [h for j, h in enumerate(LONG_CHAIN[:length]) if j not in holes]
        store = KVEventBatch(0.0, [BlockStored(held, None, [], 16)])
        index.apply(f"w{i}", store)
        depth = min([length] + [j for j in holes if j < length])
        if depth:
            expected[f"w{i}"] = depth
    assert index.match(LONG_CHAIN) == expected
    assert index.match(LazyBlockHashes(LONG_TOKENS)) == expected


def test_match_stops_hashing_at_the_first_block_nobody_holds():
    tokens = list(range(16 * 1000))
    index = KvIndex()
    held = block_hashes(tokens, limit=40)
    index.apply("a", KVEventBatch(0.0, [BlockStored(held, None, tokens[:640], 16)]))
    lazy = LazyBlockHashes(tokens)
    assert index.match(lazy) == {"a": 40}
    assert lazy.computed <= 2 * 40 + 33  # at most one (doubling) chunk past the miss, not all 1,000


def test_offloaded_blocks_do_not_count_as_gpu_hits():
    index = KvIndex()
    index.apply("a", KVEventBatch(0.0, [BlockStored([1, 2], None, [], 16, medium="CPU")]))
    assert index.match([1, 2]) == {}


def test_rehash_recomputes_our_hashes_from_token_ids():
    tokens = list(range(1000, 1000 + 16 * 6))
    ours = block_hashes(tokens)
    index = KvIndex(rehash=True)
    # An engine with its own hash values (here 101..) and 32-token blocks; the second event chains
    # from the first by the engine's hash.
    index.apply("a", KVEventBatch(0.0, [
        BlockStored([101, 102], None, tokens[:64], 32),
        BlockStored([103], 102, tokens[64:96], 32),
    ]))
    assert index.match(ours) == {"a": 6}
    index.apply("a", KVEventBatch(0.0, [BlockRemoved([103])]))
    assert index.match(ours) == {"a": 4}


def test_rehash_skips_blocks_whose_parent_it_never_saw():
    index = KvIndex(rehash=True)
    index.apply("a", KVEventBatch(0.0, [BlockStored([7], 999, list(range(16)), 16)]))
    assert len(index) == 0 and index.skipped_blocks == 1


def test_rehash_rejects_an_engine_block_size_it_cannot_split():
    with pytest.raises(ValueError, match="multiple"):
        KvIndex(rehash=True).apply("a", KVEventBatch(0.0, [BlockStored([1], None, list(range(24)), 24)]))


def test_a_removed_worker_frees_its_slot_for_a_new_one():
    index = KvIndex()
    index.apply("a", KVEventBatch(0.0, [BlockStored([1], None, [], 16)]))
    index.remove_worker("a")
    index.apply("b", KVEventBatch(0.0, [BlockStored([2], None, [], 16)]))
    assert index.match([1]) == {} and index.match([2]) == {"b": 1} and index.workers == ["b"]
