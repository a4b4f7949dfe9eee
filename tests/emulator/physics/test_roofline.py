"""Pin the step model with hand-derived numbers from the built-in H100 SXM entry (989.4 TFLOP/s bf16, 3.35 TB/s)."""
import pytest

from emulator.engine_config import DEFAULTS
from emulator.physics import roofline as r
from emulator.physics import steptime
from emulator.physics.catalog import builtin_catalog

CAT = builtin_catalog()
L8B, L70B = CAT.model("Llama-3.1-8B"), CAT.model("Llama-3.1-70B")
H100 = CAT.gpu("H100-SXM")
NVLINK = CAT.link("NVLink4")


def dep(model=L8B, tp=1, **kw):
    return r.Deployment(model=model, gpu=H100, tp=tp, tp_link=NVLINK if tp > 1 else None, **kw)


def test_kv_bytes_per_token_llama():
    # 2 (K,V) x 32 layers x 8 kv heads x 128 head dim x 2 bytes = 131,072
    assert r.kv_bytes_per_token(L8B, "bf16") == 131_072
    # 2 x 80 x 8 x 128 x 2 = 327,680
    assert r.kv_bytes_per_token(L70B, "bf16") == 327_680
    assert r.kv_bytes_per_token(L8B, "fp8") == 65_536


def test_parameter_counts_match_published_sizes():
    assert L8B.total_params == pytest.approx(8.03e9, rel=0.01)
    assert L70B.total_params == pytest.approx(70.55e9, rel=0.01)
    mixtral = CAT.model("Mixtral-8x7B")
    assert mixtral.total_params == pytest.approx(46.7e9, rel=0.01)
    assert mixtral.active_params == pytest.approx(12.9e9, rel=0.01)


# Built-in H100-SXM coefficients (emulator/physics/data/gpus.toml): GEMM tiles of 128 tokens x 256 features (or
# 128 x 128 at 0.732 of their throughput, whichever is faster) in waves over 132 SMs, 23% of a partial last
# wave's idle time filled, the tiles' MACs at 0.80 of peak; compute and weight streaming (0.9455 x HBM) combined
# as an L2.53 norm; KV reads 0.85 x HBM; 3.55 us per GEMM/attention kernel; each elementwise kernel 2.04 us plus
# 0.438 ns per element of one token's row, or its traffic if longer; 300 us per step, 8 us per sampled sequence.
KERNEL, ELEMENTWISE, ROW, STEP, SEQUENCE = 3.55e-6, 2.04e-6, 0.438e-9, 300e-6, 8e-6
PEAK, E_MAX, SMS, TAIL, ALT, P, E_W = 989.4e12, 0.80, 132, 0.23, 0.732, 2.53, 0.9455


def test_batch1_decode_is_weight_bandwidth_bound():
    # Every operator is memory-bound at one token: the step is the summed memory time, ~8% more where a GEMM's
    # compute (one token padded to a 128-token tile: about half its weight-streaming time) overlaps that
    # streaming imperfectly (the L2.53 norm), plus the fixed costs: per layer 4 GEMMs
    # + attention (5 kernels) and 5 elementwise kernels each taking one token's row (norms over 4096, rope over
    # 40 heads x 128, SiLU-and-mul over 14336, the add none); the LM head GEMM and the final norm; the step and
    # one sequence.
    step = r.decode_time(dep(), [0])
    assert step.bound == "memory"
    rows = 2 * (ELEMENTWISE + ROW * 4096) + ELEMENTWISE + ROW * 40 * 128 + ELEMENTWISE + ROW * 14336 + ELEMENTWISE
    fixed = 32 * (5 * KERNEL + rows) + KERNEL + ELEMENTWISE + STEP + SEQUENCE
    assert 1.05 * step.memory_s + fixed < step.seconds < 1.12 * step.memory_s + fixed
    assert step.overhead_s == pytest.approx(STEP + SEQUENCE, rel=1e-9)
    # Weights dominate the memory time: 8.03e9 params less the 0.525e9 embedding table = 15.0 GB at
    # 3.35e12 x 0.9455 B/s = 4.74 ms (activations, elementwise and the KV write add < 1%).
    weights = (L8B.total_params - L8B.embedding_params) * 2
    assert step.memory_s == pytest.approx(weights / (3.35e12 * E_W), rel=0.01)


