"""The planner at the edges of its range, where fleets are sized: each case a defect once found,
checked against the simulator (the arbiter) or against the queue's own stability."""
import math

import pytest

from emulator import planner
from emulator.engine_config import EngineConfig
from emulator.planner import LengthDist, PlanRequest, Slo, Workload, colocated, context, decode
from emulator.spec import parse_spec
from loadtests import sim_curve

FIXED_8B_SMALL_CHUNK = '''
name = "8b-small-chunk"
model = "Llama-3.1-8B"
gpu = "H100-SXM"
[engine]
max_num_batched_tokens = 512
[[pools]]
role = "both"
count = 1
[router]
policy = "round_robin"
shedding = false
[slo]
ttft_p99_s = 0.2
itl_p99_s = 0.025
[workload]
mix = { chat = 1.0 }
warmup_s = 20
duration_s = 600
[workload.params.chat]
shared_count = 1
shared_len = { median = 1, sigma = 0 }
unique_len = { median = 1023, sigma = 0 }
output_len = { median = 256, sigma = 0 }
'''


def small_chunk_inputs():
    req = PlanRequest(model="Llama-3.1-8B", gpu="H100-SXM", engine=EngineConfig(max_num_batched_tokens=512))
    work = Workload(rate=1.0, prompt=LengthDist.fixed(1024), output=LengthDist.fixed(256))
    return req, work, Slo(ttft_p99=0.2, itl_p99=0.025)


def test_batch_solver_finds_the_smallest_root_without_assuming_concavity():
    # h rises through 0 at b = 30, then turns -inf past 200 (a batch that starves prefill): the old
    # solver looked only at h(cap) and called this saturated
    h = lambda b: b - 30.0 if b < 200 else -math.inf  # noqa: E731
    assert decode.solve_batch(h, 256.0) == pytest.approx(30.0, rel=1e-3)
    assert decode.solve_batch(lambda b: -1.0, 256.0) is None
    assert decode.solve_batch(lambda b: b + 1.0, 256.0) == 0.0


def test_slot_wait_exists_when_the_chunk_budget_leaves_no_room_at_the_sequence_cap():
    # 512-token budget, 256-sequence cap: with every slot running, prefill gets 256 tokens a step and
    # cannot keep up at 19 req/s; the running count still has a steady state well below the cap
    req, work, _ = small_chunk_inputs()
    ctx = context.build(req, work)
    point = colocated.evaluate(ctx, 19.0)
    assert point.stable and point.batch < 0.5 * 256
    assert colocated.slot_wait(ctx, 19.0) is not None


@pytest.mark.slow
def test_colocated_8b_small_chunk_cmax_agrees_with_the_simulator():
    req, work, slo = small_chunk_inputs()
    cap = planner.capacity(req, work, slo)
    assert cap.binding == "ttft_slo"          # not a roofline ceiling: the TTFT SLO fails first
    spec = parse_spec(FIXED_8B_SMALL_CHUNK)
    below, above = sim_curve.curve(spec, [0.9 * cap.max_rate, 1.1 * cap.max_rate], 3000)   # side by side
    assert below.ttft.p99 <= slo.ttft_p99 and below.itl.p99 <= slo.itl_p99      # the sim holds the SLO 10% below
    assert above.ttft.p99 > slo.ttft_p99 or above.itl.p99 > slo.itl_p99         # and breaks it 10% above


def rag_70b_inputs():
    req = PlanRequest(model="Llama-3.1-70B", gpu="H100-SXM", tp=4, mode="disaggregated")
    work = Workload(rate=1.0, prompt=LengthDist.fixed(8192), output=LengthDist.fixed(256))
    return req, work, Slo(ttft_p99=2.0, itl_p99=0.1)


def catalog_with_compute(scale: float):
    import msgspec

    from emulator.physics.catalog import Catalog, builtin_catalog
    base = builtin_catalog()
    gpu = base.gpu("H100-SXM")
    gpus = {**base.gpus, gpu.name: msgspec.structs.replace(gpu, compute_efficiency=gpu.compute_efficiency * scale)}
    return Catalog(gpus=gpus, links=dict(base.links), models=dict(base.models))


def test_prefill_ttft_percentiles_rise_with_load_all_the_way_to_saturation():
    # M/D/1 with 0.5 s services: the p99 law once fell to 0.74 s at 99.9% load and to 0 past 99.999%
    from emulator.planner import prefill, prefill_queue
    req, work, _ = rag_70b_inputs()
    ctx = context.build(req, work)
    prof = prefill.profile(ctx, 0)
    ceiling = 1.0 / prof.mean_share(ctx)
    last = 0.0
    for load in (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999):
        q = prefill_queue.queue(ctx, prof, load * ceiling, 1)
        p99 = q.ttft_quantile(0.99)
        assert math.isfinite(p99) and p99 >= last, (load, p99, last)
        assert p99 >= q.mean_wait        # an exponential-ish wait's p99 is a few of its means
        last = p99


@pytest.mark.parametrize("scale", [0.995, 0.998, 1.0, 1.002, 1.005])
def test_70b_rag_prefill_pool_is_bound_by_the_ttft_slo_at_any_catalog(scale):
    req, work, slo = rag_70b_inputs()
    plan = planner.plan(req, work, slo, catalog=catalog_with_compute(scale))
    pool = next(p for p in plan.pools if p.role == "prefill")
    ctx = context.build(req, work, catalog_with_compute(scale))
    from emulator.planner import prefill
    ceiling = 1.0 / prefill.profile(ctx, 0).mean_share(ctx)
    assert pool.binding == "ttft_slo"
    assert pool.max_rate_per_worker < 0.5 * ceiling


