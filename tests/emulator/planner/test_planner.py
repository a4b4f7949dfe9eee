"""Hand-derived planner cases on the built-in H100 SXM step model (emulator/physics/data/gpus.toml): GEMMs as
128-token x 256-feature tiles (or 128 x 128) in waves over 132 SMs at 0.80 x 989.4 TFLOP/s, weights streamed at
0.9455 x 3.35 TB/s (the two overlapping imperfectly), KV read at 0.85 x 3.35 TB/s,
fixed kernel costs, 300 us per step and 8 us per sequence; TP=4 all-reduces on the NVLink4 curve
(size bands of latency + bytes / bandwidth, emulator/physics/data/interconnects.toml). Step times quoted below
are the step model's."""
import math

import msgspec
import pytest

from emulator.physics import roofline
from emulator.physics.catalog import builtin_catalog
from emulator.planner import (
    Cluster,
    LengthDist,
    PlannerError,
    PlanRequest,
    Slo,
    Workload,
    capacity,
    context,
    curve,
    decode,
    kv_capacity,
    operating,
    plan,
    prefill,
    prefill_queue,
    sizing,
)
from emulator.planner.cost import cost

CAT = builtin_catalog()
H100 = "H100-SXM"
L70_TP4 = dict(model="Llama-3.1-70B", gpu=H100, tp=4)


def fixed(rate, prompt, output, reuse=0.0):
    return Workload(rate=rate, prompt=LengthDist.fixed(prompt), output=LengthDist.fixed(output), prefix_reuse=reuse)


def test_decode_batch_is_the_littles_law_fixed_point():
    # Llama-3.1-8B, prompt 1000, 251 output tokens (250 decode steps), 20 req/s on one decode worker.
    # A running sequence reads on average 1000 + 249/2 = 1124.5 cached tokens of 131,072 B each.
    # Decode step with n sequences: weights (15.0 GB) / (3.35 TB/s x 0.9455) = 4.74 ms with the GEMMs' padded
    # compute overlapping it imperfectly, the per-layer kernel, elementwise, LM head and step costs: 6.77 ms;
    # each sequence adds 1124.5 x 131,072 B / 2.8475 TB/s = 51.8 us of KV reads, 8 us of sampling and ~4.8 us of
    # activations and elementwise traffic: T(n) ~= 6.77 ms + 64.6 us x n.
    # Little: b = 20 x 250 x T(1 + b) = 34.18 + 0.3232 b -> b = 50.5.
    ctx = context.build(PlanRequest(model="Llama-3.1-8B", gpu=H100, mode="disaggregated"), fixed(20, 1000, 251))
    pool = decode.disaggregated(ctx, 20.0)
    assert pool.batch == pytest.approx(50.5, rel=0.01)
    assert pool.itl_mean == pytest.approx(6.77e-3 + 64.6e-6 * (1 + 50.5), rel=0.01)
    # and the fixed point is exact against the roofline itself
    assert pool.batch == pytest.approx(20 * 250 * decode.step_seconds(ctx, 1 + pool.batch), rel=1e-3)


