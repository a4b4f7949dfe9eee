"""A decode batch's total context is the sum of its sequences' contexts: with a few long prompts
decoding together that sum is skewed, and its tail sets how often a decode-only step overruns a tight
ITL SLO."""
import math

import numpy as np
import pytest

from emulator.planner import context, decode, dist
from loadtests import planner_bridge
from loadtests.planner_draws import Draw

# benchmarks/planner_vs_sim.py's draw 8 (seed 12): 8B on an MI300X, code prompts (heavy-tailed
# contexts), ~5 sequences running near its ITL-bound C_max
CODE = Draw(index=8, model="Llama-3.1-8B", gpu="MI300X", tp=1, mode="colocated", budget=4096, max_num_seqs=512,
            mix={"code": 1.0}, ttft_slo=1.12, itl_slo=0.00545)


@pytest.fixture(scope="module")
def ctx():
    spec = CODE.spec()
    req, work, _, _ = planner_bridge.planner_inputs(spec, 4000)
    return context.build(req, work, spec.catalog_data())


@pytest.mark.parametrize("n", [1, 5, 40])
def test_the_sum_of_n_contexts_has_n_times_their_mean_and_variance(ctx, n):
    one = decode.profile(ctx)
    total = decode.total_context(ctx, n)
    assert total.mean() == pytest.approx(n * one.context, rel=1e-6)
    assert total.moment2() - total.mean() ** 2 == pytest.approx(n * one.context_var, rel=0.03)


def test_a_few_heavy_tailed_contexts_sum_to_a_tail_past_a_normals(ctx):
    """Skewness falls as 1 / sqrt(n): the p99 sits past the normal's 2.33 sd for a handful of
    sequences and closes in on it for many (a normal by three points reached 1.73 sd at most)."""
    z99 = []
    for n in (1, 5, 15, 100):
        total = decode.total_context(ctx, n)
        sd = math.sqrt(total.moment2() - total.mean() ** 2)
        z99.append((total.quantile(0.99) - total.mean()) / sd)
    assert z99 == sorted(z99, reverse=True)
    assert z99[1] > 2.8 and z99[-1] > dist.normal_quantile(0.99)


def test_decode_only_gaps_read_the_batch_context_tail(ctx):
    """A gap's tail lies past the step of its batch at the mean context: the contexts' sum varies."""
    gaps = decode.decode_only_gaps(ctx, 4.8)
    batches = decode.batch_spread(ctx, 4.8)
    at_mean_context = batches.map(lambda n: decode.step_seconds(ctx, n))
    assert gaps.quantile(0.99) > at_mean_context.quantile(0.99)
    assert gaps.mean() == pytest.approx(at_mean_context.mean(), rel=0.02)   # step time is linear in context


def test_an_arrival_finds_the_running_sequences_without_itself(ctx):
    """A decode token sees itself and the others (1 + N); an arriving prompt finds N (PASTA), and
    the idle worker, where its prompt runs alone, is counted apart: the law is N given N >= 1."""
    law = dist.poisson(1.5)   # idle a fifth of the time
    token, arrival = decode.batch_spread(ctx, 1.5, law), decode.arrival_batches(ctx, 1.5, law)
    running = token.values - 1.0                              # N, as the token law spreads it
    idle = float(np.dot(1.0 - np.minimum(running, 1.0), token.weights))   # a point below 1 mixes 0 and 1
    assert 0.1 < idle < 0.3
    assert arrival.values.min() == 1.0
    assert arrival.mean() == pytest.approx(float(np.dot(running, token.weights)) / (1.0 - idle))
    assert arrival.mean() < token.mean() - 0.5
