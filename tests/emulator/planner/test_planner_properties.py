"""Planner invariants (hypothesis): more traffic never needs fewer GPUs (where bigger batches never step
faster); a looser SLO never more."""
import math

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from emulator.planner import LengthDist, PlannerError, PlanRequest, Slo, Workload, context, decode, sizing
from emulator.planner.api import check_feasible

MODES = st.sampled_from([("Llama-3.1-8B", 1, "colocated"), ("Llama-3.1-8B", 1, "disaggregated"),
                         ("Llama-3.1-70B", 4, "disaggregated"), ("Llama-3.1-70B", 4, "colocated")])
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gpus(deployment, prompt, output, reuse, rate, slo) -> int | None:
    ctx = _context(deployment, prompt, output, reuse, rate)
    try:
        check_feasible(ctx, slo)
        return sizing.size(ctx, slo, rate).cluster.gpus(deployment[1])
    except PlannerError:
        return None


def _context(deployment, prompt, output, reuse, rate):
    model, tp, mode = deployment
    w = Workload(rate=rate, prompt=LengthDist.fixed(prompt), output=LengthDist.fixed(output), prefix_reuse=reuse)
    return context.build(PlanRequest(model=model, gpu="H100-SXM", tp=tp, mode=mode), w)


def _bigger_batches_never_step_faster(ctx, most: int) -> bool:
    """Decode steps of 1..most sequences never get faster as the batch grows. Measured physics need not
    obey: the 4-GPU all-reduce curve falls at ~1.1 MiB (NCCL changes algorithm there), so a 70B TP4
    decode step of 66 sequences runs ~8% faster than one of 65, and a rate whose batch sits past that
    fall can need fewer decode workers than a lower rate's (70B TP4, 50-token prompts, 96-token
    answers, ITL p99 31 ms: 12 GPUs at 22 req/s, 8 at 44)."""
    times = [decode.step(ctx, n).seconds for n in range(1, most + 1)]
    return all(b >= a for a, b in zip(times, times[1:], strict=False))


@FAST
@given(MODES, st.integers(50, 6000), st.integers(2, 800), st.sampled_from([0.0, 0.5, 0.9]),
       st.floats(0.5, 60), st.floats(1.05, 3.0), st.floats(0.5, 4.0), st.floats(0.03, 0.2))
def test_more_rate_never_needs_fewer_gpus(dep, prompt, output, reuse, rate, factor, ttft, itl):
    slo = Slo(ttft_p99=ttft, itl_p99=itl)
    low = gpus(dep, prompt, output, reuse, rate, slo)
    assume(low is not None)
    ctx = _context(dep, prompt, output, reuse, rate)
    most = min(ctx.limits.max_num_seqs, math.ceil(rate * factor * output * itl))  # Little: batch <= rate x tokens x ITL
    assume(_bigger_batches_never_step_faster(ctx, most))
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


DEPLOYMENTS = st.sampled_from([("Llama-3.1-8B", 1, "colocated"), ("Llama-3.1-8B", 1, "disaggregated"),
                               ("Llama-3.1-70B", 4, "disaggregated"), ("Llama-3.1-70B", 4, "colocated"),
                               ("Llama-3.1-70B", 8, "colocated")])
# 8 examples: each drawn cluster costs a full capacity search (~10 s of the suite each on a 2-core host).
SOME = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=[Phase.explicit, Phase.reuse, Phase.generate],   # no shrinking: each example is slow
                # The same examples on every host: known defects are pinned below, not rediscovered by chance.
                derandomize=True)


def drawn_context(dep, prompt, sigma, output, budget, seqs):
    model, tp, mode = dep
    from emulator.engine_config import EngineConfig
    w = Workload(rate=1.0, prompt=LengthDist(p50=prompt, sigma=sigma, max=16000),
                 output=LengthDist(p50=output, sigma=0.6, max=2000))
    req = PlanRequest(model=model, gpu="H100-SXM", tp=tp, mode=mode,
                      engine=EngineConfig(max_num_batched_tokens=budget, max_num_seqs=seqs))
    try:
        return context.build(req, w)
    except PlannerError:
        return None


def one_cluster(ctx):
    from emulator.planner import Cluster
    return Cluster(workers=1) if ctx.mode == "colocated" else Cluster(prefill=1, decode=1)


@pytest.mark.slow
@SOME
@given(DEPLOYMENTS, st.integers(100, 8000), st.floats(0.0, 1.0), st.integers(16, 600),
       st.sampled_from([256, 512, 2048, 8192]), st.sampled_from([32, 256, 1024]))
