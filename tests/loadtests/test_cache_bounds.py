"""The two reference hit rates `kvlab compare` prints, checked by hand on a five-request trace."""
import json

import pytest

from emulator import traces
from emulator.spec import load_spec
from loadtests import compare
from loadtests.cache_bounds import cluster_kv_blocks, hit_rates

# One id per 512-token block; hashed with 512-token blocks, so a trace block is one cache block.
HAND_MADE = [
    {"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]},     # cold
    {"timestamp": 1, "input_length": 1536, "output_length": 1, "hash_ids": [1, 2, 3]},  # 1, 2 seen
    {"timestamp": 2, "input_length": 512, "output_length": 1, "hash_ids": [4]},          # one block: no hit possible
    {"timestamp": 3, "input_length": 2048, "output_length": 1, "hash_ids": [1, 2, 3, 5]},
    {"timestamp": 4, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]},     # last token must run
]
PROMPT_TOKENS = 1024 + 1536 + 512 + 2048 + 1024


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HAND_MADE))
    return path


def pairs(trace):
    return [(r.prompt_len, r.block_hashes) for r in traces.hashed_requests(trace, block_size=512)]


@pytest.mark.parametrize("capacity, lru_hit_blocks", [
    (100, 2 + 3 + 1),   # never full: the pooled LRU equals the infinite cache
    (4, 2 + 3 + 1),     # 1, 2, 3, 4 fit exactly
    (3, 2 + 2 + 1),     # block 4 pushes out 3, the least recently used (1 and 2 were touched after it)
    (1, 1 + 0 + 1),     # only the head of the last prompt survives: 1 after request 2, 4 after request 3
])
def test_infinite_and_pooled_lru_hit_rates_of_a_hand_made_trace(trace, capacity, lru_hit_blocks):
    bounds = hit_rates(pairs(trace), capacity, 512)
    # Request 5 has both blocks cached but may use only the first: its last token must be computed.
    assert bounds.infinite == pytest.approx((2 + 3 + 1) * 512 / PROMPT_TOKENS)
    assert bounds.pooled_lru == pytest.approx(lru_hit_blocks * 512 / PROMPT_TOKENS)
    assert bounds.pooled_lru <= bounds.infinite


def test_compare_prints_both_bounds_and_each_policys_share_of_the_pooled_lru(trace):
    spec = load_spec("tiny-test")
    bounds = compare.trace_bounds(spec, trace, None)
    assert bounds.capacity_blocks == cluster_kv_blocks(spec) > 0
    assert bounds.infinite == bounds.pooled_lru > 0   # five small prompts fit in any cluster
    row = compare.simulate(spec, trace, "round_robin", {}, None, 1.0)
    text = compare.table([row], spec, bounds)
    lines = {line.split("  ")[0].strip(): line.split() for line in text.splitlines()}
    assert lines["bound: pooled LRU"][-2:] == [f"{100 * bounds.pooled_lru:.1f}", "100"]
    assert "bound: infinite cache" in lines
    share = round(100 * row.summary.prefix_hit_rate / bounds.pooled_lru)
    assert lines["round_robin"][1:3] == [f"{100 * row.summary.prefix_hit_rate:.1f}", str(share)]


def test_a_cache_needs_room_for_a_block():
    with pytest.raises(ValueError):
        hit_rates([], 0, 16)