def test_decode_context_costs_kv_reads_and_each_sequence_costs_its_overhead():
    d = dep()
    kvb = r.kv_bytes_per_token(L8B)
    for batch in (2, 8, 32, 128):
        near, far = r.decode_time(d, [0] * batch), r.decode_time(d, [1000] * batch)
        assert far.bound == "memory"
        # only attention depends on the context: 1000 more cached tokens per sequence to read
        assert far.memory_s - near.memory_s == pytest.approx(batch * 1000 * kvb / (3.35e12 * 0.85), rel=1e-9)
        assert far.overhead_s == pytest.approx(STEP + batch * SEQUENCE, rel=1e-9)
    # With short contexts and a huge batch, the GEMMs' FLOPs eventually bind.
    assert r.decode_time(d, [1] * 4096).bound == "compute"


def test_decode_run_times_equal_step_times_step_by_step():
    d = dep(L70B, tp=4)
    times = r.decode_run_times(d, 16, 16 * 700, 5)
    for j, t in enumerate(times):
        assert t == pytest.approx(r.decode_time(d, [700 + j] * 16).seconds, rel=1e-12)


def test_prefill_is_compute_bound_above_a_few_hundred_tokens():
    d = dep()
    assert r.prefill_time(d, 32).bound == "memory"
    for n in (512, 2000, 8000):
        assert r.prefill_time(d, n).bound == "compute"
    # 2000 tokens run as 16 rows of 128-token tiles; each GEMM's tiles run in whole waves of 132. Attention
    # pairs at 0.7 x peak; the LM head's one sampled token pads to one 128-token row of tiles (its compute
    # ceiling, though the head stays memory-bound).
    qkv, o, up, down = (4096, 6144), (4096, 4096), (4096, 2 * 14336), (14336, 4096)
    gemm = sum(tiled_gemm_s(2000, k, n) for k, n in (qkv, o, up, down)) * 32
    attention = 4 * 32 * 4096 * 2000 * 2001 / 2 / (PEAK * 0.7)
    head = tiled_gemm_s(1, 4096, 128256)
    assert r.prefill_time(d, 2000).compute_s == pytest.approx(gemm + attention + head, rel=1e-9)


def tiled_gemm_s(tokens: int, k: int, n: int) -> float:
    """GEMM compute by hand: tokens padded to 128, features to the tile's width (256, or 128 at 0.732 of the
    throughput: the faster of the two); tiles in waves of 132 SMs, 23% of a partial last wave's idle time
    filled; with fewer tiles than SMs the K loop split over floor(132 / tiles) copies, whose fp32 partial sums
    (tokens x n x 4 bytes each) are written and read back at the weight-streaming bandwidth."""
    return min(_tile_compute(tokens, k, n, width, rel) for width, rel in ((256, 1.0), (128, ALT)))


