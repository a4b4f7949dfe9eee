"""Physics primitives of kvlab: weights, KV bytes, FLOPs, links, and the public step-time helpers.

A step processes, for each sequence in the batch, ``n`` new tokens on top of ``c`` tokens already in
its KV cache (a decode token is n=1; a prefill chunk is n>1). How long it takes is asked of the one
step-time seam (``emulator.physics.steptime``): by default a per-operator roofline (``emulator.physics.operators``),
where each GEMM, attention, elementwise kernel and all-reduce takes its own max(compute, memory) and
the step is their sum plus fixed overheads; or a calibrated model from a user catalog. The helpers
below (step_time, prefill_time, decode_time, mixed_time, decode_run_times) all go through that seam.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from emulator.physics.catalog import DTYPE_BYTES, Link, Model
from emulator.physics.deployment import BatchShape, Deployment, StepTime, batch_shape

__all__ = ["ACTIVATION_BYTES", "BatchShape", "Deployment", "StepTime", "batch_shape", "decode_run_times",
           "decode_time", "experts_touched", "kv_bytes_per_token", "kv_bytes_per_token_per_gpu",
           "kv_capacity_tokens", "kv_pool_bytes_per_gpu", "kv_transfer_time", "mixed_time", "prefill_time",
           "step_flops", "step_time", "step_traffic", "step_weight_bytes", "tp_allreduce_time", "weight_bytes",
           "weight_bytes_per_gpu"]

ACTIVATION_BYTES = 2  # all-reduce payloads are bf16 activations in every engine modelled here


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


def step_traffic(dep: Deployment, shape: BatchShape, steps: int = 1) -> tuple[float, float]:
    """(FLOPs, HBM bytes) per GPU of `steps` steps of equal width whose shapes sum to `shape`.

    What the work needs, whatever the timing model: the FLOPs of step_flops; the weights read once per
    step (a MoE model only the experts its tokens hit); every cached token's KV read and every new
    token's KV written. Divided by a datasheet peak and elapsed time they give MFU and MBU."""
    m = dep.model
    per_step = shape.new_tokens // max(steps, 1)
    weights = steps * step_weight_bytes(m, dep.weight_dtype, per_step) / dep.tp
    kv = (shape.context_tokens + shape.new_tokens) * kv_bytes_per_token_per_gpu(dep)
    return step_flops(m, shape) / dep.tp, weights + kv


def step_time(dep: Deployment, shape: BatchShape) -> StepTime:
    """Duration of one engine step on one TP group, from the step-time seam."""
    from emulator.physics import steptime  # the seam builds on the primitives here, so it is imported late
    return steptime.step_time(dep, shape)


def decode_run_times(dep: Deployment, batch: int, context_sum: int, steps: int) -> np.ndarray:
    """Durations of `steps` back-to-back decode steps of a fixed batch (see steptime.decode_run_times)."""
    from emulator.physics import steptime
    return steptime.decode_run_times(dep, batch, context_sum, steps)


def allreduce_seconds(dep: Deployment, payload_bytes: float) -> float:
    """One all-reduce of `payload_bytes` across the TP group.

    From the link's measured latency/bandwidth curve for this GPU count when the catalog has one;
    otherwise a ring: 2(t-1)/t of the payload over each GPU's link, plus one link latency.
    """
    t = dep.tp
    if t == 1:
        return 0.0
    link = dep.tp_link
    assert link is not None, "Deployment requires a tp_link when tp > 1"
    fit = link.allreduce_fit(t)
    if fit is not None:
        return fit.seconds(payload_bytes)
    return link.latency_s + 2.0 * (t - 1) / t * payload_bytes / link.bytes_per_s


def tp_allreduce_time(dep: Deployment, tokens: int) -> float:
    """Megatron-style TP: two all-reduces of the activations per layer (after attention, after MLP)."""
    if dep.tp == 1:
        return 0.0
    return 2 * dep.model.layers * allreduce_seconds(dep, tokens * dep.model.hidden * ACTIVATION_BYTES)


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
    for (new, cached), final in zip(prefill_chunks, finals, strict=True):
        shape.add(new, cached, samples=final)
    return step_time(dep, shape)


def kv_transfer_time(num_bytes: float, link: Link) -> float:
    """Moving KV over a link: bytes / bandwidth + latency (zero bytes costs nothing)."""
    if num_bytes <= 0:
        return 0.0
    return num_bytes / link.bytes_per_s + link.latency_s


def kv_pool_bytes_per_gpu(dep: Deployment, gpu_memory_utilization: float, activation_reserve_gb: float) -> float:
    """HBM left for KV blocks on each GPU.

    vLLM budgets gpu_memory_utilization of HBM (its default: emulator.engine_config), then subtracts weights
    and the peak activation memory found by a profiling run; a couple of GB is typical for 8-70B models at
    the default batch token budget (an estimate to calibrate). Negative means the model does not fit.
    """
    budget = dep.gpu.hbm_bytes * gpu_memory_utilization
    return budget - weight_bytes_per_gpu(dep) - activation_reserve_gb * 1e9


def kv_capacity_tokens(dep: Deployment, gpu_memory_utilization: float, activation_reserve_gb: float) -> int:
    pool = kv_pool_bytes_per_gpu(dep, gpu_memory_utilization, activation_reserve_gb)
    return max(0, int(pool // kv_bytes_per_token_per_gpu(dep)))
