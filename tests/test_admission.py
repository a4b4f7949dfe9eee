"""Admission: size limits, and Little's-law shedding against the TTFT SLO."""
import math
import random

import pytest

from router.frontdoor.admission import STATUS, LoadShedder, RateMeter, RequestLimits, check_request

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


def test_queue_threshold_is_rate_times_slack():
    shedder = LoadShedder(ttft_slo_s=2.0, prefill_s=0.5, min_queue=1)
    assert shedder.max_queue(rate=40) == pytest.approx(60)   # 40/s * (2.0 - 0.5) s
    assert shedder.check(60, 40).ok
    over = shedder.check(80, 40)
    assert (over.ok, over.reason, STATUS[over.reason]) == (False, "overloaded", 503)
    assert over.retry_after == pytest.approx(0.5)             # 20 extra requests drain at 40/s


def test_idle_cluster_does_not_shed_a_burst():
    assert LoadShedder(ttft_slo_s=1.0, min_queue=8).check(8, rate=0.0).ok


def test_admitted_requests_meet_the_slo_in_a_fifo_queue():
    """A fluid check of the derivation: at service rate mu, a request admitted behind Q <= Q_max
    requests starts within (ttft_slo - prefill) and so gets its first token within the SLO."""
    mu, slo, prefill = 25.0, 1.5, 0.3
    shedder = LoadShedder(slo, prefill, min_queue=0)
    q_max = shedder.max_queue(mu)
    assert q_max / mu + prefill == pytest.approx(slo)
    assert shedder.check(math.floor(q_max), mu).ok and not shedder.check(q_max + 1, mu).ok


def test_rate_meter_tracks_a_poisson_stream():
    rnd, meter, now = random.Random(0), RateMeter(tau_s=20.0), 0.0
    while now < 400:
        now += rnd.expovariate(50.0)
        meter.observe(now)
    assert meter.rate(now) == pytest.approx(50.0, rel=0.15)
    assert meter.rate(now + 100) < 0.01 * 50   # decays once arrivals stop


def test_shedder_rejects_an_impossible_slo():
    with pytest.raises(ValueError):
        LoadShedder(ttft_slo_s=0.2, prefill_s=0.3)