def _tile_compute(tokens: int, k: int, n: int, width: int, rel: float) -> float:
    rows, cols = -(-tokens // 128), -(-n // width)
    tiles = rows * cols
    if tiles < SMS:
        busy, split = tiles * (SMS // tiles) / SMS, SMS // tiles
    else:
        busy, split = tiles / (tiles + (1 - TAIL) * (-(-tiles // SMS) * SMS - tiles)), 1
    partials = 2 * split * tokens * n * 4 / (3.35e12 * E_W) if split > 1 else 0.0
    return 2 * rows * 128 * k * cols * width / (PEAK * E_MAX * rel * busy) + partials


def test_small_gemms_run_below_peak_and_tokens_pad_to_the_tile():
    model = steptime.model_for(dep(tp=1))
    per_token = [model.linear_layer(n).compute_s / n for n in (256, 1024, 4096)]
    assert per_token[0] > per_token[1] > per_token[2]
    # 129 tokens cost a second row of 128-token tiles: ~1.7x the compute (the fused QKV GEMM's 48 tiles split
    # K fewer ways, and more rows of partial sums go through memory)
    assert model.linear_layer(129).compute_s > 1.6 * model.linear_layer(128).compute_s
    assert model.gemm(129, 4096, 6144).compute_s == pytest.approx(tiled_gemm_s(129, 4096, 6144), rel=1e-9)


def test_gemm_tiles_run_in_waves_over_the_sms():
    # Llama-3.1-8B's down projection (K 14336, N 4096) has 16 tiles per 128 tokens: 1,024 tokens fill 128 of
    # the 132 SMs in one wave; 1,152 tokens need a second wave for 12 tiles, whose idle SMs are 23% filled:
    # ~1.8x the time of 1,024 tokens for 12.5% more tokens (128 x 128 tiles, three waves, are slower here).
    model = steptime.model_for(dep(tp=1))
    one, two, full = (model.gemm(n, 14336, 4096).compute_s for n in (1024, 1152, 2048))
    assert two > 1.7 * one and full > two
    for tokens, got in ((1024, one), (1152, two), (2048, full)):
        assert got == pytest.approx(tiled_gemm_s(tokens, 14336, 4096), rel=1e-9)
    assert two == pytest.approx(_tile_compute(1152, 14336, 4096, 256, 1.0), rel=1e-9)


def test_a_mixed_step_pays_the_chunk_gemms_and_the_decodes_kv_reads_one_after_the_other():
    d = dep()
    decodes = [(1, 4000)] * 64
    decode_only = r.step_time(d, r.batch_shape(decodes))
    mixed = r.step_time(d, r.batch_shape([(512, 0)] + decodes))
    kv_reads = 64 * 4001 * r.kv_bytes_per_token(L8B) / (3.35e12 * 0.85)
    chunk = r.prefill_time(d, 512)
    assert mixed.seconds > kv_reads + chunk.compute_s
    # the chunk turns the GEMMs compute-bound: the step grows by more than the chunk's GEMM compute less
    # the weight read it hides (one max over the whole step grew by ~0.2 ms here)
    assert mixed.seconds - decode_only.seconds > chunk.compute_s - chunk.memory_s / 2


def test_prefill_attention_is_quadratic_and_cached_tokens_cost_less():
    d = dep()
    assert r.prefill_time(d, 16000).compute_s > 2 * r.prefill_time(d, 8000).compute_s
    # the second half of a prompt over a cached first half costs less than the whole prompt
    assert r.prefill_time(d, 4000, cached_tokens=4000).seconds < r.prefill_time(d, 8000).seconds


def test_tp4_allreduce_follows_the_nvlink_curve_and_tp_more_than_halves_the_rest():
    one, four = dep(L70B, tp=1), dep(L70B, tp=4)
    for n in (2000, 8000):
        s1, s4 = r.prefill_time(one, n), r.prefill_time(four, n)
        # 2 all-reduces per layer of n x 8192 x 2 B (33-131 MB) on 4 GPUs: the NVLink4 curve's band from
        # 11.6 MB, 19.99 us + bytes / 226.2 GB/s
        per = 19.99e-6 + n * 8192 * 2 / 226.2e9
        assert s4.comm_s == pytest.approx(80 * 2 * per, rel=1e-9)
        assert s4.seconds - s4.comm_s <= s1.seconds / 2


def test_allreduce_without_a_measured_curve_is_a_ring():
    b200 = r.Deployment(model=L70B, gpu=CAT.gpu("B200"), tp=4, tp_link=CAT.link("NVLink5"))
    payload = 1000 * 8192 * 2
    assert r.allreduce_seconds(b200, payload) == pytest.approx(5e-6 + 1.5 * payload / 900e9, rel=1e-9)


def test_transfer_time_is_bytes_over_bandwidth_plus_latency():
    ib = CAT.link("InfiniBand-NDR")
    nbytes = 2000 * r.kv_bytes_per_token(L70B)  # 655.36 MB
    assert r.kv_transfer_time(nbytes, ib) == pytest.approx(655.36e6 / 50e9 + 5e-6)
    assert r.kv_transfer_time(0, ib) == 0.0


def test_moe_decode_reads_only_touched_experts():
    mixtral = r.Deployment(model=CAT.model("Mixtral-8x7B"), gpu=H100)
    small = r.decode_time(mixtral, [100]).memory_s
    large = r.decode_time(mixtral, [100] * 64).memory_s
    # batch 1 touches 2 of 8 experts per layer; batch 64 touches all of them
    assert small < 0.5 * large


def test_kv_pool_and_model_fit():
    e = DEFAULTS
    assert r.kv_capacity_tokens(dep(), e.gpu_memory_utilization, e.activation_reserve_gb) > 300_000
    # 141 GB of weights does not fit on one 80 GB GPU
    assert r.kv_pool_bytes_per_gpu(dep(L70B, tp=1), e.gpu_memory_utilization, e.activation_reserve_gb) < 0


def test_elementwise_kernels_take_one_rows_time_until_their_traffic_is_longer():
    # Norm, rope and SiLU-and-mul run one thread block per token: a few tokens cost one row's walk (Llama-3.1-70B
    # at TP 1: norms over 8192, rope over (64 + 8) x 128, SiLU-and-mul over 28672; the add a flat kernel), and
    # thousands of tokens cost their traffic at each kind's bandwidth.
    model = steptime.model_for(dep(L70B, tp=1))
    rows = 2 * (ELEMENTWISE + ROW * 8192) + ELEMENTWISE + ROW * 72 * 128 + ELEMENTWISE + ROW * 28672 + ELEMENTWISE
    assert model.elementwise(1).seconds == pytest.approx(rows, rel=1e-9)
    assert model.elementwise(2).seconds == model.elementwise(1).seconds
    big = model.elementwise(8192)
    assert big.seconds == pytest.approx(big.memory_s, rel=1e-9) and big.seconds > 20 * rows
