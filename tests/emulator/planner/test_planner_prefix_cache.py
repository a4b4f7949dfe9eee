"""The planner's LRU prefix-cache model (Che's approximation) by hand, and against the simulator,
whose workers run the real block manager with its LRU eviction."""
import math

import msgspec
import numpy as np
import pytest

from emulator import workload
from emulator.planner import context, operating, prefix_cache
from emulator.sim.simulator import Simulator
from emulator.spec import example_spec_path, load_spec
from loadtests import planner_bridge


def test_characteristic_time_by_hand():
    # One prefix of 1,000 tokens asked for 0.01 times a second, 100 tokens/s of single-use blocks,
    # 5,000 tokens of room: 1000 (1 - e^-0.01T) + 100 T = 5000 -> T = 46.3 s (T = 46.3: 370.6 + 4630).
    # The prefix is found with probability 1 - e^-0.463 = 0.371.
    t = prefix_cache.characteristic_time(np.array([1000.0]), np.array([0.01]), 1.0, 100.0, 5000.0)
    assert t == pytest.approx(46.3, abs=0.05)
    assert -math.expm1(-0.01 * t) == pytest.approx(0.371, abs=0.002)
    # Everything fits and nothing else flows through: kept forever. No room: kept never.
    assert prefix_cache.characteristic_time(np.array([1000.0]), np.array([0.01]), 1.0, 0.0, 5000.0) == math.inf
    assert prefix_cache.characteristic_time(np.array([1000.0]), np.array([0.01]), 1.0, 100.0, -1.0) == 0.0


def spec_with(policy: str):
    spec = load_spec(example_spec_path("colocated-8b-h100"))
    settings = dict(spec.router.settings) if policy.startswith("prefix") else {}
    return msgspec.structs.replace(spec, router=msgspec.structs.replace(spec.router, policy=policy, settings=settings))


def planned_hit_rate(spec, rate: float) -> float:
    req, wl, cluster, slo = planner_bridge.planner_inputs(spec)
    ctx = context.build(req, wl)
    operating.evaluate(ctx, cluster, rate, slo)
    at = ctx.memo[("prefix_cache", cluster, rate)]
    return float(at.cached @ at.prompts.weights / (at.prompts.values @ at.prompts.weights))


def simulated_hit_rate(spec, rate: float) -> float:
    w = spec.workload
    end = w.warmup_s + 2000 / rate
    sim = Simulator(spec).run(workload.from_spec(spec, rate, duration_s=end))
    return sim.summary(window=(w.warmup_s, end)).prefix_hit_rate


@pytest.mark.slow
def test_spreading_prefixes_over_every_worker_costs_hits_as_the_simulator_finds():
    # Four 8B workers, 56 shared prefixes (two tenants, one salted) of up to ~3K tokens, Zipf-popular.
    # Round robin makes every worker cache every prefix, each asked for 4x less often, so the rare RAG
    # documents fall out of the LRU; prefix hashing keeps each on one worker.
    rate = 50.0
    spread, affine = spec_with("round_robin"), spec_with("prefix_bounded")
    planned = {"spread": planned_hit_rate(spread, rate), "affine": planned_hit_rate(affine, rate)}
    simulated = {"spread": simulated_hit_rate(spread, rate), "affine": simulated_hit_rate(affine, rate)}
    assert planned["spread"] < planned["affine"] - 0.03
    assert simulated["spread"] < simulated["affine"] - 0.03
    for how in planned:
        assert planned[how] == pytest.approx(simulated[how], abs=0.03), (how, planned, simulated)


def test_a_prefill_worker_caches_its_prompts_blocks_not_the_outputs():
    # The decode worker computes the output; the prefill worker's LRU sees each prompt's own full
    # blocks only, so its single-use flux is that, where a colocated worker's also has the output's.
    colocated = load_spec(example_spec_path("colocated-8b-h100"))
    disaggregated = load_spec(example_spec_path("disagg-70b-h100"))
    for spec, with_outputs in ((colocated, True), (disaggregated, False)):
        req, wl, _, _ = planner_bridge.planner_inputs(spec)
        pre = prefix_cache.prefixes(context.build(req, wl))
        block = spec.engine.block_size
        outputs = np.asarray(wl.output.samples, float)
        cached = pre.prompts + outputs if with_outputs else pre.prompts
        own = np.maximum(np.floor(cached / block) * block - pre.full_hit, 0).mean()
        assert pre.unique == pytest.approx(own)
        assert outputs.mean() > 50   # so the two differ


def test_a_prefix_is_found_whole_or_not_at_all():
    # Two samples: a 1,000-token prompt whose 800-token prefix is held a quarter of the time, and a
    # 2,000-token one with nothing to find. The first arrives as two prompts: 200 new tokens (weight
    # 0.25 x 1/2) or all 1,000 (0.75 x 1/2); never as one with 200 of its prefix's tokens cached on average.
    x, hits, weights = context.hit_or_miss(np.array([1000.0, 2000.0]), np.array([800.0, 0.0]), np.array([0.25, 1.0]))
    assert sorted(zip(x, hits, weights, strict=True)) == [(1000.0, 0.0, 0.375), (1000.0, 800.0, 0.125),
                                                          (2000.0, 0.0, 0.5)]
    assert context.hit_or_miss(np.array([1000.0]), np.array([800.0]), None)[1].tolist() == [800.0]


def test_binned_hit_or_miss_points_keep_the_expected_hit_and_the_misses_tail():
    # 10,000 prompts of 4,000 tokens whose 3,600-token prefixes are held 95% of the time: the planned
    # points hold 400 new tokens for 95% of requests and 4,000 for the 5% whose prefix is gone (the
    # expected hit, 3,420 cached, would give every request 580 new tokens and no tail at all).
    n = 10_000
    x, hits, weights = context.hit_or_miss(np.full(n, 4000.0), np.full(n, 3600.0), np.full(n, 0.95))
    points, cached = context.entry_points(x, hits, weights)
    new = points.values - cached
    assert float(cached @ points.weights) == pytest.approx(0.95 * 3600, rel=1e-9)
    assert points.weights[new >= 4000].sum() == pytest.approx(0.05, abs=1e-9)
    assert points.weights[new <= 400].sum() == pytest.approx(0.95, abs=1e-9)
