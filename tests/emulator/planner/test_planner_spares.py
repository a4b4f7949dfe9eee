"""Availability-based spares (N+k): the smallest k that keeps N workers serving with the target probability."""
import math

import pytest

from emulator.planner import LengthDist, PlannerError, PlanRequest, Slo, Workload, plan, spares


def binomial_at_most(k: int, n: int, u: float) -> float:
    return sum(math.comb(n, i) * u ** i * (1 - u) ** (n - i) for i in range(k + 1))


def test_the_default_failure_rate_is_the_llama3_papers():
    assert spares.GPU_FAILURES_PER_HOUR == pytest.approx(1.97e-5, rel=0.01)
    g = spares.gpu_unavailability(spares.GPU_FAILURES_PER_HOUR, 24.0)
    assert spares.worker_unavailability(8, spares.GPU_FAILURES_PER_HOUR, 24.0) == pytest.approx(1 - (1 - g) ** 8)


@pytest.mark.parametrize("serving, tp, target", [(10, 4, 0.99), (10, 4, 0.9999), (1, 1, 0.999), (300, 8, 0.999)])
def test_spares_are_the_smallest_count_that_reaches_the_availability(serving, tp, target):
    failures, repair = 1e-4, 48.0        # a flakier fleet than the default, so small pools need spares too
    u = spares.worker_unavailability(tp, failures, repair)
    k = spares.spares(serving, tp, target, failures, repair)
    assert binomial_at_most(k, serving + k, u) >= target
    if k:
        assert binomial_at_most(k - 1, serving + k - 1, u) < target


def test_more_workers_or_a_higher_target_never_need_fewer_spares():
    counts = [spares.spares(n, 8, 0.999, 1e-4, 48.0) for n in (1, 10, 100, 1000)]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    targets = [spares.spares(50, 8, a, 1e-4, 48.0) for a in (0.9, 0.99, 0.999, 0.99999)]
    assert targets == sorted(targets) and targets[-1] > targets[0]
    assert spares.spares(50, 8, 0.99999, 0.0, 48.0) == 0       # GPUs that never fail need none


@pytest.mark.slow     # three plans: ~8 s here
def test_a_plan_adds_availability_spares_per_pool():
    work = Workload(rate=200.0, prompt=LengthDist.fixed(1000), output=LengthDist.fixed(200))
    slo = Slo(ttft_p99=1.0, itl_p99=0.05)
    base = dict(model="Llama-3.1-8B", gpu="H100-SXM", tp=1, mode="disaggregated")
    plain = plan(PlanRequest(**base), work, slo)
    available = plan(PlanRequest(**base, availability=0.99999, gpu_failures_per_hour=1e-4, repair_hours=48), work, slo)
    for p, a in zip(plain.pools, available.pools, strict=True):
        assert p.spares == 0
        assert a.workers - a.spares == p.workers           # the same serving pool
        assert a.spares == spares.spares(p.workers, 1, 0.99999, 1e-4, 48)
    assert available.gpus == plain.gpus + sum(a.spares for a in available.pools)
    assert any("availability" in note for note in available.notes)
    floor = plan(PlanRequest(**base, availability=0.9, redundancy=3), work, slo)
    assert all(pool.spares >= 3 for pool in floor.pools)    # redundancy stays a floor


def test_an_availability_outside_zero_to_one_is_refused():
    with pytest.raises(PlannerError):
        PlanRequest(model="Llama-3.1-8B", gpu="H100-SXM", availability=1.0)
    with pytest.raises(PlannerError):
        PlanRequest(model="Llama-3.1-8B", gpu="H100-SXM", availability=0.999, repair_hours=math.inf)
