"""Colocated mixed steps as the engine runs them: never past the step budget, and spread as the
decodes and the chunk's place in its prompt spread them (the colocated ITL p99 reads their tail)."""
import pytest

from emulator.planner import colocated, context, prefill
from loadtests import planner_bridge
from loadtests.planner_draws import Draw
from tests.emulator.planner.drawn import context_at

# benchmarks/planner_vs_sim.py's draw 22 (seed 12): a 256-token budget beside ~20 decodes of code
# prompts (2.2K tokens on average: nine chunks each, the late ones attending over thousands of tokens)
SMALL_BUDGET_CODE = Draw(index=22, model="Llama-3.1-8B", gpu="H100-SXM", tp=2, mode="colocated", budget=256,
                         max_num_seqs=256, mix={"code": 1.0}, ttft_slo=1.5658, itl_slo=0.009789)
RATE = 3.87    # req/s: ~20 running, prefill in ~30% of the time (the simulator's and the planner's)


@pytest.fixture(scope="module")
def ctx():
    spec = SMALL_BUDGET_CODE.spec()
    req, work, _, _ = planner_bridge.planner_inputs(spec)
    return context.build(req, work, spec.catalog_data())


@pytest.fixture(scope="module")
def point(ctx):
    return colocated.evaluate(ctx, RATE)


def test_a_packed_step_never_carries_more_than_the_budget(ctx, point):
    """The mean packing is memoized on whole KV blocks; rounding 235 tokens up to 240 costed a step
    of 261 tokens that the engine never runs (past a GEMM tile: 11.0 ms instead of 9.4)."""
    prof = prefill.profile(ctx, int(round(point.batch)))
    assert prof.budget % ctx.limits.block_size != 0       # the case: a budget off the block grid
    for n in (prof.budget - 3, prof.budget, prof.budget + 5):
        assert prefill.packed_tokens(ctx, prof, n) <= prof.budget
    ch = prof.chunks
    costliest = max(prefill.step_with(ctx, prof.decodes, int(t), int(c), bool(f), prof.budget - int(t)).seconds
                    for t, c, f in zip(ch.tokens, ch.cached, ch.final, strict=True))
    assert colocated._packed_step(ctx, prof, point.queue.packed) <= costliest


def test_mixed_steps_spread_at_least_as_the_decode_only_steps_do(ctx, point):
    """The decodes in a mixed step vary in number and context as in a decode-only step, and the
    chunk's own cached context varies too: the mixed steps' p50-p99 spread is at least the decode-only
    steps' (it was nil: every mixed step at the mean packing, ITL p99 9.4 ms where the engine's is 10.2)."""
    from emulator.planner import decode
    mixed = colocated._mixed_spread(ctx, point)
    steady = decode.decode_only_gaps(ctx, point.batch, point.running)
    assert mixed.quantile(0.99) - mixed.quantile(0.5) >= 0.95 * (steady.quantile(0.99) - steady.quantile(0.5))
    chunk_steps = prefill.profile(ctx, int(round(point.batch))).chunks.seconds
    assert mixed.quantile(0.99) > chunk_steps.max()     # decodes above the mean batch lengthen the costliest chunk


def _chunk_by_chunk(ctx, decodes: int) -> tuple[float, float, float]:
    """(chunks per prompt, mean share, mean alone time) with every chunk costed on its own."""
    budget = prefill._budget(ctx, decodes)
    count = share = alone = 0.0
    for new, cached, weight in zip(ctx.new_tokens, ctx.cached, ctx.prompts.weights, strict=True):
        done = 0
        while done < int(new):
            chunk = min(budget, int(new) - done)
            final = done + chunk >= int(new)
            t = prefill.step_with(ctx, decodes, chunk, int(cached) + done, final).seconds
            full = prefill.step_with(ctx, decodes, chunk, int(cached) + done, final, budget - chunk).seconds
            count, share, alone = count + weight, share + weight * full * chunk / budget, alone + weight * t
            done += chunk
    total = float(ctx.prompts.weights.sum())
    return count / total, share / total, alone / total


@pytest.mark.parametrize("decodes", [20, 240])
def test_a_nearly_used_budget_costs_few_chunk_rows_and_the_same_prefill_work(ctx, decodes):
    """Beside 240 decodes a 256-token budget leaves 16 tokens a chunk: ~140 chunks for a 2.2K-token
    prompt. The profile costs a prompt's full chunks in at most MAX_CHUNK_GROUPS groups (at 1,024
    sequences on this budget one capacity search took 168 CPU s and 3 GB); the chunk count, the
    prefill work and the time alone stay those of costing every chunk."""
    prof = prefill.profile(ctx, decodes)
    points = len(ctx.prompts.values)
    assert len(prof.chunks.tokens) <= points * (prefill.MAX_CHUNK_GROUPS + 1)
    per_prompt, share, alone = _chunk_by_chunk(ctx, decodes)
    w = ctx.prompts.weights / ctx.prompts.weights.sum()
    assert float(prof.chunks.weight.sum() / ctx.prompts.weights.sum()) == pytest.approx(per_prompt, rel=1e-9)
    assert float(prof.share @ w) == pytest.approx(share, rel=0.005)
    assert float(prof.alone @ w) == pytest.approx(alone, rel=0.005)


# benchmarks/planner_curve.py's seed-14 draw #5: chat + RAG prompts of ~70 new tokens beside ~69 decodes
# of a 70B TP8 H100, an 8,192-token budget; the simulator at 18.2 req/s (10,000 measured requests after
# the warm-up): TTFT p99 59.9 ms (its window's halves 0.1% apart), mixed steps p90 / p99 29.0 / 44.8 ms.
SHORT_PROMPTS_BIG_BUDGET = Draw(index=5, model="Llama-3.1-70B", gpu="H100-SXM", tp=8, mode="colocated", budget=8192,
                                max_num_seqs=128, mix={"chat": 0.1275, "rag": 0.8725}, ttft_slo=0.1119,
                                itl_slo=0.0576)


def test_the_step_an_arrival_waits_out_packs_as_many_prompts_as_arrive():
    # At the mean packing the step in progress had a p99 of 33.9 ms and the arrival's own step took
    # no one who came while it waited: TTFT p99 planned 52.7 ms, 12% under the simulator's 59.9.
    rate = 18.2
    ctx, cluster = context_at(SHORT_PROMPTS_BIG_BUDGET, rate)
    point = colocated.evaluate(ctx, rate, cluster.workers)
    assert colocated._mixed_packing(ctx, point).quantile(0.9) > 1.1 * point.mixed_steps.quantile(0.9)
    assert point.queue.ttft_quantile(0.99) == pytest.approx(0.0599, rel=0.10)