def test_chat_and_rag_get_opposite_prefill_decode_splits():
    # Llama-3.1-70B on TP=4, SLO p99 TTFT 2 s, ITL 50 ms, disaggregated.
    # Chat, 256 prompt / 512 output at 60 req/s:
    #   prefill of 256 tokens is weight-bound at TP=4: 141 GB / 4 of weights at 3.17 TB/s (11.1 ms) + 160
    #   all-reduces of 4.2 MB at 25.13 us + bytes / 198.7 GB/s (7.4 ms) + kernel costs, less per prompt when
    #   prompts pack into one step, so fewer prefill than decode workers.
    #   decode: T(n) ~= 21.9 ms + 33 us x n at ~512 context (weights 11.0 ms, all-reduces ~40 us: 6.4 ms,
    #   the GEMMs' overlap, kernel, elementwise and step costs 4.5 ms), plus the GEMMs' wave steps as the
    #   batch adds rows of 128-token tiles (T(220) = 33.0 ms). Little's law b = rate x 511 x T(1 + b) has its
    #   root below the cap; the sizing rule (1% of arrivals find max_num_seqs = 256 running, Poisson count:
    #   b + 2.33 sqrt(b) = 255 -> b ~ 219) binds at 219 / (511 x 33.0 ms) ~ 13.0 req/s per worker -> 5 decode
    #   workers.
    # RAG, 8000 prompt / 128 output at 20 req/s:
    #   prefill of 8000 tokens (63 rows of 128-token tiles): 1.10e15 matmul FLOP / (4 x 769 TFLOP/s: 0.80
    #   of peak less part-filled waves) = 0.356 s + attention 8.4e13 FLOP / (4 x 692.6e12) = 0.03 s +
    #   elementwise 0.065 s + all-reduce 160 x (19.99 us + 131 MB / 226.2 GB/s) = 0.096 s = 0.549 s; 20 req/s
    #   is 11.0 busy workers before any queueing headroom -> > 10 prefill workers.
    #   decode: each sequence holds ~8,072 tokens of KV; the 423,866-token pool keeps the 1%-wait rule
    #   up to ~37 running; a step then takes ~32 ms (each sequence reads 8072 x 81,920 B = 661 MB of KV
    #   per GPU, 0.23 ms), so 37 / (127 x 32 ms) ~ 9 req/s per worker -> 3 decode workers.
    slo = Slo(ttft_p99=2.0, itl_p99=0.05)
    req = PlanRequest(**L70_TP4, mode="disaggregated")
    chat = plan(req, fixed(60, 256, 512), slo)
    rag = plan(req, fixed(20, 8000, 128), slo)
    chat_pools = {p.role: p for p in chat.pools}
    rag_pools = {p.role: p for p in rag.pools}
    assert chat_pools["prefill"].workers < chat_pools["decode"].workers == 5
    assert chat_pools["decode"].max_rate_per_worker == pytest.approx(13.0, rel=0.03)
    assert chat_pools["decode"].binding == "max_num_seqs"
    assert rag_pools["prefill"].workers > 10 > rag_pools["decode"].workers == 3
    assert rag_pools["decode"].binding == "kv_memory"
    assert chat.prefill_to_decode < 1 < rag.prefill_to_decode


def test_prefill_time_per_request_matches_the_roofline_by_hand():
    ctx = context.build(PlanRequest(**L70_TP4, mode="disaggregated"), fixed(1, 8000, 128))
    prof = prefill.profile(ctx, 0)
    assert prof.alone[0] == pytest.approx(0.549, rel=0.01)  # derivation in the test above


def test_prefix_reuse_shrinks_the_prefill_pool_as_the_arithmetic_says():
    # 8000-token prompts at 100 req/s, TTFT SLO 10 s (throughput-bound: workers run near saturation).
    # A prompt's service time is its token share of full 8192-token steps (prompts pack behind each other).
    # 0% reuse: 8000 new tokens, 0.55 s of full steps each -> at least 100 x 0.55 = 55 busy workers.
    # 90% reuse: 7200 tokens hit (450 whole blocks), 800 new tokens over 7200 cached. Alone that is one
    #   step of 800 tokens (7 rows of 128-token tiles): GEMMs with small, part-filled waves + attention
    #   4 x 80 x 64 x 128 x (800 x 7200 + 800 x 801 / 2) / (4 x 692.6e12) = 5.7 ms + elementwise, all-reduce
    #   and fixed costs = 71.6 ms; packed ten to a step (each its own sequence reading its own 7200 cached
    #   tokens, plus a 192-token remainder) it is 800/8192 of that step, 57.5 ms -> at least 5.75 busy
    #   workers.
    #   The pool shrinks ~10x: attention over the cached 7200 tokens is still paid.
    slo = Slo(ttft_p99=10.0, itl_p99=0.1)
    req = PlanRequest(**L70_TP4, mode="disaggregated")
    sizes = {}
    for reuse in (0.0, 0.9):
        ctx = context.build(req, fixed(100, 8000, 128, reuse))
        prof = prefill.profile(ctx, 0)
        share = prof.share[0]
        sized = sizing.size(ctx, slo, 100.0).cluster
        assert sized.prefill >= math.ceil(100 * share)            # stability: utilization below 1
        assert sized.prefill <= math.ceil(100 * share / 0.8) + 1  # loose SLO: run hot
        sizes[reuse] = (sized.prefill, share, prof.alone[0])
    assert sizes[0.0][1] == pytest.approx(0.547, rel=0.01)
    assert sizes[0.9][2] == pytest.approx(0.0716, rel=0.03)
    assert sizes[0.9][1] == pytest.approx(0.0575, rel=0.03)
    assert sizes[0.0][0] / sizes[0.9][0] == pytest.approx(0.547 / 0.0575, rel=0.25)


