"""The router's shedder limits the queue from the drain rate: Q_max = workers x floor(mu (SLO - S))."""
import heapq
import random
from types import SimpleNamespace

import numpy as np
import pytest

from kvlab.wire.openai_api import ApiError
from router.config import SheddingConfig
from router.frontdoor.gate import Gate


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def job():
    return SimpleNamespace(tenant=None, prompt=[1, 2, 3], max_tokens=4, ticket=None)


def gate_with(queue, clock, workers=2, slo=1.0, prefill=0.1, drain=0.08, places=None):
    config = SheddingConfig(enabled=True, ttft_slo_s=slo, prefill_s=prefill, drain_s=drain, places=places)
    return Gate([], config, queue_depth=lambda: queue[0], clock=clock, prefill_workers=lambda: workers)


def test_the_limit_is_workers_times_the_drain_rate_times_the_slack_and_ignores_arrivals():
    # mu = 1 / 0.08 s = 12.5/s per worker, slack 1.0 - 0.1 = 0.9 s: floor(11.25) = 11 places per
    # worker, 22 in all: a request is admitted while 21 wait (it takes the 22nd place)
    clock, queue = Clock(), [21]
    gate = gate_with(queue, clock)
    for _ in range(500):               # a burst of 500 arrivals in a second counts for nothing
        clock.t += 0.002
        gate.admit(job())
    queue[0] = 22
    with pytest.raises(ApiError) as refused:
        gate.admit(job())
    assert refused.value.status == 503
    assert refused.value.headers["Retry-After"] == "1"   # one extra request drains in 1 / 25 s


def overload(gate, queue, clock, service, rate, n=20000):
    """One FIFO worker behind the gate under Poisson arrivals: admitted TTFTs and the number shed."""
    rnd = random.Random(1)
    free_at, starts, ttfts, shed = 0.0, [], [], 0
    for _ in range(n):
        clock.t += rnd.expovariate(rate)
        while starts and starts[0] <= clock.t:
            heapq.heappop(starts)
        queue[0] = len(starts)                   # admitted, not yet started
        try:
            gate.admit(job())
        except ApiError:
            shed += 1
            continue
        start = max(clock.t, free_at)
        free_at = start + service()
        if start > clock.t:
            heapq.heappush(starts, start)
        ttfts.append(free_at - clock.t)
    return ttfts, shed


def test_under_a_2_6x_overload_admitted_requests_meet_the_ttft_slo():
    # One FIFO prefill worker, deterministic 0.1 s per request (S = 1/mu), Poisson arrivals at 2.6 mu,
    # SLO 1 s: floor(10 x 0.9) = 9 places, so an admitted request waits behind at most 8 and the one
    # in service, and its TTFT is at most 10 x 0.1 s. A limit of lambda x SLO (26) let it reach ~2.7 s.
    service, slo, rate = 0.1, 1.0, 26.0
    clock, queue = Clock(), [0]
    gate = gate_with(queue, clock, workers=1, slo=slo, prefill=service, drain=service)
    ttfts, shed = overload(gate, queue, clock, lambda: service, rate)
    assert np.percentile(ttfts, 99) <= slo + 1e-9
    assert 0.55 < shed / 20000 < 0.7             # it sheds the excess (1 - 1/2.6 = 62%), not more
    assert len(ttfts) / (clock.t) == pytest.approx(1 / service, rel=0.05)   # and keeps the worker busy


def test_with_varied_requests_the_line_is_sized_for_the_p99_not_the_mean():
    # Service times spread like prompt lengths (lognormal, mean 0.1 s, cv ~0.8): under a 3x overload the
    # mean rule's 9 places leave the last admitted at the SLO on average and the p99 well over it;
    # the sampled p99 line holds it.
    from router.frontdoor.drain import p99_places
    sigma, slo, rate = 0.7, 1.0, 30.0
    mean = 0.1
    draws = np.random.default_rng(3).lognormal(np.log(mean) - sigma ** 2 / 2, sigma, 4000)
    rnd = np.random.default_rng(4)
    service = lambda: float(rnd.lognormal(np.log(mean) - sigma ** 2 / 2, sigma))  # noqa: E731
    places = p99_places(slo, draws, draws)
    assert 3 <= places < 9
    clock, queue = Clock(), [0]
    mean_rule, _ = overload(gate_with(queue, clock, 1, slo, mean, mean), queue, clock, service, rate)
    assert np.percentile(mean_rule, 99) > 1.2 * slo
    clock, queue = Clock(), [0]
    sized, shed = overload(gate_with(queue, clock, 1, slo, mean, mean, places), queue, clock, service, rate)
    assert np.percentile(sized, 99) <= slo
    assert len(sized) / clock.t == pytest.approx(1 / mean, rel=0.1)   # the worker still never idles


