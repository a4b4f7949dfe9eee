"""Block hashes: the faster block_hashes and the lazy sequence both keep the reference values."""
import numpy as np
import xxhash
from hypothesis import given, settings, strategies as st

from kvlab.block_hash import block_hashes, root_hash
from router.policies import LazyBlockHashes, RouteRequest


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
