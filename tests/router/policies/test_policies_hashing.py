"""Block hashes: the faster block_hashes, the lazy sequence and the memo all keep the reference values."""
import numpy as np
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.wire.block_hash import block_hashes, root_hash
from router.policies import LazyBlockHashes, RouteRequest
from router.policies.hash_memo import RUN_BLOCKS, BlockHashMemo


def reference_hashes(tokens, block_size=16, salt=None, parent=None):
    """The scheme spelled out: chained xxh3_64 over little-endian int32 token bytes."""
    h = root_hash(salt) if parent is None else parent
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = np.asarray(tokens[start:start + block_size], dtype="<i4").tobytes()
        h = xxhash.xxh3_64_intdigest(block, h)
        out.append(h)
    return out


tokens_st = st.lists(st.integers(0, 2**31 - 1), max_size=200)


@settings(max_examples=60, derandomize=True)
@given(tokens_st, st.sampled_from([1, 4, 16]), st.sampled_from([None, "tenant-a"]))
def test_block_hashes_match_the_reference_scheme(tokens, block_size, salt):
    expected = reference_hashes(tokens, block_size, salt)
    assert block_hashes(tokens, block_size, salt) == expected
    assert block_hashes(np.array(tokens, dtype=np.int32), block_size, salt) == expected
    assert block_hashes(tokens, block_size, salt, limit=3) == expected[:3]


@settings(max_examples=60, derandomize=True)
@given(tokens_st, st.sampled_from([1, 4, 16]), st.integers(0, 20))
def test_lazy_hashes_equal_eager_ones_in_any_access_order(tokens, block_size, first):
    eager = block_hashes(tokens, block_size)
    lazy = LazyBlockHashes(tokens, block_size)
    assert len(lazy) == len(eager) and lazy.computed == 0
    if first < len(eager):
        assert lazy[first] == eager[first]
        assert lazy.computed <= first + 1  # hashed only as far as asked
    assert list(lazy) == eager
    assert lazy[1:4] == eager[1:4] and lazy[-1:] == eager[-1:]


def test_lazy_hashes_touch_only_the_blocks_asked_for():
    lazy = LazyBlockHashes(list(range(32_768)))
    assert lazy[3] == block_hashes(list(range(64)))[3]
    assert lazy.computed == 4


def test_salt_changes_every_block():
    tokens = list(range(64))
    a = RouteRequest.from_tokens(tokens, salt="a").blocks
    b = RouteRequest.from_tokens(tokens, salt="b").blocks
    assert not set(a) & set(b)


def test_short_prompts_get_a_key_from_their_partial_block():
    a, b = RouteRequest.from_tokens([1, 2, 3]), RouteRequest.from_tokens([1, 2, 4])
    assert len(a.blocks) == 0 and a.short_key != b.short_key
    assert RouteRequest.from_tokens(list(range(16))).short_key == 0  # has a block: keys on it


@settings(max_examples=80, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 16 * 200), st.integers(0, 250)), min_size=1, max_size=6),
       st.sampled_from([None, "tenant-a"]), st.booleans())
def test_memoized_hashes_equal_eager_ones(prompts, salt, as_array):
    """Prompts share prefixes (one of four bases, cut at any length) and are read in any order;
    every value through the memo, hit or miss, is the chained hash."""
    memo = BlockHashMemo(16, runs=4)   # tiny: evictions happen too
    bases = [np.random.default_rng(b).integers(0, 128_000, 16 * 200) for b in range(4)]
    for base, length, peek in prompts:
        tokens = bases[base][:length].astype(np.int32)
        tokens = tokens if as_array else tokens.tolist()
        lazy = LazyBlockHashes(tokens, salt=salt, memo=memo)
        eager = block_hashes(tokens, salt=salt)
        assert lazy[:peek] == eager[:peek]   # a short peek first, then a long walk through the runs
        assert list(lazy) == eager
    assert len(memo) <= 4


def test_a_repeated_prefix_is_looked_up_not_rehashed():
    memo = BlockHashMemo(16)
    prompt = list(range(16 * RUN_BLOCKS * 3 + 5))
    list(LazyBlockHashes(prompt, memo=memo))
    assert (memo.hits, memo.misses) == (0, 3)
    longer = LazyBlockHashes(prompt + [7] * 16 * RUN_BLOCKS, memo=memo)
    assert list(longer) == block_hashes(prompt + [7] * 16 * RUN_BLOCKS)
    assert memo.hits == 3   # the first three runs came from the memo; the fourth run is new