def test_each_prompt_is_served_its_own_shared_prefix_not_the_average_share():
    # A mix: short chat prompts (500 tokens, 480 shared) and long code prompts (8000 tokens, 300
    # shared). Overall 780 / 8500 = 9.2% of prompt tokens are shared; spread evenly, the long prompt
    # would get 0.092 x 8000 = 734 cached tokens. Its own prefix gives floor(300 / 16) x 16 = 288,
    # and the chat prompt its 480 (30 blocks).
    # 60 samples: few enough to be the points themselves (dist.EXACT_SAMPLES_MAX), so no quantile bin
    # mixes the two kinds
    prompts, shared = [500] * 30 + [8000] * 30, [480] * 30 + [300] * 30
    workload = Workload.from_samples(10.0, prompts, [100] * 60, shared=shared)
    ctx = context.build(PlanRequest(model="Llama-3.1-8B", gpu=H100), workload)
    cached = dict(zip(ctx.prompts.values, ctx.cached, strict=True))
    assert cached == {500: 480, 8000: 288}
    assert workload.prefix_reuse == pytest.approx(780 / 8500)


def test_the_decode_batch_weights_each_prompt_by_its_own_output():
    # Half the requests are 100-token prompts with 11 output tokens (10 decode steps), half 1000-token
    # prompts with 101 (100 steps). A running sequence reads P + (m - 1) / 2 tokens on average over
    # its m steps, and the batch holds each kind for as many steps as it runs:
    #   paired:      (10 x 104.5 + 100 x 1049.5) / 110 = 963.6 tokens
    #   independent: every prompt with every output, (10 x 104.5 + 100 x 149.5 + 10 x 1004.5
    #                + 100 x 1049.5) / 220 = 595.4 tokens, too few for this mix.
    paired = Workload.from_samples(10.0, [100, 1000] * 30, [11, 101] * 30)   # 60: the points themselves
    independent = msgspec.structs.replace(paired, paired=False)
    req = PlanRequest(model="Llama-3.1-8B", gpu=H100)
    assert decode.profile(context.build(req, paired)).context == pytest.approx(963.6, abs=0.1)
    assert decode.profile(context.build(req, independent)).context == pytest.approx(595.4, abs=0.1)


def test_kv_pool_rule_keeps_one_percent_of_arrivals_waiting():
    # RAG decode on 70B TP=4: pool = (0.9 x 80 GB - 35.28 GB weights - 2 GB) / 81,920 B = 423,866 tokens,
    # 423,856 in whole 16-token blocks.
    # A sequence holds 8000 + (127 + 1)/2 + 7.5 (half a block) = 8071.5 tokens on average:
    # mean occupancy reaches the pool (continuous preemption) at 423,866 / 8071.5 = 52.5 sequences;
    # with 8,000 tokens of room for an arrival and 2.33 sigma (sigma ~ sqrt(b) x 8,064) the 1% rule
    # stops near b + 2.33 sqrt(b) x 8064/8071.5 = (423,866 - 8,001) / 8071.5 = 51.5 -> b ~ 37.
    ctx = context.build(PlanRequest(**L70_TP4, mode="disaggregated"), fixed(1, 8000, 128))
    assert ctx.pool_tokens == 423_856
    assert kv_capacity.preemption_running(ctx) == pytest.approx(52.5, rel=0.005)
    assert kv_capacity.max_running(ctx) == pytest.approx(37.3, rel=0.02)
    assert kv_capacity.state(ctx, 37.0).ok(ctx) and not kv_capacity.state(ctx, 40.0).ok(ctx)


