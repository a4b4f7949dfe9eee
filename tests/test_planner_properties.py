"""Planner invariants (hypothesis): more traffic never needs fewer GPUs; a looser SLO never more."""
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from emulator.planner import LengthDist, PlannerError, PlanRequest, Slo, Workload
from emulator.planner import context, sizing
from emulator.planner.api import check_feasible

MODES = st.sampled_from([("Llama-3.1-8B", 1, "colocated"), ("Llama-3.1-8B", 1, "disaggregated"),
                         ("Llama-3.1-70B", 4, "disaggregated"), ("Llama-3.1-70B", 4, "colocated")])
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gpus(deployment, prompt, output, reuse, rate, slo) -> int | None:
    model, tp, mode = deployment
    w = Workload(rate=rate, prompt=LengthDist.fixed(prompt), output=LengthDist.fixed(output), prefix_reuse=reuse)
    try:
        ctx = context.build(PlanRequest(model=model, gpu="H100-SXM", tp=tp, mode=mode), w)
        check_feasible(ctx, slo)
        return sizing.size(ctx, slo, rate).cluster.gpus(tp)
    except PlannerError:
        return None


@FAST
@given(MODES, st.integers(50, 6000), st.integers(2, 800), st.sampled_from([0.0, 0.5, 0.9]),
       st.floats(0.5, 60), st.floats(1.05, 3.0), st.floats(0.5, 4.0), st.floats(0.03, 0.2))
def test_more_rate_never_needs_fewer_gpus(dep, prompt, output, reuse, rate, factor, ttft, itl):
    slo = Slo(ttft_p99=ttft, itl_p99=itl)
    low = gpus(dep, prompt, output, reuse, rate, slo)
    assume(low is not None)
    high = gpus(dep, prompt, output, reuse, rate * factor, slo)
    assert high is not None and high >= low


@FAST
@given(MODES, st.integers(50, 6000), st.integers(2, 800), st.sampled_from([0.0, 0.5, 0.9]),
       st.floats(0.5, 60), st.floats(0.5, 4.0), st.floats(0.03, 0.2), st.floats(1.0, 3.0))
def test_looser_slo_never_needs_more_gpus(dep, prompt, output, reuse, rate, ttft, itl, loosen):
    tight = gpus(dep, prompt, output, reuse, rate, Slo(ttft_p99=ttft, itl_p99=itl))
    assume(tight is not None)
    loose = gpus(dep, prompt, output, reuse, rate, Slo(ttft_p99=ttft * loosen, itl_p99=itl * loosen))
    assert loose is not None and loose <= tight
