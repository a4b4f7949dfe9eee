"""The one place durations come from: a roofline model of an engine step on a named GPU and model.

A step processes, for each sequence in the batch, ``n`` new tokens on top of ``c`` tokens already in
its KV cache (a decode token is n=1; a prefill chunk is n>1). Its duration is

    max(FLOPs / sustained compute, bytes / sustained HBM bandwidth) + TP all-reduce + fixed overhead

per GPU of a tensor-parallel group. Weight reads are paid once per step (they amortize over the
batch); KV reads are paid per sequence (they do not); causal attention FLOPs grow with n*(c + n/2),
so prefill is quadratic in the prompt.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import msgspec
import numpy as np

from emulator.physics.catalog import DTYPE_BYTES, Gpu, Link, Model

ACTIVATION_BYTES = 2  # all-reduce payloads are bf16 activations in every engine modelled here


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """A model served on one tensor-parallel group of GPUs."""
    model: Model
    gpu: Gpu
    tp: int = 1
    tp_link: Link | None = None  # required when tp > 1
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError("tp must be >= 1")
        if self.tp > 1 and self.tp_link is None:
            raise ValueError("tp > 1 needs a tp_link for the all-reduce")
        for field in ("weight_dtype", "kv_dtype"):
            if getattr(self, field) not in DTYPE_BYTES:
                raise ValueError(f"{field} must be one of {sorted(DTYPE_BYTES)}")


class BatchShape(msgspec.Struct, kw_only=True):
    """What a step's cost depends on, summed over its sequences."""
    new_tokens: int = 0        # sum of n
    context_tokens: int = 0    # sum of c: cached KV each sequence reads
    attention_pairs: int = 0   # sum of n*c + n*(n+1)/2: causal (query, key) pairs
    sampled: int = 0           # sequences that produce a token this step (lm head + sampling)

    def add(self, new: int, cached: int, samples: bool = True) -> "BatchShape":
        self.new_tokens += new
        self.context_tokens += cached
        self.attention_pairs += new * cached + new * (new + 1) // 2
        self.sampled += 1 if samples else 0
        return self


class StepTime(msgspec.Struct, frozen=True, kw_only=True):
    seconds: float
    bound: str          # "compute" or "memory": the ceiling that sets the step
    compute_s: float
    memory_s: float
    comm_s: float
    overhead_s: float


