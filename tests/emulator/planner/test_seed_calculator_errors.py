"""Where the seed capacity calculator (../shared/seeds/000_*.txt, "Dynamo Capacity Planning") is wrong,
each error reproduced from its own formula or table and set against the planner's corrected value.

The seed's inputs for Llama 3.1 70B on H100, TP=4: prefill_throughput_tps = 50,000, decode_throughput_tps
= 8,000, kv_cache_per_token_bytes = 2,560, 70% target utilization; chatbot example: 100 QPS, 256 prompt
/ 512 output tokens (p99 1,024 / 2,048), TTFT p99 500 ms, ITL p99 50 ms, peak/average 2.5, 99.9%.
"""
import math

import pytest

from emulator.physics import roofline
from emulator.physics.catalog import builtin_catalog
from emulator.planner import LengthDist, PlanRequest, Slo, Workload, context, decode, plan, prefill

CAT = builtin_catalog()
L70 = CAT.model("Llama-3.1-70B")
REQ_70B = PlanRequest(model="Llama-3.1-70B", gpu="H100-SXM", tp=4, mode="disaggregated", price_per_gpu_hour=3.5)
CHAT = Workload(rate=100, prompt=LengthDist(mean=256, p99=1024), output=LengthDist(mean=512, p99=2048))
CHAT_SLO = Slo(ttft_p99=0.5, itl_p99=0.05)


def test_error_1_kv_bytes_per_token_is_128x_too_small():
    # Seed: kv_cache_per_token_bytes=2560 with the comment "80 layers * 8 heads * 128 dim * 2 (KV) * 2 (BF16)",
    # but that product is 327,680, not 2,560 (likewise 512 for 8B where 32x8x128x2x2 = 131,072).
    seed_70b, seed_8b = 2560, 512
    assert 80 * 8 * 128 * 2 * 2 == 327_680 != seed_70b
    assert roofline.kv_bytes_per_token(L70) == 327_680
    assert roofline.kv_bytes_per_token(CAT.model("Llama-3.1-8B")) == 131_072 != seed_8b
    # Consequence: the seed's KV check can never bind. For its own chatbot it needs
    # 6.4 sequences x 768 tokens x 2,560 B = 12.6 MB of KV; with the right bytes a 70B TP=4 worker's
    # pool holds 423,856 tokens (whole 16-token blocks), i.e. ~550 chat sequences of 768 tokens, and it is a
    # real limit.
    seed_kv_needed = 100 * (512 / 8000) * (256 + 512) * seed_70b
    assert seed_kv_needed == pytest.approx(12.6e6, rel=0.01)
    ctx = context.build(REQ_70B, CHAT)
    assert ctx.pool_tokens == 423_856 and ctx.pool_tokens % 16 == 0
    assert ctx.pool_tokens // 768 == 551


def test_error_2_prefill_throughput_exceeds_the_gpus_peak_flops():
    # Seed: 50,000 prefill tokens/s for 70B on 4 H100s. Every token costs at least 2 FLOPs per
    # parameter (2 x 70.55e9 = 1.41e11), and 4 H100s peak at 4 x 989.4e12 dense bf16 FLOP/s:
    # even at 100% of peak that is 28,050 tokens/s. 50,000 is physically impossible.
    peak_tokens_per_s = 4 * 989.4e12 / (2 * L70.total_params)
    assert peak_tokens_per_s == pytest.approx(28_050, rel=0.01)
    assert 50_000 > 1.7 * peak_tokens_per_s
    # Planner: a full 8,192-token prefill step on 70B TP=4 (GEMMs at ~78% of peak, 0.36 s; attention,
    # elementwise kernels and all-reduce included), costed as the separate prompts it packs (each attends
    # to its own tokens only), takes 0.53 s -> ~15,400 tokens/s per TP group, under a third of the seed's figure.
    prof = prefill.profile(context.build(REQ_70B, CHAT), 0)
    planner_tokens_per_s = prof.budget / prof.full_step.seconds
    assert planner_tokens_per_s == pytest.approx(15_430, rel=0.01)
    assert 50_000 / planner_tokens_per_s > 3


