"""The prefill queue's TTFT tail on a drawn cluster whose p99 TTFT is flat in rate just under its SLO
(benchmarks/planner_vs_sim.py draw #0: Llama-3.1-70B on 2 x H200, disaggregated, 512-token steps,
mostly code prompts of up to 16K tokens). There a few percent of p99 TTFT are tens of percent of C_max,
so the planned p99 must be the simulator's, not a bound on it."""
import pytest

from emulator.planner import context, operating
from loadtests import planner_bridge, planner_draws

DRAW = planner_draws.Draw(index=0, model="Llama-3.1-70B", gpu="H200", tp=2, mode="disaggregated", budget=512,
                          max_num_seqs=1024, mix={"rag": 0.2138, "code": 0.6794, "agentic": 0.1067},
                          ttft_slo=1.4546, itl_slo=0.0681)
# The simulator's p99 TTFT at these rates, 20,000 measured requests each after the warm-up
# (loadtests.planner_draws.simulate's arrivals; its p99 sd over 3,000-request windows is ~8%,
# over 20,000 ~3%: the planned p99 within 6%). At 0.2 req/s, nearly no waiting: 1.037 s (planned 1.044 s).
SIMULATED_TTFT_P99 = {1.45: 1.343, 1.66: 1.450}


@pytest.fixture(scope="module")
def planned():
    spec = DRAW.spec()
    req, work, cluster, slo = planner_bridge.planner_inputs(spec)
    ctx = context.build(req, work, spec.catalog_data())
    return {rate: operating.evaluate(ctx, cluster, rate, slo) for rate in SIMULATED_TTFT_P99}


@pytest.mark.parametrize("rate", sorted(SIMULATED_TTFT_P99))
def test_planned_ttft_p99_is_the_simulators_where_the_wait_tail_sets_it(planned, rate):
    # With 4,000 sampled requests the planner's p99 prompt was 9,878 tokens (the stream's: 9,160)
    # and its p99 TTFT 1.60 s at 1.45 req/s and 1.66 s at 1.66 (C_max 1.16 req/s, simulated 1.66).
    assert planned[rate].ttft_p99 == pytest.approx(SIMULATED_TTFT_P99[rate], rel=0.06)
