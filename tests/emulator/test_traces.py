"""Mooncake-style traces: lazy expansion to tokens, prefix sharing block for block, and block hashes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emulator import traces as T
from kvlab.wire.block_hash import block_hashes
from kvlab.wire.tokenizer import BuiltinTokenizer

TRACE = T.shared_trace() or Path("absent")
needs_trace = pytest.mark.skipif(not TRACE.is_file(), reason="the Mooncake trace is not in $KVLAB_DATA_DIR/traces")

# Two requests sharing their first two blocks, then diverging; the second is cut mid-block.
SMALL = [T.TraceRecord(0, 1500, 10, [7, 8, 9]), T.TraceRecord(250, 1100, 20, [7, 8, 42])]


@pytest.fixture(scope="module")
def records():
    return T.read_trace(TRACE)


def test_expansion_truncates_the_last_block_to_input_length():
    tokens = T.expand_tokens(SMALL[0])
    assert tokens.dtype == np.int32 and len(tokens) == 1500
    full = T.expand_tokens(T.TraceRecord(0, 1536, 1, [7, 8, 9]))
    assert np.array_equal(tokens, full[:1500])


def test_a_block_id_expands_to_the_same_tokens_wherever_it_appears():
    alone = T.expand_tokens(T.TraceRecord(0, 512, 1, [9]))
    third = T.expand_tokens(T.TraceRecord(0, 1536, 1, [7, 8, 9]))[1024:]
    assert np.array_equal(alone, third)
    assert not np.array_equal(alone, T.expand_tokens(T.TraceRecord(0, 512, 1, [10])))


def test_shared_leading_ids_share_exactly_those_blocks_hashes():
    a, b = (block_hashes(T.expand_tokens(r)) for r in SMALL)
    per_block = T.TRACE_BLOCK_TOKENS // 16
    assert a[:2 * per_block] == b[:2 * per_block]
    assert not set(a[2 * per_block:]) & set(b)
    assert len(b) == 1100 // 16


@pytest.mark.parametrize("block_size", [16, 32])
def test_the_hasher_equals_hashing_the_expanded_tokens(block_size):
    hasher = T.TraceHasher(block_size)
    for record in SMALL * 2:  # the second pass is served from the cache
        assert hasher.hashes(record) == block_hashes(T.expand_tokens(record), block_size)


def test_a_salt_changes_every_hash():
    plain, salted = T.TraceHasher().hashes(SMALL[0]), T.TraceHasher(salt="tenant-b").hashes(SMALL[0])
    assert plain == block_hashes(T.expand_tokens(SMALL[0]))
    assert salted == block_hashes(T.expand_tokens(SMALL[0]), salt="tenant-b")
    assert not set(plain) & set(salted)


def test_text_form_encodes_to_the_same_tokens():
    assert BuiltinTokenizer().encode(T.expand_text(SMALL[1])) == T.expand_tokens(SMALL[1]).tolist()


def test_requests_are_lazy_and_arrivals_scale_with_speedup():
    requests = T.trace_requests(SMALL, speedup=5.0)
    first = next(requests)
    assert (first.arrival_s, first.prompt_len, first.max_tokens, first.archetype) == (0.0, 1500, 10, "trace")
    assert next(requests).arrival_s == pytest.approx(0.25 / 5.0)


def test_hashed_requests_carry_lengths_and_hashes_only():
    hashed = list(T.hashed_requests(SMALL, speedup=2.0))
    assert [h.prompt_len for h in hashed] == [1500, 1100]
    assert hashed[1].arrival_s == pytest.approx(0.125)
    assert hashed[1].block_hashes == block_hashes(T.expand_tokens(SMALL[1]))


def test_a_record_with_too_few_blocks_is_rejected(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}\n')
    with pytest.raises(ValueError, match="1 blocks for 600 tokens"):
        T.read_trace(path)


@needs_trace
def test_the_trace_reads_as_its_readme_says(records):
    assert len(records) == 12031
    assert records[-1].timestamp == pytest.approx(3_537_000, rel=0.01)
    assert np.median([r.input_length for r in records]) == pytest.approx(6909, rel=0.01)


@needs_trace
def test_prefix_reuse_over_the_full_trace_matches_the_readme(records):
    assert T.prefix_reuse_fraction(records) == pytest.approx(0.366, abs=0.001)


@needs_trace
def test_trace_requests_sharing_leading_ids_share_exactly_that_many_blocks(records):
    per_block = T.TRACE_BLOCK_TOKENS // 16
    hasher = T.TraceHasher()
    pairs = 0
    for a, b in zip(records[:200], records[1:201], strict=False):
        common = _common_prefix(a.hash_ids, b.hash_ids)
        ha, hb = hasher.hashes(a), hasher.hashes(b)
        shared = min(common * per_block, len(ha), len(hb))
        assert ha[:shared] == hb[:shared]
        assert len(set(ha) & set(hb)) == shared
        pairs += common > 0
    assert pairs > 10  # the trace's conversations really do share prefixes


@needs_trace
def test_trace_hasher_matches_expanded_tokens_on_real_records(records):
    hasher = T.TraceHasher()
    for record in records[:100]:
        assert hasher.hashes(record) == block_hashes(T.expand_tokens(record))


@needs_trace
def test_limit_and_lazy_expansion_of_the_real_trace():
    requests = list(T.trace_requests(TRACE, limit=50, speedup=10.0))
    assert len(requests) == 50
    assert all(r.prompt_len == rec.input_length for r, rec in zip(requests, T.read_trace(TRACE, limit=50), strict=True))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
