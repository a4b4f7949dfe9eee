"""Tenants' limits in the plan: the refusal laws against the router's own limiter, and the bound they set."""
import heapq
import math
import random

import pytest

from emulator.planner.tenant_limits import TenantLimit, bucket_refusal, erlang_b, refused_share, worst
from router.frontdoor.tenants import TenantConfig, Tenants


def test_erlang_b_matches_its_closed_forms():
    assert erlang_b(1, 2.0) == pytest.approx(2 / 3)
    assert erlang_b(2, 1.0) == pytest.approx(0.2)       # (1/2) / (1 + 1 + 1/2)
    assert erlang_b(256, 0.0) == 0.0


@pytest.mark.parametrize("cap, load", [(20, 18.0), (20, 14.0)])
def test_concurrency_refusals_follow_erlang_b_through_the_routers_limiter(cap, load):
    # Poisson arrivals, lognormal lifetimes (Erlang B holds whatever their shape), the router's Tenants
    tenants = Tenants([TenantConfig(name="t", max_concurrency=cap)])
    rnd, now, ends, refused, n = random.Random(2), 0.0, [], 0, 60_000
    arrivals, mean = 10.0, load / 10.0
    for _ in range(n):
        now += rnd.expovariate(arrivals)
        while ends and ends[0][0] <= now:
            tenants.release(heapq.heappop(ends)[1], 0, now)
        admission = tenants.admit("t", 1, now)
        if not admission.ok:
            refused += 1
            continue
        heapq.heappush(ends, (now + rnd.lognormvariate(math.log(mean) - 0.32, 0.8), admission))
    assert refused / n == pytest.approx(erlang_b(cap, load), rel=0.15)


@pytest.mark.parametrize("load, burst", [(0.97, 20.0), (1.1, 20.0), (0.8, 5.0)])
def test_bucket_refusals_match_the_routers_token_bucket(load, burst):
    # around the 1% that decides C_max; far below it (0.9 load, burst 20: ~0.15%) the law runs ~20% high
    tenants = Tenants([TenantConfig(name="t", requests_per_s=10.0, requests_burst=burst)])
    rnd, now, refused, n = random.Random(1), 0.0, 0, 100_000
    for _ in range(n):
        now += rnd.expovariate(10.0 * load)
        admission = tenants.admit("t", 1, now)
        refused += not admission.ok
        tenants.release(admission, 0, now)   # no concurrency cap: only the bucket counts
    assert refused / n == pytest.approx(bucket_refusal(10.0 * load, 1.0, 10.0, burst), rel=0.15)


def test_refusals_weigh_each_tenant_by_its_share_and_name_the_worst_limit():
    a = TenantLimit(name="a", share=0.7, max_concurrency=10)
    b = TenantLimit(name="b", share=0.3, requests_per_s=100.0, requests_burst=100.0)
    # a: 7 req/s living 2 s = 14 Erlangs on 10 slots; b: far below its rate
    assert refused_share([a, b], 10.0, 2.0, 500.0) == pytest.approx(0.7 * erlang_b(10, 14.0), rel=1e-3)
    assert worst([a, b], 10.0, 2.0, 500.0) == "a max_concurrency"
    assert refused_share([a, b], 10.0, 0.01, 500.0) < 1e-6


def test_a_spec_whose_tenants_cap_it_is_bound_by_them_in_plan_and_simulation():
    """colocated-8b-h100's team-a holds at most 256 requests in flight: near the GPUs' C_max (~62 req/s)
    its share would keep ~300, so the router refuses; plan and simulator both see the bound."""
    import msgspec

    from emulator.spec import load_spec
    from loadtests import parallel_runs
    from loadtests.planner_bridge import predict
    from loadtests.sim_curve import simulate
    spec = load_spec("colocated-8b-h100")
    capped = predict(spec, []).c_max
    unlimited = msgspec.structs.replace(spec, tenants=[msgspec.structs.replace(t, max_concurrency=None,
                                                                               requests_per_s=None,
                                                                               tokens_per_s=None)
                                                       for t in spec.tenants])
    assert capped < 0.95 * predict(unlimited, []).c_max
    # the two runs side by side on the host's cores (each is deterministic in its spec and rate)
    over, free = parallel_runs.run_all(simulate, [(spec, 1.15 * capped, 1500), (unlimited, 1.15 * capped, 1500)])
    assert over.rejected > 0.01 * over.requests      # refused at the router's limits, in the simulator too
    assert free.rejected == 0

