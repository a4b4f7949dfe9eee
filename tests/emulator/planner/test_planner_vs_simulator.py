"""The planner's max sustainable rate at SLO agrees with the simulator's: the default spec within
15%, the disaggregated spec (in steady state) and clusters drawn at random (loadtests.planner_draws)
within 10%.

The simulator runs the workers' engine and the router's policies; the planner is closed-form. Both
read the same spec and workload. Rates step around the planner's C_max with 2,000 measured requests
each (design 3b: compare where p99 crosses the SLO, from open-loop Poisson runs).
"""
import pytest

from emulator.spec import load_spec
from loadtests.capacity_check import check

pytestmark = pytest.mark.slow   # each spec simulates a rate sweep: 25-40 s


def test_planner_cmax_within_15_percent_of_the_simulators():
    result = check(load_spec("default"))
    assert result.sim_bound == "interpolated", result   # the simulated p99s cross the SLO inside the bracket
    assert abs(result.gap) <= 0.15, result


def test_disaggregated_cmax_within_10_percent_of_the_steady_state_simulators():
    """disagg-70b-h100 prefills ~88% of its requests on their decode workers (conditional
    disaggregation). Its decode slots fill over minutes, so each rate runs in its steady state
    (sim_curve.steady: 40-50 s of CPU a rate); a fixed 2,000 requests read 86 req/s, the steady
    state 71.3 (planned 71.2). Two rates, 8% either side of the plan, run side by side: the simulator
    must meet the SLO at the lower and miss it at the upper, so its C_max is within 8% of the plan."""
    result = check(load_spec("disagg-70b-h100"), factors=(0.92, 1.08), steady=True)
    assert result.sim_bound == "interpolated", result   # met at 0.92 x plan, missed at 1.08 x plan
    assert abs(result.gap) <= 0.10, result


@pytest.mark.parametrize("index", [10, 13])
def test_planner_cmax_within_10_percent_on_drawn_clusters(index):
    """Two of benchmarks/planner_vs_sim.py's fixed-seed random clusters, ITL-bound and cheap to
    simulate (short request lifetimes): a disaggregated 8B TP2 one with a 2,048-token budget and a chat
    + RAG mix (its prefixes hit or missed), and a colocated 8B one whose mixed steps set the ITL tail
    (+10.8% before they were spread by the decodes and the chunk's place in its prompt). Each rate is
    simulated for 100 request lifetimes, with more requests while the simulated C_max is noisier than 3%.
    Draw #11 (70B TP4, disaggregated) stood here before: after a 0.1% move of its plan, 2,000 requests
    read 4.0% noise and its windows' halves 13% apart, and it took 3,911 requests (150 s of the suite)
    to settle (draw #10: 0.7% noise at 2,000, halves 1.6% apart, 5 CPU s). The benchmark runs all 30."""
    from loadtests import planner_draws
    draw = planner_draws.draws(12, index + 1)[index]
    result = planner_draws.quiet(draw, requests=2000, target=0.03)   # more requests while noisier than 3%
    assert result.bound == "interpolated", result
    assert result.noise is not None and result.noise < 0.03, result
    assert abs(result.gap) <= 0.10, result


def test_planner_cmax_within_10_percent_with_conditional_disaggregation():
    """A drawn disaggregated cluster (8B, A100 TP2, chat and code) with pd_pair prefilling prompts
    with fewer than 512 uncached tokens on their decode worker (~56% of requests): the planner costs
    those prefills in the decode worker's mixed steps (planned 11.0 req/s, simulated 10.4, ITL-bound)."""
    import dataclasses

    from loadtests import planner_draws
    draw = dataclasses.replace(planner_draws.draws(12, 8)[7], local_prefill_tokens=512)
    result = planner_draws.quiet(draw, requests=2000, target=0.03)   # more requests while noisier than 3%
    assert result.bound == "interpolated", result
    assert result.noise is not None and result.noise < 0.03, result
    assert abs(result.gap) <= 0.10, result
