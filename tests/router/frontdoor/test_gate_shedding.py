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


def gate_with(queue, clock, workers=2, slo=1.0, prefill=0.1, drain=0.08):
    config = SheddingConfig(enabled=True, ttft_slo_s=slo, prefill_s=prefill, drain_s=drain)
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


def test_under_a_2_6x_overload_admitted_requests_meet_the_ttft_slo():
    # One FIFO prefill worker, deterministic 0.1 s per request (S = 1/mu), Poisson arrivals at 2.6 mu,
    # SLO 1 s: floor(10 x 0.9) = 9 places, so an admitted request waits behind at most 8 and the one
    # in service, and its TTFT is at most 10 x 0.1 s. A limit of lambda x SLO (26) let it reach ~2.7 s.
    service, slo, rate = 0.1, 1.0, 26.0
    clock, queue = Clock(), [0]
    gate = gate_with(queue, clock, workers=1, slo=slo, prefill=service, drain=service)
    rnd = random.Random(1)
    free_at, starts, ttfts, shed = 0.0, [], [], 0
    for _ in range(20000):
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
        free_at = start + service
        if start > clock.t:
            heapq.heappush(starts, start)
        ttfts.append(free_at - clock.t)
    assert np.percentile(ttfts, 99) <= slo + 1e-9
    assert 0.55 < shed / 20000 < 0.7             # it sheds the excess (1 - 1/2.6 = 62%), not more
    assert len(ttfts) / (clock.t) == pytest.approx(1 / service, rel=0.05)   # and keeps the worker busy


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
        alone, per_request = prefill_times(spec)
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
    alone, per_request = prefill_times(narrow)
    assert per_request > 10 * prefill_times(wide)[1]
    step = roofline.step_time(narrow.deployment(narrow.pools[0]), roofline.BatchShape().add(1, 500).add(1, 500))
    assert per_request > alone / 2 + 100 * step.seconds / 2     # >= 100 output tokens each, 2 slots
    assert slot_turnover(narrow.deployment(narrow.pools[0]), alone, 500, 200, 2) > alone / 2