RAG_70B = '''
name = "70b-rag"
model = "Llama-3.1-70B"
gpu = "H100-SXM"
tp = 4
[[pools]]
role = "prefill"
count = 1
[[pools]]
role = "decode"
count = 1
[router]
policy = "pd_pair"
shedding = false
[slo]
ttft_p99_s = 2.0
itl_p99_s = 0.1
[workload]
mix = { rag = 1.0 }
warmup_s = 60
duration_s = 4000
[workload.params.rag]
shared_count = 1
shared_len = { median = 1, sigma = 0 }
unique_len = { median = 8191, sigma = 0, high = 8191 }
output_len = { median = 256, sigma = 0 }
'''


@pytest.mark.slow
def test_70b_rag_cmax_agrees_with_the_simulator():
    req, work, slo = rag_70b_inputs()
    best = planner.capacity(req, work, slo).max_rate
    spec = parse_spec(RAG_70B)
    below, above = sim_curve.curve(spec, [0.9 * best, 1.1 * best], 1500)   # each rate simulated alone, side by side
    assert below.ttft.p99 <= slo.ttft_p99 < above.ttft.p99


@pytest.mark.parametrize("model,tp,prompt", [("Llama-3.1-8B", 1, 256), ("Llama-3.1-70B", 4, 4096)])
def test_a_packed_prefill_step_costs_its_prompts_as_separate_sequences(model, tp, prompt):
    # An 8192-token step of 32 x 256 (8B) or 2 x 4096 (70B) prompts: each prompt attends over its
    # own tokens, so the step is the roofline of that many sequences, not of one 8192-token sequence
    from emulator.physics import roofline
    from emulator.planner import prefill
    req = PlanRequest(model=model, gpu="H100-SXM", tp=tp, mode="disaggregated")
    ctx = context.build(req, Workload(rate=1.0, prompt=LengthDist.fixed(prompt), output=LengthDist.fixed(64)))
    n = 8192 // prompt
    shape = roofline.BatchShape()
    for _ in range(n):
        shape.add(prompt, 0, samples=True)
    by_hand = roofline.step_time(ctx.dep, shape).seconds
    assert prefill.profile(ctx, 0).mean_share(ctx) == pytest.approx(by_hand / n, rel=1e-6)
    assert prefill.profile(ctx, 0).full_step.seconds == pytest.approx(by_hand, rel=1e-6)


def test_little_law_concurrency_uses_the_mean_ttft():
    # M/D/1 prefill (8192-token prompts fill each step alone): mean wait rho S / (2 (1 - rho)) by
    # Pollaczek-Khinchine; the median TTFT is below the mean, which Little's law needs
    from emulator.planner import Cluster, prefill
    from emulator.planner.operating import evaluate
    req, work, slo = rag_70b_inputs()
    ctx = context.build(req, work)
    s = prefill.profile(ctx, 0).mean_alone(ctx)
    rate = 0.9
    op = evaluate(ctx, Cluster(prefill=1, decode=1), rate, slo)
    rho = rate * s
    assert op.ttft_mean == pytest.approx(s + rho * s / (2 * (1 - rho)), rel=0.02)
    assert op.ttft_mean > op.ttft_p50
    cap = planner.capacity(req, work, slo)
    assert cap.concurrency == pytest.approx(
        cap.max_rate * (cap.at_max.ttft_mean + ctx.decode_tokens * cap.at_max.itl_mean), rel=1e-9)


def test_the_kv_pool_is_whole_blocks_as_the_engine_allocates_it():
    from emulator.spec import load_spec
    from loadtests import planner_bridge
    spec = load_spec("default")
    req, work, _, _ = planner_bridge.planner_inputs(spec)
    ctx = context.build(req, work, spec.catalog_data())
    assert ctx.pool_tokens == spec.kv_blocks(spec.pools[0]) * spec.engine.block_size


def test_a_plan_with_cached_prefixes_notes_the_kv_sharing_assumption():
    req, _, slo = small_chunk_inputs()
    work = Workload(rate=5.0, prompt=LengthDist.fixed(2048), output=LengthDist.fixed(128), prefix_reuse=0.5)
    assert any("kv_sharing" in n for n in planner.plan(req, work, slo).notes)
    plain = Workload(rate=5.0, prompt=LengthDist.fixed(2048), output=LengthDist.fixed(128))
    assert not any("kv_sharing" in n for n in planner.plan(req, plain, slo).notes)


def test_prompt_points_keep_the_tail_of_new_tokens_in_a_mix():
    # RAG prompts (a cached 3,000-token document + a short question) beside code prompts (a short
    # cached system prompt + a long new context), their lengths overlapping: binning by prompt length
    # and averaging the hits gave every bin half a document's hit and cut the new tokens' tail
    import numpy as np

    from emulator.planner import dist
    rng = np.random.default_rng(3)
    n = 4000
    rag = rng.random(n) < 0.5
    shared = np.where(rag, np.round(3000 * np.exp(0.3 * rng.standard_normal(n))), 300).astype(int)
    unique = np.where(rag, 60, np.round(1500 * np.exp(0.7 * rng.standard_normal(n)))).astype(int)
    prompts = shared + unique
    work = Workload.from_samples(1.0, prompts.tolist(), [100] * n, shared=shared.tolist())
    ctx = context.build(PlanRequest(model="Llama-3.1-8B", gpu="H100-SXM"), work)
    planned = dist.Points(ctx.new_tokens, ctx.prompts.weights)
    new = prompts - np.floor(np.minimum(shared, prompts - 1) / 16) * 16
    for q in (0.75, 0.9, 0.99):      # (the median sits on the jump between the two kinds)
        assert planned.quantile(q) == pytest.approx(np.quantile(new, q), rel=0.05)
    assert planned.mean() == pytest.approx(new.mean(), rel=1e-3)
