"""The planner's two-level Che estimate of per-tier prefix hits against the simulator's engine."""
import msgspec
import numpy as np
import pytest

from emulator import traces
from emulator.planner.prefix_cache import characteristic_time
from emulator.planner.tiered_cache import TraceRequest, trace_tier_hits, two_level_hits
from emulator.sim.simulator import Simulator
from emulator.spec import load_spec
from loadtests.compare import whole_run

BS = 16
HBM_BLOCKS = 600


def zipf_trace(n=500, docs=40, seed=3) -> list[traces.TraceRecord]:
    """Requests over shared documents of two 512-token trace blocks each (Zipf popularity), with a
    unique 512-token question each, arriving every 0.5 s."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, docs + 1)
    picks = rng.choice(docs, size=n, p=weights / weights.sum())
    return [traces.TraceRecord(timestamp=500 * i, input_length=1536, output_length=8,
                               hash_ids=[2 * int(d), 2 * int(d) + 1, 10_000 + i]) for i, d in enumerate(picks)]


def simulated(records, host_kv_gb):
    spec = load_spec("default")
    spec = msgspec.structs.replace(spec, pools=[msgspec.structs.replace(spec.pools[0], count=1)],
                                   engine=msgspec.structs.replace(spec.engine, host_kv_gb=host_kv_gb))
    sim = Simulator(spec, policy="round_robin", num_blocks=HBM_BLOCKS).run(traces.trace_requests(records))
    summary = sim.summary(window=whole_run(sim))
    host = next(iter(sim.workers.values())).engine.blocks.host
    return summary, host.capacity if host else 0


def planned(records, host_blocks):
    reqs = [TraceRequest(r.arrival_s, r.prompt_len, r.block_hashes,
                         (r.prompt_len + r.max_tokens) // BS - r.prompt_len // BS)
            for r in traces.hashed_requests(records, block_size=BS)]
    return trace_tier_hits(reqs, BS, HBM_BLOCKS, host_blocks)


def test_two_level_che_agrees_with_the_simulator_per_tier():
    records = zipf_trace()
    summary, host_blocks = simulated(records, host_kv_gb=4.0)   # ~1,900 host blocks: about 3x HBM
    assert host_blocks > 2 * HBM_BLOCKS
    plan = planned(records, host_blocks)
    sim_hbm = summary.prefix_hit_rate - summary.host_hit_rate
    assert summary.host_hit_rate > 0.05   # the case exercises both tiers
    # Measured on this case: HBM 25.9% planned vs 26.9% simulated, host 23.2% vs 21.1% (the planner
    # ignores the blocks running requests pin, which shrinks the simulated caches a little).
    assert plan.hbm == pytest.approx(sim_hbm, rel=0.10)
    assert plan.host == pytest.approx(summary.host_hit_rate, rel=0.15)
    assert plan.total == pytest.approx(summary.prefix_hit_rate, rel=0.10)


def test_host_tier_raises_the_hit_rate_the_planner_predicts():
    records = zipf_trace()
    without, _ = simulated(records, host_kv_gb=0.0)
    with_host, host_blocks = simulated(records, host_kv_gb=4.0)
    assert without.host_hit_rate == 0.0
    assert with_host.prefix_hit_rate > without.prefix_hit_rate
    assert planned(records, 0).total == pytest.approx(without.prefix_hit_rate, rel=0.10)
    # The prefill the host tier saves: computed prompt tokens fall as the planner says.
    plan = planned(records, host_blocks)
    simulated_load = (1 - with_host.prefix_hit_rate) / (1 - without.prefix_hit_rate)
    assert plan.prefill_load == pytest.approx(simulated_load, rel=0.10)


def test_two_level_hits_split_one_lru_of_both_sizes():
    sizes, rates = np.array([100.0, 100.0, 100.0]), np.array([5.0, 1.0, 0.1])
    hbm, host = two_level_hits(sizes, rates, 1.0, 10.0, 150.0, 150.0)
    t_both = characteristic_time(sizes, rates, 1.0, 10.0, 300.0)
    assert np.all(host >= 0) and np.all(hbm + host <= 1)
    np.testing.assert_allclose(hbm + host, -np.expm1(-rates * t_both))
    assert hbm[0] > hbm[2] and host[2] > 0