def test_colocated_chunked_prefill_inflates_itl_tail_over_disaggregated_decode():
    # Same 8B worker, 1000/250 at 15 req/s: colocated decode tokens sometimes share a step with a
    # 1000-token prefill chunk (~33 ms instead of ~10 ms), so its p99 ITL is far above the decode-only one.
    # Typical steps agree once the batch is accounted for: the colocated batch runs longer (~61 vs ~37
    # sequences, steps are slower) and each sequence adds ~66 us to a step (first test above).
    w = Workload(rate=15, prompt=LengthDist(mean=1000, p99=4000), output=LengthDist(mean=250, p99=1000))
    colo = context.build(PlanRequest(model="Llama-3.1-8B", gpu=H100), w)
    disagg = context.build(PlanRequest(model="Llama-3.1-8B", gpu=H100, mode="disaggregated"), w)
    c = operating.evaluate(colo, Cluster(workers=1), 15.0)
    d = operating.evaluate(disagg, Cluster(prefill=1, decode=1), 15.0)
    assert c.itl_p50 == pytest.approx(d.itl_p50 + (c.decode_batch - d.decode_batch) * 66.4e-6, rel=0.05)
    assert c.itl_p99 > 3 * d.itl_p99
    dep = colo.dep
    mixed = roofline.mixed_time(dep, [(1000, 0)], [1125] * round(c.decode_batch)).seconds
    assert c.itl_p99 > mixed  # p99 sits in the mixed steps, which are at least one such chunk long


def test_handoff_counts_in_ttft_only_when_the_decode_worker_emits_the_first_token():
    # 70B TP=4, 8000-token prompts: the decode worker lacks 8000 x 81,920 B = 655 MB per GPU; over
    # InfiniBand NDR (50 GB/s, 5 us) that is 13.1 ms, plus ~2 decode steps (~23.4 ms each at 8K context) to join.
    w = fixed(1, 8000, 128)
    base = dict(**L70_TP4, mode="disaggregated")
    early = context.build(PlanRequest(**base), w)
    late = context.build(PlanRequest(**base, first_token_after_transfer=True), w)
    assert decode.transfer_times(early).values[0] == pytest.approx(655.36e6 / 50e9 + 5e-6, rel=1e-6)
    a = operating.evaluate(early, Cluster(prefill=1, decode=1), 0.5)
    b = operating.evaluate(late, Cluster(prefill=1, decode=1), 0.5)
    assert b.ttft_p50 - a.ttft_p50 == pytest.approx(0.0131 + 2 * 0.0234, rel=0.15)


def test_more_workers_raise_cmax_and_capacity_reports_the_binding_constraint():
    w = fixed(5, 1000, 250)
    slo = Slo(ttft_p99=0.5, itl_p99=0.03)
    req = PlanRequest(model="Llama-3.1-8B", gpu=H100)
    one = capacity(req, w, slo)
    two = capacity(req, w, slo, Cluster(workers=2))
    assert two.max_rate == pytest.approx(2 * one.max_rate, rel=0.02)  # random dispatch: independent workers
    assert one.binding == one.limits[0].constraint
    assert one.concurrency == pytest.approx(one.max_rate * (one.at_max.ttft_mean + 249 * one.at_max.itl_mean), rel=1e-6)


