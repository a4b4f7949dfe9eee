"""Tenants: keys, per-tenant limits that count tokens, isolation between tenants, salts."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.frontdoor.tenants import TenantConfig, Tenants
from router.policies import RouteRequest


def tenants(**limits):
    return Tenants([TenantConfig("a", ["key-a"], **limits), TenantConfig("b", ["key-b"])])


def test_api_keys_map_to_tenants():
    t = tenants()
    assert t.tenant_for_key("key-a") == "a" and t.tenant_for_key("key-b") == "b"
    assert t.tenant_for_key("nope") is None


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="already belongs"):
        Tenants([TenantConfig("a", ["k"]), TenantConfig("b", ["k"])])


def test_requests_per_s_limit_with_retry_after():
    t = tenants(requests_per_s=2)
    assert t.admit("a", 10, 0.0).ok and t.admit("a", 10, 0.0).ok
    over = t.admit("a", 10, 0.0)
    assert (over.ok, over.reason) == (False, "requests_per_s")
    assert over.retry_after == pytest.approx(0.5)
    assert t.admit("a", 10, 0.5).ok


def test_one_tenant_over_its_limit_leaves_the_other_untouched():
    t = tenants(requests_per_s=1, tokens_per_s=100, max_concurrency=1)
    assert t.admit("a", 50, 0.0).ok
    assert not t.admit("a", 50, 0.0).ok
    assert all(t.admit("b", 10_000, 0.0).ok for _ in range(100))


@settings(max_examples=80, derandomize=True)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=60))
def test_tokens_per_s_counts_tokens_not_requests(sizes):
    # 1,000 tokens/s with a 1,000-token burst; every request arrives at t=0 and is never released.
    t, left = tenants(tokens_per_s=1000, tokens_burst=1000), 1000
    for n in sizes:
        assert t.admit("a", n, 0.0).ok == (n <= left)   # admitted exactly while the tokens last
        left -= n if n <= left else 0


def test_many_small_requests_pass_where_one_big_one_waits():
    t = tenants(tokens_per_s=100, tokens_burst=1000)
    assert sum(t.admit("a", 10, 0.0).ok for _ in range(100)) == 100   # 100 requests, 1,000 tokens
    big = t.admit("a", 500, 0.0)
    assert big.reason == "tokens_per_s" and big.retry_after == pytest.approx(5.0)


def test_usage_below_the_reservation_is_refunded():
    t = tenants(tokens_per_s=10, tokens_burst=1000)
    first = t.admit("a", 1000, 0.0)             # prompt 200 + max_tokens 800 reserved
    assert not t.admit("a", 700, 0.0).ok
    t.release(first, used_tokens=300, now=0.0)  # it stopped after 100 tokens
    assert t.admit("a", 700, 0.0).ok


def test_a_token_rejection_does_not_spend_a_request():
    t = tenants(requests_per_s=1, requests_burst=1, tokens_per_s=10, tokens_burst=100)
    assert t.admit("a", 100, 0.0).ok
    assert t.admit("a", 100, 1.0).reason == "tokens_per_s"   # the request token was refunded...
    assert t.admit("a", 10, 1.0).ok                          # ...so this one still passes


def test_oversized_reservation_is_refused_outright():
    rejected = tenants(tokens_per_s=10, tokens_burst=100).admit("a", 101, 0.0)
    assert (rejected.reason, rejected.retry_after) == ("tokens_exceed_burst", None)


def test_concurrency_cap_frees_on_release():
    t = tenants(max_concurrency=2)
    first, second = t.admit("a", 1, 0.0), t.admit("a", 1, 0.0)
    assert first.ok and second.ok
    assert t.admit("a", 1, 0.0).reason == "concurrency"
    t.release(first, 1, 0.1)
    assert t.in_flight("a") == 1 and t.admit("a", 1, 0.1).ok
    t.release(t.admit("b", 1, 0.0), 1, 0.0)
    assert t.in_flight("b") == 0


def test_releasing_a_rejection_is_a_no_op():
    t = tenants(max_concurrency=1)
    t.admit("a", 1, 0.0)
    t.release(t.admit("a", 1, 0.0), 0, 0.0)
    assert t.in_flight("a") == 1


def test_cache_salt_keeps_tenants_from_sharing_blocks():
    t = Tenants([TenantConfig("a", cache_salt=True), TenantConfig("b", cache_salt="s3cret"), TenantConfig("c")])
    assert (t.salt("a"), t.salt("b"), t.salt("c")) == ("a", "s3cret", None)
    prompt = list(range(256))
    a = RouteRequest.from_tokens(prompt, salt=t.salt("a")).blocks
    b = RouteRequest.from_tokens(prompt, salt=t.salt("b")).blocks
    assert not set(a) & set(b)


def test_unknown_tenant_is_an_error():
    with pytest.raises(KeyError):
        tenants().admit("zz", 1, 0.0)
