"""Pin the roofline with hand-derived numbers (H100 SXM: 989.4 TFLOP/s bf16 x 0.7, 3.35 TB/s x 0.85)."""
import pytest

from emulator.physics import roofline as r
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


def test_batch1_decode_is_weight_bandwidth_bound():
    # 8.03e9 params less the 0.525e9 embedding table (only one row is looked up) x 2 B = 15.0 GB,
    # plus one token of KV written; / (3.35e12 x 0.85) = 5.27 ms (+ 32 layers x 8 us overhead)
    step = r.decode_time(dep(), [0])
    assert step.bound == "memory"
    weights = (L8B.total_params - L8B.embedding_params + L8B.hidden) * 2
    assert step.memory_s == pytest.approx((weights + 131_072) / (3.35e12 * 0.85), rel=1e-9)
    assert step.memory_s == pytest.approx(5.27e-3, rel=0.01)
    assert step.seconds == pytest.approx(step.memory_s + 32 * 8e-6, rel=1e-6)


def test_decode_grows_with_batch_only_through_kv_until_compute_bound():
    d = dep()
    kvb = r.kv_bytes_per_token(L8B)
    base = r.decode_time(d, [1000]).memory_s
    for batch in (2, 8, 32, 128):
        step = r.decode_time(d, [1000] * batch)
        assert step.bound == "memory"
        extra_kv = (batch - 1) * (1000 + 1) * kvb  # each extra sequence reads its context, writes 1 token
        extra_weight_rows = (batch - 1) * L8B.hidden * 2  # embedding rows looked up
        expected = base + (extra_kv + extra_weight_rows) / (3.35e12 * 0.85)
        assert step.memory_s == pytest.approx(expected, rel=1e-9)
    # With short contexts and a huge batch, FLOPs (2 x params x batch) eventually bind.
    assert r.decode_time(d, [1] * 4096).bound == "compute"


def test_prefill_is_compute_bound_above_a_few_hundred_tokens():
    d = dep()
    assert r.prefill_time(d, 32).bound == "memory"
    for n in (512, 2000, 8000):
        assert r.prefill_time(d, n).bound == "compute"
    # 2000 tokens: 2 x 6.98e9 x 2000 + 4 x 32 x 4096 x 2000 x 2001/2 + lm head, / 692.6 TFLOP/s ~= 42 ms
    flops = 2 * L8B.layer_matmul_params_active * 2000 + 4 * 32 * 4096 * 2000 * 2001 / 2 + 2 * 128256 * 4096
    assert r.prefill_time(d, 2000).compute_s == pytest.approx(flops / (989.4e12 * 0.7), rel=1e-9)


def test_prefill_attention_is_quadratic_and_cached_tokens_cost_less():
    d = dep()
    assert r.prefill_time(d, 16000).compute_s > 2 * r.prefill_time(d, 8000).compute_s
    # the second half of a prompt over a cached first half costs less than the whole prompt
    assert r.prefill_time(d, 4000, cached_tokens=4000).seconds < r.prefill_time(d, 8000).seconds


def test_tp4_at_least_halves_compute_minus_allreduce():
    one, four = dep(L70B, tp=1), dep(L70B, tp=4)
    for n in (2000, 8000):
        s1, s4 = r.prefill_time(one, n), r.prefill_time(four, n)
        assert s4.compute_s == pytest.approx(s1.compute_s / 4, rel=1e-9)
        assert s4.seconds - s4.comm_s <= s1.seconds / 2
        assert s4.comm_s > 0


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
    assert r.kv_capacity_tokens(dep()) > 300_000
    assert r.kv_pool_bytes_per_gpu(dep(L70B, tp=1)) < 0  # 141 GB of weights does not fit on one 80 GB GPU
