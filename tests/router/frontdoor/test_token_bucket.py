"""Token bucket: the rate * t + burst bound over every window, retry hints, refunds and debts."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.frontdoor.token_bucket import TokenBucket

step_st = st.tuples(st.floats(0, 2.0), st.floats(0.1, 30.0), st.booleans())  # (gap, amount, refund half)


@settings(max_examples=150, derandomize=True)
@given(st.floats(0.5, 50), st.floats(1, 60), st.lists(step_st, max_size=120))
def test_never_admits_more_than_rate_times_t_plus_burst_over_any_window(rate, burst, steps):
    bucket, now, admitted = TokenBucket(rate, burst), 0.0, []  # (time, net amount kept)
    for gap, amount, refund in steps:
        now += gap
        ok, wait = bucket.try_take(amount, now)
        if ok:
            kept = amount
            if refund:
                bucket.refund(amount / 2, now)
                kept = amount / 2
            admitted.append((now, kept))
        else:
            assert wait > 0
    for i, (start, _) in enumerate(admitted):
        total = 0.0
        for end, kept in admitted[i:]:
            total += kept
            assert total <= rate * (end - start) + burst + 1e-6


@settings(max_examples=100, derandomize=True)
@given(st.floats(0.5, 50), st.floats(1, 60), st.floats(0, 60), st.floats(0, 5))
def test_retry_after_is_exactly_when_the_request_would_fit(rate, burst, first, amount_frac):
    bucket = TokenBucket(rate, burst)
    bucket.try_take(min(first, burst), 0.0)
    amount = amount_frac / 5 * burst
    ok, wait = bucket.try_take(amount, 0.0)
    if not ok:
        assert not bucket.try_take(amount, wait * 0.99)[0] or wait < 1e-9
        assert bucket.try_take(amount, wait + 1e-9)[0]


def test_amount_above_burst_never_fits():
    assert TokenBucket(10, 100).try_take(101, 0.0) == (False, math.inf)


def test_refills_at_rate_up_to_burst():
    bucket = TokenBucket(rate=10, burst=50)
    assert bucket.try_take(50, 0.0) == (True, 0.0)
    assert bucket.try_take(20, 1.0) == (False, pytest.approx(1.0))
    assert bucket.try_take(20, 2.0)[0]
    assert bucket.level(100.0) == 50  # capped


def test_reconcile_refunds_unused_and_charges_overrun_as_debt():
    bucket = TokenBucket(rate=10, burst=100)
    bucket.try_take(80, 0.0)                   # reserved prompt + max_tokens
    bucket.reconcile(reserved=80, used=30, now=0.0)
    assert bucket.level(0.0) == pytest.approx(70)
    bucket.try_take(70, 0.0)
    bucket.reconcile(reserved=70, used=90, now=0.0)
    assert bucket.level(0.0) == pytest.approx(-20)   # a debt: the next 20 tokens of refill repay it
    assert bucket.try_take(10, 2.9) == (False, pytest.approx(0.1))


def test_a_clock_stepping_back_mints_nothing():
    bucket = TokenBucket(rate=10, burst=10)
    bucket.try_take(10, 5.0)
    assert bucket.level(4.0) == 0
    assert bucket.level(5.5) == pytest.approx(5)


def test_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        TokenBucket(0, 10)