def test_curve_saturates_and_goodput_falls_past_the_knee():
    w = fixed(5, 1000, 250)
    slo = Slo(ttft_p99=0.5, itl_p99=0.05)
    c = curve(PlanRequest(model="Llama-3.1-8B", gpu=H100), w, slo, Cluster(workers=1))
    thru = [p.throughput for p in c.points]
    assert thru == sorted(thru) and thru[-1] == pytest.approx(c.saturation_rate)
    stable = [p for p in c.points if p.stable]
    assert [p.ttft_p99 for p in stable] == sorted(p.ttft_p99 for p in stable)
    assert c.points[-1].goodput == 0 and max(p.goodput for p in c.points) > 0.9 * c.max_rate


def test_cost_per_unit_of_work():
    # 8 GPUs x $3/h = $24/h; 10 req/s = 36,000 req/h -> $0.6667 per 1,000 requests;
    # 36,000 x 250 output tokens = 9e6 -> $2.667 per million output tokens.
    c = cost(8, 3.0, 10.0, 1000.0, 250.0)
    assert c.per_hour == 24.0
    assert c.per_thousand_requests == pytest.approx(24 / 36.0)
    assert c.per_million_output_tokens == pytest.approx(24 / 9.0)
    assert c.per_million_tokens == pytest.approx(24 / 45.0)


def test_model_that_does_not_fit_is_an_error_not_a_number():
    # Llama-3.1-405B bf16 is 811 GB of weights: 811 GB / 8 GPUs > 70 GB usable per H100 even at TP=8.
    with pytest.raises(PlannerError, match="does not fit"):
        plan(PlanRequest(model="Llama-3.1-405B", gpu=H100, tp=8), fixed(1, 1000, 100), Slo(ttft_p99=1, itl_p99=1))


def test_ttft_slo_below_the_minimum_prefill_time_is_an_error():
    # An 8000-token prompt takes 0.57 s to prefill on 70B TP=4 with nothing else running.
    with pytest.raises(PlannerError, match="below the minimum possible p99 TTFT"):
        plan(PlanRequest(**L70_TP4), fixed(1, 8000, 100), Slo(ttft_p99=0.3, itl_p99=1))


def test_itl_slo_below_a_single_decode_step_is_an_error():
    # One decode step of 70B on TP=4 reads 35.3 GB per GPU: 12.4 ms + all-reduce + overhead = 13.7 ms.
    with pytest.raises(PlannerError, match="below the minimum possible p99 ITL"):
        plan(PlanRequest(**L70_TP4), fixed(1, 500, 100), Slo(ttft_p99=2, itl_p99=0.010))


def test_bad_inputs_are_planner_errors():
    with pytest.raises(PlannerError):
        Workload(rate=0, prompt=LengthDist.fixed(10), output=LengthDist.fixed(10))
    with pytest.raises(PlannerError):
        PlanRequest(model="Llama-3.1-8B", gpu=H100, headroom=0.5)
    with pytest.raises(PlannerError, match="unknown gpu"):
        plan(PlanRequest(model="Llama-3.1-8B", gpu="TPU"), fixed(1, 10, 10), Slo(ttft_p99=1, itl_p99=1))


def test_an_idle_prefill_workers_ttft_p50_is_the_median_prompts_own_step():
    # Prompts of 400-1,599 tokens, evenly, at a rate with no queueing: half of them prefill faster than
    # the 1,000-token one, 24.25 ms on an 8B H100 (1,050 tokens take 30.9 ms: a GEMM tile's stair).
    # The points are bin means; with 0.5 on a bin edge the p50 read the point above the median (30.9
    # ms); on a bin's centre it reads the median bin's own.
    samples = list(range(400, 1600)) * 2
    work = Workload.from_samples(0.01, samples, [20] * len(samples))
    ctx = context.build(PlanRequest(model="Llama-3.1-8B", gpu=H100, mode="disaggregated"), work)
    queue = prefill_queue.queue(ctx, prefill.profile(ctx, 0), 0.01, 1)
    median_own = prefill.step_with(ctx, 0, 1000, 0, True).seconds
    assert queue.ttft_quantile(0.5) == pytest.approx(median_own, rel=0.02)
