"""The decode batch as the engine runs it: every sequence slows every other, so the number running
is the birth-death law (wider than Poisson), and a remote prefill joins the batch a whole step after
the step that admits it."""
import math

import pytest

from emulator.planner import context, decode
from loadtests import planner_bridge
from loadtests.planner_draws import Draw

# benchmarks/planner_vs_sim.py's draw 16 (seed 12): an 8B decode worker on an MI300X, RAG prompts,
# 0.2 ms KV transfers beside 5.4 ms steps; the engine runs ~13 sequences at 14 req/s
RAG_DECODE = Draw(index=16, model="Llama-3.1-8B", gpu="MI300X", tp=1, mode="disaggregated", budget=2048,
                  max_num_seqs=64, mix={"rag": 1.0}, ttft_slo=0.00996, itl_slo=0.0069)
RATE = 14.0


@pytest.fixture(scope="module")
def ctx():
    spec = RAG_DECODE.spec()
    req, work, _, _ = planner_bridge.planner_inputs(spec)
    return context.build(req, work, spec.catalog_data())


def test_the_running_count_is_the_birth_death_law_of_sequences_that_slow_each_other(ctx):
    """With a step of n sequences taking a + c n, pi(n) ~ (rate E c)^n Gamma(n + a/c + 1) / n!: a
    negative binomial, variance / mean = 1 / (1 - rate E c), and its mean is Little's fixed point."""
    pool = decode.disaggregated(ctx, RATE)
    law = pool.running
    assert law is not None
    mean = law.mean()
    assert mean == pytest.approx(pool.batch, rel=0.01)
    c = decode.step_seconds(ctx, 20) - decode.step_seconds(ctx, 19)
    expected = 1.0 / (1.0 - RATE * ctx.decode_tokens * c)
    assert expected > 1.3                               # the case: clearly wider than Poisson
    assert (law.moment2() - mean ** 2) / mean == pytest.approx(expected, rel=0.1)


def test_decode_steps_tail_follows_the_wider_law(ctx):
    pool = decode.disaggregated(ctx, RATE)
    poisson = decode.decode_only_gaps(ctx, pool.batch)
    law = decode.decode_only_gaps(ctx, pool.batch, pool.running)
    assert law.mean() == pytest.approx(poisson.mean(), rel=0.01)
    # 6.51 ms against 6.33 (the engine measured 6.87 before the step model was refitted)
    assert law.quantile(0.99) > poisson.quantile(0.99) * 1.02


def test_a_short_transfer_still_costs_the_admission_step(ctx):
    """Residual of the step in progress, the step that admits it (the transfer runs beside it), the
    step that carries it: 2.5 steps when the transfer is shorter than a step."""
    pool = decode.disaggregated(ctx, RATE)
    assert pool.transfers.values.max() < 0.2 * pool.itl_mean     # at most 0.75 ms beside 5.4 ms steps
    gap = decode.first_gap(ctx, pool)
    assert gap.mean() == pytest.approx(2.5 * pool.itl_mean, rel=0.02)
    assert math.isfinite(gap.quantile(0.99))


def test_token_one_lands_at_any_phase_of_the_step_in_progress(ctx):
    """The residual of the step in progress is uniform over a step: first gaps spread over two to three
    steps (when the transfer is shorter than a step), not one value at 2.5."""
    pool = decode.disaggregated(ctx, RATE)
    gap = decode.first_gap(ctx, pool)
    s = pool.itl_mean
    assert gap.values.min() < 2.1 * s and gap.values.max() > 2.9 * s
    assert gap.quantile(0.05) == pytest.approx(2.05 * s, rel=0.03)


def test_itl_p99_where_first_gaps_are_about_one_percent_of_gaps_stays_at_two_steps():
    """96-token answers make first gaps 1.05% of all gaps, so the p99 lies among the first gaps, ~2 steps.
    With first gaps as one value the p99 flipped between the decode steps' tail and that value as
    the batch grew (70B TP4: 28 ms at 20 req/s, 47 ms at 25, 28 ms at 40)."""
    from emulator.planner import Cluster, LengthDist, PlanRequest, Workload
    from emulator.planner.operating import evaluate
    w = Workload(rate=1, prompt=LengthDist.fixed(50), output=LengthDist.fixed(96), prefix_reuse=0.0)
    big = context.build(PlanRequest(model="Llama-3.1-70B", gpu="H100-SXM", tp=4, mode="disaggregated"), w)
    for rate in (20.0, 25.0, 40.0):
        op = evaluate(big, Cluster(prefill=1, decode=1), rate)
        assert 1.8 * op.itl_mean < op.itl_p99 < 2.3 * op.itl_mean, (rate, op.itl_mean, op.itl_p99)