def test_p99_places_is_the_mean_rule_for_identical_requests():
    from router.frontdoor.drain import p99_places
    same = np.full(100, 0.1)
    assert p99_places(1.0, same, same) == 9            # 9 x 0.1 + 0.1 = 1.0
    assert p99_places(0.05, same, same) == 0           # not even one fits


def test_the_routers_drain_figures_match_the_planners_prefill_laws():
    """The router's mean-prompt S and 1/mu (router.frontdoor.drain) against the planner's full laws on
    the same spec: close enough to set a threshold (within 20%)."""
    from emulator.planner import context, prefill
    from emulator.spec import load_spec
    from loadtests import planner_bridge
    from router.frontdoor.drain import prefill_times
    for name in ("default", "colocated-8b-h100", "disagg-70b-h100"):
        spec = load_spec(name)
        req, work, _, _ = planner_bridge.planner_inputs(spec)
        ctx = context.build(req, work, spec.catalog_data())
        prof = prefill.profile(ctx, 0)
        alone, per_request, _ = prefill_times(spec)
        assert alone == pytest.approx(prof.mean_alone(ctx), rel=0.2)
        if spec.disaggregated:               # a prefill worker drains at its packed prefill steps
            assert per_request == pytest.approx(prof.mean_share(ctx), rel=0.2)
            assert per_request <= alone      # packed steps share their fixed costs
        else:                                # colocated: no faster than prefill, nor than slots turn over
            assert per_request >= 0.8 * prof.mean_share(ctx)


def test_a_colocated_worker_drains_no_faster_than_its_sequence_slots_turn_over():
    """With 2 sequence slots, a waiting request starts only when a running one finishes its whole
    output: the drain is lifetime / 2 per request, far slower than packed prefill steps alone."""
    import msgspec

    from emulator.physics import roofline
    from emulator.spec import load_spec
    from router.frontdoor.drain import prefill_times, slot_turnover
    wide = load_spec("default")
    narrow = msgspec.structs.replace(wide, engine=msgspec.structs.replace(wide.engine, max_num_seqs=2))
    alone, per_request, _ = prefill_times(narrow)
    assert per_request > 10 * prefill_times(wide)[1]
    step = roofline.step_time(narrow.deployment(narrow.pools[0]), roofline.BatchShape().add(1, 500).add(1, 500))
    assert per_request > alone / 2 + 100 * step.seconds / 2     # >= 100 output tokens each, 2 slots
    assert slot_turnover(narrow.deployment(narrow.pools[0]), alone, 500, 200, 2) > alone / 2


@pytest.mark.parametrize("places", [None, 0])
def test_an_slo_below_one_prefill_still_admits_one_request_per_worker(places):
    # SLO 0.05 s < prefill 0.1 s: no place fits, but refusing into empty lines would refuse everything.
    clock, queue = Clock(), [0]
    gate = gate_with(queue, clock, workers=2, slo=0.05, prefill=0.1, places=places)
    gate.admit(job())
    queue[0] = 1
    gate.admit(job())
    queue[0] = 2
    with pytest.raises(ApiError) as refused:
        gate.admit(job())
    assert refused.value.status == 503


def test_a_workers_line_is_its_places_or_the_mean_rule_and_none_without_a_drain_time():
    clock, queue = Clock(), [0]
    assert gate_with(queue, clock).shedder.line() == 11                    # floor(0.9 s / 0.08 s)
    assert gate_with(queue, clock, places=4).shedder.line() == 4            # the p99 line, when given
    assert gate_with(queue, clock, places=0).shedder.line() == 1            # never below one place
    assert gate_with(queue, clock, drain=None).shedder.line() is None       # measured drain: cluster-wide only