def kv_bytes_per_token(model: Model, kv_dtype: str = "bf16") -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x dtype bytes (whole model, all GPUs)."""
    return 2 * model.layers * model.kv_heads * model.head_dim * DTYPE_BYTES[kv_dtype]


def weight_bytes(model: Model, dtype: str = "bf16") -> int:
    return model.total_params * DTYPE_BYTES[dtype]


def weight_bytes_per_gpu(dep: Deployment) -> float:
    return weight_bytes(dep.model, dep.weight_dtype) / dep.tp


def kv_bytes_per_token_per_gpu(dep: Deployment) -> float:
    """KV heads shard across TP ranks; when tp > kv_heads each rank keeps whole (replicated) heads."""
    m = dep.model
    heads_per_rank = math.ceil(m.kv_heads / dep.tp)
    return kv_bytes_per_token(m, dep.kv_dtype) * heads_per_rank / m.kv_heads


def batch_shape(chunks: Iterable[tuple[int, int]]) -> BatchShape:
    """Shape of a batch of (new tokens, cached tokens) chunks, each sampling one token."""
    shape = BatchShape()
    for new, cached in chunks:
        shape.add(new, cached)
    return shape


def step_flops(model: Model, shape: BatchShape) -> float:
    """Whole-model FLOPs: 2 per weight per token, causal attention, and the lm head for sampled tokens."""
    matmul = 2.0 * model.layer_matmul_params_active * shape.new_tokens
    # QK^T and PV each cost 2 x (q_heads x head_dim) FLOPs per (query, key) pair, per layer.
    attention = 4.0 * model.layers * model.q_heads * model.head_dim * shape.attention_pairs
    lm_head = 2.0 * model.vocab * model.hidden * shape.sampled
    return matmul + attention + lm_head


def experts_touched(model: Model, tokens: int) -> float:
    """Expected distinct experts per layer hit by `tokens` tokens under uniform top-k routing."""
    if not model.is_moe:
        return 1.0
    miss = (1.0 - model.active_experts / model.experts) ** tokens
    return model.experts * (1.0 - miss)


def step_weight_bytes(model: Model, dtype: str, tokens: int) -> float:
    """Weights read in one step. Dense models read all; MoE models read only the experts hit."""
    per_layer = model.dense_params_per_layer + experts_touched(model, tokens) * model.expert_params
    # The lm head and final norm are read whole; the embedding table only at the looked-up rows.
    params = model.layers * per_layer + model.lm_head_params + model.hidden + tokens * model.hidden
    return params * DTYPE_BYTES[dtype]


class _Coefficients(msgspec.Struct, frozen=True):
    """step_time's terms per unit of each BatchShape field, evaluated once per deployment.

    Every term is linear in the shape (weight reads of a MoE model excepted), so evaluating the
    readable definitions above at unit inputs gives exact per-unit costs for the hot path.
    """
    per_token_s: float        # compute seconds per new token
    per_pair_s: float         # compute seconds per attention pair
    per_sample_s: float       # compute seconds per sampled sequence
    weights_s: float          # memory seconds of the per-step weight read (dense models)
    per_token_mem_s: float    # memory seconds per new token (KV write, embedding row)
    per_context_s: float      # memory seconds per cached token read (and per KV token written)
    inv_bandwidth: float      # seconds per byte of HBM traffic
    comm_fixed_s: float
    comm_per_token_s: float
    overhead_s: float


@functools.lru_cache(maxsize=64)
def _coefficients(dep: Deployment) -> _Coefficients:
    m, gpu, t = dep.model, dep.gpu, dep.tp
    inv_compute = 1.0 / (t * gpu.peak_flops(dep.weight_dtype) * gpu.compute_efficiency)
    inv_bw = 1.0 / (gpu.hbm_bytes_per_s * gpu.bandwidth_efficiency)
    kv = kv_bytes_per_token_per_gpu(dep)
    weights0 = step_weight_bytes(m, dep.weight_dtype, 0) / t
    comm0 = tp_allreduce_time(dep, 0)
    return _Coefficients(
        per_token_s=step_flops(m, BatchShape(new_tokens=1)) * inv_compute,
        per_pair_s=step_flops(m, BatchShape(attention_pairs=1)) * inv_compute,
        per_sample_s=step_flops(m, BatchShape(sampled=1)) * inv_compute,
        weights_s=weights0 * inv_bw,
        per_token_mem_s=((step_weight_bytes(m, dep.weight_dtype, 1) / t - weights0) + kv) * inv_bw,
        per_context_s=kv * inv_bw, inv_bandwidth=inv_bw,
        comm_fixed_s=comm0, comm_per_token_s=tp_allreduce_time(dep, 1) - comm0,
        overhead_s=m.layers * gpu.layer_overhead_us * 1e-6)


def step_time(dep: Deployment, shape: BatchShape) -> StepTime:
    """Duration of one engine step on one TP group."""
    n = shape.new_tokens
    if n == 0:
        return StepTime(seconds=0.0, bound="memory", compute_s=0.0, memory_s=0.0, comm_s=0.0, overhead_s=0.0)
    k = _coefficients(dep)
    compute_s = n * k.per_token_s + shape.attention_pairs * k.per_pair_s + shape.sampled * k.per_sample_s
    if dep.model.is_moe:  # the experts touched grow sub-linearly with the batch: no per-token constant
        weights = step_weight_bytes(dep.model, dep.weight_dtype, n) / dep.tp
        memory_s = weights * k.inv_bandwidth + (n + shape.context_tokens) * k.per_context_s
    else:
        memory_s = k.weights_s + n * k.per_token_mem_s + shape.context_tokens * k.per_context_s
    comm_s = k.comm_fixed_s + n * k.comm_per_token_s if dep.tp > 1 else 0.0
    bound = "compute" if compute_s >= memory_s else "memory"
    return StepTime(seconds=max(compute_s, memory_s) + comm_s + k.overhead_s, bound=bound,
                    compute_s=compute_s, memory_s=memory_s, comm_s=comm_s, overhead_s=k.overhead_s)


def decode_run_times(dep: Deployment, batch: int, context_sum: int, steps: int) -> np.ndarray:
    """Durations of `steps` back-to-back decode steps of a fixed batch whose contexts all grow by one
    token per step (step j reads context_sum + j x batch cached tokens). Equal to calling step_time for
    each step; vectorized for drivers that fast-forward a steady decode batch."""
    k = _coefficients(dep)
    j = np.arange(steps, dtype=np.float64)
    context = context_sum + j * batch
    compute = batch * (k.per_token_s + k.per_sample_s) + (context + batch) * k.per_pair_s
    if dep.model.is_moe:
        weights = step_weight_bytes(dep.model, dep.weight_dtype, batch) / dep.tp * k.inv_bandwidth
        memory = weights + (batch + context) * k.per_context_s
    else:
        memory = k.weights_s + batch * k.per_token_mem_s + context * k.per_context_s
    comm = k.comm_fixed_s + batch * k.comm_per_token_s if dep.tp > 1 else 0.0
    return np.maximum(compute, memory) + comm + k.overhead_s


def tp_allreduce_time(dep: Deployment, tokens: int) -> float:
    """Megatron-style TP: two all-reduces of the activations per layer (after attention, after MLP).

    A ring all-reduce moves 2(t-1)/t of the payload over each GPU's link, plus one link latency.
    """
    t = dep.tp
    if t == 1:
        return 0.0
    payload = tokens * dep.model.hidden * ACTIVATION_BYTES
    one = dep.tp_link.latency_s + 2.0 * (t - 1) / t * payload / dep.tp_link.bytes_per_s
    return 2 * dep.model.layers * one


def prefill_time(dep: Deployment, new_tokens: int, cached_tokens: int = 0) -> StepTime:
    """One prefill chunk of `new_tokens` over `cached_tokens` already in the cache."""
    return step_time(dep, BatchShape().add(new_tokens, cached_tokens))


def decode_time(dep: Deployment, contexts: Sequence[int]) -> StepTime:
    """One decode step: one new token for each sequence, each over its context."""
    return step_time(dep, batch_shape((1, c) for c in contexts))


def mixed_time(dep: Deployment, prefill_chunks: Sequence[tuple[int, int]], contexts: Sequence[int],
               final_chunks: Sequence[bool] | None = None) -> StepTime:
    """A chunked-prefill step: prefill chunks (new, cached) batched with decode tokens."""
    shape = batch_shape((1, c) for c in contexts)
    finals = final_chunks or [True] * len(prefill_chunks)
    for (new, cached), final in zip(prefill_chunks, finals):
        shape.add(new, cached, samples=final)
    return step_time(dep, shape)


def kv_transfer_time(num_bytes: float, link: Link) -> float:
    """Moving KV over a link: bytes / bandwidth + latency (zero bytes costs nothing)."""
    if num_bytes <= 0:
        return 0.0
    return num_bytes / link.bytes_per_s + link.latency_s


def kv_pool_bytes_per_gpu(dep: Deployment, gpu_memory_utilization: float = 0.9,
                          activation_reserve_gb: float = 2.0) -> float:
    """HBM left for KV blocks on each GPU.

    vLLM budgets gpu_memory_utilization (default 0.9) of HBM, then subtracts weights and the peak
    activation memory found by a profiling run; a couple of GB is typical for 8-70B models at the
    default batch token budget (an estimate to calibrate). Negative means the model does not fit.
    """
    budget = dep.gpu.hbm_bytes * gpu_memory_utilization
    return budget - weight_bytes_per_gpu(dep) - activation_reserve_gb * 1e9


def kv_capacity_tokens(dep: Deployment, gpu_memory_utilization: float = 0.9,
                       activation_reserve_gb: float = 2.0) -> int:
    pool = kv_pool_bytes_per_gpu(dep, gpu_memory_utilization, activation_reserve_gb)
    return max(0, int(pool // kv_bytes_per_token_per_gpu(dep)))