def test_error_3_itl_formula_is_not_a_step_time():
    # Seed: itl_estimate = 1000 / (decode_throughput_tps / peak_qps) ms, i.e. qps / throughput. For the
    # chatbot: 1000 x 100 / 8000 = 12.5 ms, and it falls to 1.25 ms at 10 QPS and to 0 as traffic
    # vanishes. But a decode step must read every weight once: 70B bf16 / 4 GPUs = 35.3 GB per GPU at
    # 3.35 TB/s x 0.9455 = 11.1 ms, + 160 all-reduces at their ~40 us floor (6.4 ms) + the GEMMs' overlap,
    # kernel, elementwise and step costs (4.4 ms) = 21.9 ms even for a single sequence.
    def seed_itl_ms(qps):
        return 1000 / (8000 / qps)

    assert seed_itl_ms(100) == 12.5 and seed_itl_ms(10) == 1.25
    ctx = context.build(REQ_70B, CHAT)
    floor = decode.step(ctx, 1).seconds
    assert floor == pytest.approx(21.9e-3, rel=0.01)
    assert seed_itl_ms(100) / 1e3 < floor  # below the physical minimum
    # Planner: ITL is the step time at the batch Little's law gives. With the seed's 10 decode groups
    # (10 QPS each): b = 10 x 511 x T(1 + b), T(n) ~= 21.9 ms + 44 us x n (plus the GEMMs' wave steps, +3.1 ms
    # at 129 sequences, a second row of 128-token tiles, and ~2 ms less from 66 sequences on, where the
    # all-reduces' 1.1 MB payloads reach NCCL's faster band: ~44 us -> ~31 us each, 160 per step)
    # -> b = 153, ITL = 30.0 ms.
    pool = decode.disaggregated(context.build(REQ_70B, Workload(rate=10, prompt=LengthDist.fixed(256),
                                                                    output=LengthDist.fixed(512))), 10.0)
    assert pool.batch == pytest.approx(153.4, rel=0.02)
    assert pool.itl_mean == pytest.approx(30.0e-3, rel=0.02)


def test_error_4_concurrency_ignores_littles_law():
    # Seed: max_concurrent_sequences = peak_qps x avg_output / decode_throughput_tps = 100 x 512 / 8000
    # = 6.4: it divides by the whole group's token rate, as if one sequence got all of it. Little's law
    # needs each sequence's time in decode: 511 tokens x ITL. At 30.0 ms that is 15.3 s, so
    # 100 QPS keeps ~1,530 sequences in flight (10 groups x 153), 240x the seed's figure.
    seed = 100 * 512 / 8000
    assert seed == 6.4
    pool = decode.disaggregated(context.build(REQ_70B, Workload(rate=10, prompt=LengthDist.fixed(256),
                                                                    output=LengthDist.fixed(512))), 10.0)
    in_flight = 100 * 511 * pool.itl_mean
    assert in_flight == pytest.approx(10 * pool.batch, rel=0.02)
    assert in_flight / seed > 100


def test_error_5_worked_example_does_not_follow_its_own_formulas():
    # Chatbot table: "Prefill GPU Groups 2" and "Burst Headroom (+25%) 12 GPUs".
    # Its formula: ceil(100 x 256 / (50,000 x 0.70)) = ceil(0.73) = 1 group, not 2.
    assert math.ceil(100 * 256 / (50_000 * 0.70)) == 1
    # Its headroom: 1 + max(0, (2.5 - 1.5) x 0.5) = 1.5, i.e. +50% (24 GPUs on 48), not +25% (12).
    assert 1.0 + max(0, (2.5 - 1.5) * 0.5) == 1.5
    # RAG table: "Decode GPU Groups 2", but ceil(50 x 256 / (8,000 x 0.70)) = ceil(2.29) = 3.
    assert math.ceil(50 * 256 / (8000 * 0.70)) == 3
    # And the headroom is applied on top of sizing for peak_qps, which already is the peak: the
    # peak/average ratio is counted twice. The planner sizes for rate x headroom once, explicitly.
    # Planner for the chatbot (lengths lognormal with the seed's mean and p99): 3 prefill + 9 decode
    # TP=4 workers, 48 GPUs, meeting both SLOs; the seed reaches 48 before headroom (8 prefill + 40
    # decode) from wrong throughputs, then adds its headroom on top (60-72 GPUs).
    p = plan(REQ_70B, CHAT, CHAT_SLO)
    pools = {x.role: x.workers for x in p.pools}
    assert pools["prefill"] <= 3 and pools["decode"] <= 9
    assert p.gpus <= 48
    assert p.predicted.ttft_p99 <= 0.5 and p.predicted.itl_p99 <= 0.05


def test_error_6_cost_per_million_tokens_assumes_every_gpu_decodes_flat_out():
    # Seed: cost_per_1m_tokens = hourly / (decode_throughput_tps x 3600 x total_gpus / tp) x 1e6:
    # it credits every group (prefill ones too) with 8,000 output tokens/s at 100% utilization.
    # For its 68-GPU chatbot at $3.50: $238/h / (8000 x 3600 x 17) x 1e6 = $0.486 per 1M tokens.
    # The chatbot serves 100 x 512 = 51,200 output tokens/s = 184M/h: $238 / 184.32 = $1.29 per 1M.
    seed = 238 / (8000 * 3600 * 68 / 4) * 1e6
    served = 238 / (100 * 512 * 3600) * 1e6
    assert seed == pytest.approx(0.486, rel=0.01) and served == pytest.approx(1.291, rel=0.01)
    # Planner: cost per token from the rate actually served, on its own (smaller) cluster.
    p = plan(REQ_70B, CHAT, CHAT_SLO)
    expected = p.gpus * 3.5 / (100 * 3600 * CHAT.output.points().mean()) * 1e6
    assert p.cost.per_million_output_tokens == pytest.approx(expected, rel=1e-3)