def test_planned_percentiles_never_fall_as_the_rate_rises(dep, prompt, sigma, output, budget, seqs):
    from emulator.planner.operating import CEILINGS, evaluate
    ctx = drawn_context(dep, prompt, sigma, output, budget, seqs)
    assume(ctx is not None)
    cluster = one_cluster(ctx)
    ceiling = sizing.max_rate(ctx, None, cluster, only=CEILINGS)
    # ITL too, except a colocated worker whose step budget binds: there b decodes leave budget - b
    # prefill tokens a step, and the roofline's full step can get cheaper as decodes replace late
    # chunks of long prompts (their attention over thousands of cached tokens)
    # (p99s: the percentiles the SLOs and C_max read; the median: the colocated cases below)
    names = ("ttft_p99",) if ctx.mode == "colocated" and budget < 2048 else ("ttft_p99", "itl_p99")
    # colocated: up to 90% of the ceiling here (to 99% in the once-failing cases below)
    loads = (0.05, 0.2, 0.4, 0.6, 0.8, 0.9) + ((0.95, 0.99, 0.999) if ctx.mode == "disaggregated" else ())
    last = None
    for load in loads:
        op = evaluate(ctx, cluster, load * ceiling)
        now = [getattr(op, name) for name in names]
        if last is not None:
            for name, a, b in zip(names, last, now, strict=True):
                assert b >= a * (1 - 1e-3), (name, load, a, b)   # grid rounding: 0.1%
        last = now


@pytest.mark.slow
@SOME
@given(DEPLOYMENTS, st.integers(100, 8000), st.floats(0.0, 1.0), st.integers(16, 600),
       st.sampled_from([256, 512, 2048, 8192]), st.sampled_from([32, 256, 1024]), st.floats(1.2, 20.0),
       st.floats(1.2, 6.0))
def test_cmax_never_exceeds_any_pools_service_ceiling(dep, prompt, sigma, output, budget, seqs, loose_ttft, loose_itl):
    from emulator.planner import decode, prefill
    from emulator.planner.operating import evaluate
    ctx = drawn_context(dep, prompt, sigma, output, budget, seqs)
    assume(ctx is not None)
    cluster = one_cluster(ctx)
    idle = evaluate(ctx, cluster, 1e-6)
    slo = Slo(ttft_p99=idle.ttft_p99 * loose_ttft, itl_p99=idle.itl_p99 * loose_itl)
    # capacity()'s max_rate, on this context: the same feasibility check and search, without the
    # per-constraint limits and the binding constraint it also reports (most of its CPU)
    try:
        check_feasible(ctx, slo)
    except PlannerError:
        return
    best = sizing.max_rate(ctx, slo, cluster)
    if best <= 0:
        return
    prefill_ceiling = 1.0 / prefill.profile(ctx, 0).mean_share(ctx)      # 1/S of a prefill worker
    assert best <= prefill_ceiling * (1 + 1e-9)
    if ctx.mode == "disaggregated":   # the decode pool's: b / (tokens x ITL(1 + b)), best over b <= cap
        tokens = max(ctx.decode_tokens, 1e-9)
        decode_ceiling = max(b / (tokens * decode.step_seconds(ctx, 1.0 + b)) for b in range(1, seqs + 1))
        assert best <= decode_ceiling * (1 + 1e-9)


# Colocated cases where the planned percentiles once fell as the load rose, each with its cause (now fixed):
COLOCATED_DIPS = [
    # the TTFT median fell ~3% from 50% to 70% load: a slot wait of probability 2e-6 reaching seconds had
    # stretched the latency grid (cells of 2 ms under a 42 ms median), and its sum with the prefill
    # latency was re-binned on the quantile grid
    pytest.param(("Llama-3.1-70B", 4, "colocated"), (195, 0.7568806843058635, 530, 8192, 32), id="median"),
    # near saturation TTFT p99 fell: a mean packing rounded up to whole blocks past the step budget costed
    # steps the engine never runs (past a GEMM tile), and the batch fixed point jumped with it
    pytest.param(("Llama-3.1-8B", 1, "colocated"), (4429, 0.9238176165383043, 19, 2048, 1024), id="near-saturation"),
    # the same with a small step budget, earlier (5.44 s -> 5.00 s between 60% and 80% load)
    pytest.param(("Llama-3.1-70B", 4, "colocated"), (2559, 0.7911145766869572, 75, 512, 256), id="small-budget"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dep, drawn", COLOCATED_DIPS)
def test_colocated_ttft_percentiles_rise_with_load_up_to_saturation(dep, drawn):
    from emulator.planner.operating import CEILINGS, evaluate
    ctx = drawn_context(dep, *drawn)
    cluster = one_cluster(ctx)
    ceiling = sizing.max_rate(ctx, None, cluster, only=CEILINGS)
    last = None
    for load in (0.05, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99):
        op = evaluate(ctx, cluster, load * ceiling)
        assert op.stable, load
        now = (op.ttft_p50, op.ttft_p99)
        if last is not None:
            assert now[0] >= last[0] and now[1] >= last[1], (load, last, now)
        last = now
