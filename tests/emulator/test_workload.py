"""Synthetic workloads: deterministic, at the asked rate, with exactly the designed prefix sharing."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator import workload as W
from emulator.spec import load_spec
from kvlab.wire.block_hash import block_hashes
from kvlab.wire.tokenizer import BuiltinTokenizer

MIX = {"chat": 1.0, "rag": 1.0, "code": 1.0, "agentic": 1.0}


def _same(a: W.Request, b: W.Request) -> bool:
    return (a.request_id, a.arrival_s, a.max_tokens, a.tenant, a.session_id, a.archetype) == \
        (b.request_id, b.arrival_s, b.max_tokens, b.tenant, b.session_id, b.archetype) and \
        np.array_equal(a.tokens, b.tokens)


def test_same_seed_same_requests_token_for_token():
    a = W.generate(5.0, num_requests=300, mix=MIX, seed=7)
    b = W.generate(5.0, num_requests=300, mix=MIX, seed=7)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True)) and len(a) == len(b) == 300


def test_another_seed_other_requests():
    a = W.generate(5.0, num_requests=50, seed=1)
    b = W.generate(5.0, num_requests=50, seed=2)
    assert not any(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))


def test_requests_come_in_arrival_order_with_int32_tokens():
    reqs = W.generate(10.0, num_requests=500, mix=MIX, seed=3)
    times = [r.arrival_s for r in reqs]
    assert times == sorted(times)
    assert all(r.tokens.dtype == np.int32 and r.prompt_len > 0 and r.max_tokens >= 1 for r in reqs)
    assert len({r.request_id for r in reqs}) == len(reqs)


@pytest.mark.parametrize("rate", [2.0, 50.0])
def test_poisson_rate_within_tolerance(rate):
    rng = np.random.default_rng(11)
    duration = 4000.0 / rate  # ~4,000 arrivals: the count's relative sd is 1/sqrt(4000) = 1.6%
    times = W.arrival_times(rng, rate, duration_s=duration)
    assert abs(len(times) / duration - rate) / rate < 0.05
    gaps = np.diff(times)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.08  # exponential gaps: cv = 1


def test_gamma_arrivals_have_the_asked_burstiness():
    times = W.arrival_times(np.random.default_rng(5), 10.0, n=20000, cv=3.0)
    gaps = np.diff(times)
    assert abs(gaps.mean() - 0.1) < 0.01
    assert abs(gaps.std() / gaps.mean() - 3.0) < 0.3


def test_step_profile_changes_the_rate_at_the_step():
    profile = W.RateProfile.step(base=10.0, factor=3.0, at_s=500.0)
    times = W.arrival_times(np.random.default_rng(2), profile, duration_s=1000.0)
    before, after = np.sum(times < 500.0) / 500.0, np.sum(times >= 500.0) / 500.0
    assert abs(before - 10.0) < 1.0 and abs(after - 30.0) < 2.0
    assert profile.rate_at(499.9) == 10.0 and profile.rate_at(500.0) == 30.0


def test_a_zero_rate_span_has_no_arrivals():
    profile = W.RateProfile(starts=(0.0, 10.0, 20.0), rates=(5.0, 0.0, 5.0))
    times = W.arrival_times(np.random.default_rng(0), profile, duration_s=30.0)
    assert not np.any((times >= 10.0) & (times < 20.0))
    assert np.sum(times < 10.0) > 20 and np.sum(times >= 20.0) > 20


def test_another_rate_or_length_gives_the_same_requests_at_scaled_times():
    """Common random numbers: runs at two rates, of different lengths, see the same requests (the
    archetype, tenant, lengths and tokens of the n-th), the slower run a prefix of the faster one."""
    mix, tenants = {"chat": 1.0, "rag": 1.0, "code": 1.0}, {"a": 1.0, "b": 2.0}
    slow = W.generate(2.0, duration_s=100.0, mix=mix, tenants=tenants, seed=4)
    fast = W.generate(5.0, num_requests=len(slow) + 150, mix=mix, tenants=tenants, seed=4)
    assert len(slow) > 150
    for a, b in zip(slow, fast, strict=False):
        assert (a.archetype, a.tenant, a.max_tokens, a.shared_tokens) == (b.archetype, b.tenant, b.max_tokens,
                                                                          b.shared_tokens)
        assert np.array_equal(a.tokens, b.tokens) and a.arrival_s == pytest.approx(b.arrival_s * 2.5)


def test_num_requests_and_duration_both_bound_the_arrivals():
    rng = np.random.default_rng(0)
    assert len(W.arrival_times(rng, 100.0, n=50, duration_s=100.0)) == 50
    assert W.arrival_times(rng, 1.0, n=10**6, duration_s=10.0).max() < 10.0


def test_shared_system_prompts_share_block_hashes_and_unique_parts_do_not():
    reqs = W.generate(5.0, num_requests=200, mix={"chat": 1.0}, seed=4)
    by_prefix = defaultdict(list)
    for r in reqs:
        by_prefix[tuple(r.tokens[:r.shared_tokens])].append(r)
    assert 1 < len(by_prefix) <= W.DEFAULTS["chat"].shared_count
    a, b = next(group for group in by_prefix.values() if len(group) >= 2)[:2]
    ha, hb = block_hashes(a.tokens), block_hashes(b.tokens)
    full_shared = a.shared_tokens // 16
    assert ha[:full_shared] == hb[:full_shared]       # every block inside the system prompt matches
    assert not set(ha[full_shared:]) & set(hb)         # no block that touches the unique part does


def test_unique_parts_are_unique_across_a_whole_workload():
    reqs = W.generate(20.0, num_requests=400, mix={"chat": 1.0, "code": 1.0, "rag": 1.0}, seed=9)
    seen = set()
    for r in reqs:
        tail = block_hashes(r.tokens)[r.shared_tokens // 16:]
        assert not seen & set(tail)
        seen.update(tail)


def test_rag_requests_share_whole_documents_of_a_few_thousand_tokens():
    reqs = W.generate(5.0, num_requests=100, mix={"rag": 1.0}, seed=1)
    assert 1500 < np.median([r.shared_tokens for r in reqs]) < 6000
    assert np.median([r.prompt_len - r.shared_tokens for r in reqs]) < 200


def test_agentic_sessions_resend_their_growing_history():
    reqs = W.generate(2.0, num_requests=400, mix={"agentic": 1.0}, seed=5)
    sessions = defaultdict(list)
    for r in reqs:
        sessions[r.session_id].append(r)
    long = [turns for turns in sessions.values() if len(turns) >= 3]
    assert long
    for turns in long:
        assert [t.turn for t in turns] == list(range(len(turns)))
        assert len({t.tenant for t in turns}) == 1
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.prompt_len > prev.prompt_len + prev.max_tokens            # history + answer + new turn
            assert np.array_equal(nxt.tokens[:prev.prompt_len], prev.tokens)     # exact prefix
            assert nxt.shared_tokens == prev.prompt_len
            assert nxt.arrival_s > prev.arrival_s


def test_agentic_turns_count_toward_the_rate():
    reqs = W.generate(4.0, duration_s=500.0, mix={"agentic": 1.0}, seed=6)
    assert abs(len(reqs) / 500.0 - 4.0) < 0.5


def test_text_prompts_encode_to_exactly_the_token_ids():
    tok = BuiltinTokenizer()
    for r in W.generate(5.0, num_requests=40, mix=MIX, seed=8, with_text=True):
        assert tok.encode(r.text) == r.tokens.tolist()
        assert "".join(m["content"] for m in r.messages) == r.text
        assert r.messages[0]["role"] == "system"


def test_the_vocabulary_is_distinct_single_tokens():
    ids, table = W.vocabulary()
    assert len(set(ids.tolist())) == W.VOCAB_WORDS == table.shape[0]
    assert ids.min() >= 1024  # clear of the output-word ids the workers emit


def test_tenants_follow_their_weights():
    reqs = W.generate(10.0, num_requests=2000, tenants={"a": 3.0, "b": 1.0}, seed=2)
    share = sum(r.tenant == "a" for r in reqs) / len(reqs)
    assert abs(share - 0.75) < 0.04


def test_overrides_merge_into_the_archetype():
    arch = W.make_archetype("chat", {"shared_count": 2, "unique_len": {"median": 40}})
    assert arch.shared_count == 2 and arch.unique_len.median == 40
    assert arch.unique_len.sigma == W.DEFAULTS["chat"].unique_len.sigma
    reqs = W.generate(5.0, num_requests=100, params={"chat": {"shared_count": 2}}, seed=0)
    assert len({tuple(r.tokens[:r.shared_tokens]) for r in reqs}) == 2


def test_lognormal_lengths_have_the_stated_median():
    dist = W.LogNormal(median=300, sigma=0.7)
    assert abs(np.median(dist.sample(np.random.default_rng(0), 20000)) - 300) < 10


def test_from_spec_uses_the_spec_workload():
    spec = load_spec("tiny-test")
    reqs = W.from_spec(spec)
    assert len(reqs) == spec.workload.num_requests
    assert {r.archetype for r in reqs} == set(spec.workload.mix)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(1.0, 50.0), st.floats(0.0, 20.0)), min_size=1, max_size=5),
       st.floats(0.1, 200.0))
def test_warp_inverts_the_integrated_rate(spans, s):
    starts = tuple(np.cumsum([0.0] + [d for d, _ in spans[:-1]]))
    profile = W.RateProfile(starts=starts, rates=tuple(r for _, r in spans[:-1]) + (max(spans[-1][1], 0.5),))
    t = float(profile.warp(np.array([s]))[0])
    assert profile.expected(t) == pytest.approx(s, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("count,popularity", [(1, 1.0), (4, 0.0), (16, 1.0), (16, 1.3)])
def test_a_library_picks_the_prefix_rng_choice_picks_from_the_same_stream(count, popularity):
    # pick() reads p's CDF directly instead of calling rng.choice per request: the same prefixes,
    # and the stream left where rng.choice leaves it (the requests after it unchanged)
    arch = W.make_archetype("chat", {"shared_count": count, "popularity": popularity})
    library = W._Library(arch, seed=3)
    fast, slow = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(500):
        (got,) = library.pick(fast, 1)
        (want,) = slow.choice(count, size=1, replace=False, p=library.p)
        assert got is library.items[want]
        assert fast.integers(0, 1 << 30) == slow.integers(0, 1 << 30)
