"""Admission: size limits and the rate meter the shedder reads (the shedder itself: test_gate_shedding)."""
import random

import pytest

from router.frontdoor.admission import STATUS, RateMeter, RequestLimits, check_request

LIMITS = RequestLimits(max_input_tokens=1000, max_tokens_limit=500, max_model_len=1200)


@pytest.mark.parametrize("prompt, max_tokens, reason", [
    (0, 10, "prompt_empty"),
    (1001, 10, "prompt_too_long"),
    (10, 0, "max_tokens_invalid"),
    (10, -5, "max_tokens_invalid"),
    (10, 501, "max_tokens_too_large"),
    (900, 400, "context_length_exceeded"),
])
def test_size_limits(prompt, max_tokens, reason):
    verdict = check_request(prompt, max_tokens, LIMITS)
    assert (verdict.ok, verdict.reason) == (False, reason) and STATUS[reason] == 400


def test_within_limits_is_admitted():
    assert check_request(1000, 200, LIMITS).ok and check_request(5, 5, RequestLimits()).ok


def test_rate_meter_tracks_a_poisson_stream():
    rnd, meter, now = random.Random(0), RateMeter(tau_s=20.0), 0.0
    while now < 400:
        now += rnd.expovariate(50.0)
        meter.observe(now)
    assert meter.rate(now) == pytest.approx(50.0, rel=0.15)
    assert meter.rate(now + 100) < 0.01 * 50   # decays once arrivals stop
