"""The default step-time model: a roofline per operator, summed.

Each operator of a step runs as its own kernel, one after another, so each takes its own
max(compute time, memory time) and the step is their sum:

    layers x (QKV, O, MLP GEMMs + attention + elementwise + 2 all-reduces + per-layer overhead)
    + LM head + embedding + fixed step overhead + per-sequence overhead

(a single max over the whole step would let a prefill chunk's GEMMs hide the decodes' KV reads,
which a GPU does not do). Per GPU of the TP group; every coefficient comes from the catalog's GPU and
link entries (emulator/physics/data/*.toml names the source of each).

- GEMM: compute 2 x tokens x K x N / (peak x e x occupancy) against weight and activation bytes / (HBM x e_w),
  combined as max(compute, memory), or as (compute^p + memory^p)^(1/p) where the catalog says the two overlap
  imperfectly (gemm_overlap_norm), plus a fixed kernel latency. The output is cut into tiles (gemm_token_tile
  tokens x gemm_tile_n features, both padded up), run one per SM in whole waves: the last, partial wave leaves
  SMs idle (wave quantization; gemm_tail_fill of that idle time filled by stream-K work), and a GEMM with fewer
  tiles than SMs splits its K loop across whole multiples of its tiles (split-K), whose fp32 partial sums are
  written and read back once each (tokens x N x 4 bytes per slice). Where the catalog names a narrower
  alternative tile (gemm_alt_tile_n), each GEMM takes the faster of the two, as a GEMM library's heuristic
  picks a kernel per shape. Small GEMMs may also run each tile below peak: e = e_max x W / (W + W_half), W
  the output elements per GPU (tokens padded to the tile times N).
- Attention: causal (query, key) pair FLOPs at their own efficiency, against the KV-cache bytes read.
- Elementwise (2 norms, rope, activation, residual add): a fixed cost per kernel plus bytes / bandwidth,
  each kind of kernel at its own fraction of HBM bandwidth (a norm's per-token reduction runs well below
  a plain pointwise kernel). With elementwise_row_ns, the norm, rope and activation kernels (one thread block
  per token) take max(fixed + row elements x row_ns, bytes / bandwidth): a few tokens cost one row's time.
- All-reduce: from the link's fitted latency/bandwidth curve (emulator.physics.roofline.allreduce_seconds).
- Overheads (docs/conventions.md#overheads): per step, per layer, per sampled sequence.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from emulator.physics import roofline
from emulator.physics.catalog import DTYPE_BYTES, Model
from emulator.physics.deployment import BatchShape, Deployment, StepTime

ELEMENTWISE_KERNELS = 5   # input norm, rope, post-attention norm, activation, residual add (Llama block)
ACT = roofline.ACTIVATION_BYTES
PARTIAL_SUM_BYTES = 4     # split-K slices accumulate in fp32 (cuBLAS / CUTLASS split-K workspaces)


class Cost(NamedTuple):
    """One or more operators: wall seconds, and the compute / memory ceilings behind them."""
    seconds: float
    compute_s: float
    memory_s: float
    compute_bound_s: float   # the part of `seconds` spent in compute-bound operators

    # Field by field, spelled out: a generator over zip() costs ~1 us per call, and a step adds several
    # Costs (the simulator prices every engine step).
    def __add__(self, other: Cost) -> Cost:  # type: ignore[override]
        return Cost(self.seconds + other.seconds, self.compute_s + other.compute_s, self.memory_s + other.memory_s,
                    self.compute_bound_s + other.compute_bound_s)

    def scaled(self, k: float) -> Cost:
        return Cost(self.seconds * k, self.compute_s * k, self.memory_s * k, self.compute_bound_s * k)


ZERO = Cost(0.0, 0.0, 0.0, 0.0)


def op_cost(fixed_s: float, compute_s: float, memory_s: float, overlap_norm: float = 0.0) -> Cost:
    """fixed + max(compute, memory); with overlap_norm p > 0, fixed + (compute^p + memory^p)^(1/p) (the two
    ceilings overlap imperfectly: near the ridge the kernel is slower than either alone)."""
    if overlap_norm > 0 and compute_s > 0:
        bound = (compute_s ** overlap_norm + memory_s ** overlap_norm) ** (1.0 / overlap_norm)
    else:
        bound = max(compute_s, memory_s)
    return Cost(fixed_s + bound, compute_s, memory_s, fixed_s + bound if compute_s >= memory_s else 0.0)


def layer_gemms(model: Model, tp: int) -> list[tuple[float, float]]:
    """(K, N) per GPU of a dense layer's GEMMs: fused QKV, O, fused gate+up, down (Megatron sharding)."""
    d = model.head_dim
    q = model.q_heads * d / tp
    kv = math.ceil(model.kv_heads / tp) * d   # KV heads replicate when tp > kv_heads
    f = model.ffn / tp
    return [(model.hidden, q + 2 * kv), (q, model.hidden), (model.hidden, 2 * f), (f, model.hidden)]


class OperatorModel:
    """Step time as the sum of per-operator rooflines (the seam's default implementation)."""

    def __init__(self, dep: Deployment):
        m, g, t = dep.model, dep.gpu, dep.tp
        self.dep = dep
        self.peak = g.peak_flops(dep.weight_dtype)
        self.hbm = g.hbm_bytes_per_s
        self.e_max = g.compute_efficiency
        self.e_weights = g.gemm_bandwidth_efficiency or g.bandwidth_efficiency
        self.half_work = g.gemm_half_work
        self.tile = max(1, g.gemm_token_tile)
        self.tile_n = g.gemm_tile_n if g.sm_count > 0 else 0
        self.sms = g.sm_count
        self.tiles_n = [(self.tile_n, 1.0)] if self.tile_n else []
        if self.tile_n and g.gemm_alt_tile_n > 0:
            self.tiles_n.append((g.gemm_alt_tile_n, g.gemm_alt_tile_efficiency))
        self.tail_fill = g.gemm_tail_fill
        self.overlap = g.gemm_overlap_norm
        self.kernel_s = g.kernel_latency_us * 1e-6
        self.e_attention = g.attention_efficiency or g.compute_efficiency
        self.e_kv = g.bandwidth_efficiency
        self.elementwise_s = g.elementwise_kernel_us * 1e-6
        self.row_s = g.elementwise_row_ns * 1e-9
        self.e_elementwise = g.elementwise_bandwidth_efficiency or g.bandwidth_efficiency
        self.e_norm = g.norm_bandwidth_efficiency or self.e_elementwise
        self.weight_bytes = DTYPE_BYTES[dep.weight_dtype]
        self.layers = m.layers
        self.attn_gemms = layer_gemms(m, t)[:2]
        self.mlp_gemms = layer_gemms(m, t)[2:]
        self.kv_per_token_layer = roofline.kv_bytes_per_token_per_gpu(dep) / m.layers
        self.flops_per_pair = 4.0 * m.q_heads / t * m.head_dim   # QK^T and PV, per layer
        effs = (self.e_norm, self.e_elementwise, g.activation_bandwidth_efficiency or self.e_elementwise,
                g.residual_bandwidth_efficiency or self.e_elementwise)
        self.kind_token_s = [b / (self.hbm * e) for b, e in zip(self.elementwise_traffic(m, t), effs, strict=True)]
        self.elementwise_token_s = sum(self.kind_token_s)
        self.kind_row_s = [self.elementwise_s + self.row_s * r for r in self.elementwise_rows(m, t)]
        self.fixed_s = g.step_overhead_us * 1e-6 + m.layers * g.layer_overhead_us * 1e-6
        self.sequence_s = g.sequence_overhead_us * 1e-6
        self._linear: dict[int, Cost] = {}
        self._head: dict[tuple[int, int], Cost] = {}

    @staticmethod
    def elementwise_traffic(m: Model, t: int) -> tuple[float, float, float, float]:
        """Read + write bytes per token per layer by kind of kernel: the two norms and the residual add over
        the full hidden size (replicated on every rank), rope over this rank's Q and K, SiLU-and-mul over its
        FFN slice (reads gate and up, writes one)."""
        q_k = (m.q_heads + m.kv_heads) * m.head_dim / t
        ffn = m.active_experts * m.ffn / t
        return ACT * 2 * 2 * m.hidden, ACT * 2 * q_k, ACT * 3 * ffn, ACT * 3 * m.hidden

    @staticmethod
    def elementwise_rows(m: Model, t: int) -> tuple[float, float, float, float]:
        """Elements of one token's row each kind of kernel walks in one thread block (vLLM's rms_norm, rotary
        embedding and act_and_mul kernels launch one block per token): the hidden size, this rank's Q and K
        heads, its FFN slice; the residual add is a flat pointwise kernel over all elements (no row)."""
        q_k = (m.q_heads + m.kv_heads) * m.head_dim / t
        return m.hidden, q_k, m.active_experts * m.ffn / t, 0.0

    # -- operators -------------------------------------------------------------------------------

    def gemm(self, tokens: float, k: float, n: float, count: float = 1.0) -> Cost:
        """`count` equal GEMMs run as one grouped kernel (a fused MoE layer's experts): one launch."""
        if tokens <= 0:
            return ZERO
        padded = math.ceil(tokens / self.tile) * self.tile
        work = padded * n
        eff = self.e_max * work / (work + self.half_work)
        memory = (k * n * self.weight_bytes + ACT * tokens * (k + n)) / (self.hbm * self.e_weights)
        if not self.tiles_n:
            compute = 2.0 * padded * k * n / (self.peak * eff)
        else:
            compute = min(self._tiled_compute(tokens, padded, k, n, count, tile_n, eff * rel)
                          for tile_n, rel in self.tiles_n)
        return op_cost(self.kernel_s, count * compute, count * memory, self.overlap)

    def _tiled_compute(self, tokens: float, padded: int, k: float, n: float, count: float, tile_n: int,
                       eff: float) -> float:
        """Compute time of one of `count` GEMMs cut into tile x tile_n output tiles, with split-K's fp32 partial
        sums written and read back when the tiles are too few to fill the SMs."""
        padded_n = math.ceil(n / tile_n) * tile_n
        tiles = math.ceil(count * padded / self.tile * padded_n / tile_n)
        compute = 2.0 * padded * k * padded_n / (self.peak * eff * self._occupancy(tiles))
        split = self.sms // tiles if tiles < self.sms else 1
        if split > 1:
            compute += 2 * split * tokens * n * PARTIAL_SUM_BYTES / (self.hbm * self.e_weights)
        return compute

    def _occupancy(self, tiles: int) -> float:
        """Fraction of the SMs' time a GEMM's output tiles keep busy: whole waves of one tile per SM (the last
        wave partial, gemm_tail_fill of its idle time filled), or, with fewer tiles than SMs, the K loop split
        over as many copies of the tiles as fit."""
        if tiles < self.sms:
            return tiles * (self.sms // tiles) / self.sms
        idle = math.ceil(tiles / self.sms) * self.sms - tiles
        return tiles / (tiles + (1.0 - self.tail_fill) * idle)

    def elementwise(self, tokens: int) -> Cost:
        memory = tokens * self.elementwise_token_s
        if self.row_s <= 0:
            return op_cost(ELEMENTWISE_KERNELS * self.elementwise_s, 0.0, memory)
        # one thread block per token: a kernel takes one row's time until its traffic takes longer (norms: 2)
        copies = (2, 1, 1, 1)   # elementwise_traffic counts both norms together
        seconds = sum(c * max(row, tokens * per_token / c)
                      for c, row, per_token in zip(copies, self.kind_row_s, self.kind_token_s, strict=True))
        return Cost(seconds, 0.0, memory, 0.0)

    def linear_layer(self, tokens: int) -> Cost:
        """One layer's GEMMs and elementwise kernels for `tokens` new tokens (what operator profiles measure)."""
        hit = self._linear.get(tokens)
        if hit is None:
            hit = self._linear[tokens] = self._linear_layer(tokens) if tokens > 0 else ZERO
        return hit

    def _linear_layer(self, tokens: int) -> Cost:
        cost = self.elementwise(tokens)
        for k, n in self.attn_gemms:
            cost = cost + self.gemm(tokens, k, n)
        m = self.dep.model
        if not m.is_moe:
            for k, n in self.mlp_gemms:
                cost = cost + self.gemm(tokens, k, n)
            return cost
        touched = roofline.experts_touched(m, tokens)   # each touched expert runs its share of the tokens
        per_expert = tokens * m.active_experts / touched
        cost = cost + self.gemm(tokens, m.hidden, m.experts)   # the router
        for k, n in self.mlp_gemms:
            cost = cost + self.gemm(per_expert, k, n, count=touched)
        return cost

    def attention_layer(self, tokens: float, context: float, pairs: float) -> Cost:
        if tokens <= 0:
            return ZERO
        compute = pairs * self.flops_per_pair / (self.peak * self.e_attention)
        memory = (context + tokens) * self.kv_per_token_layer / (self.hbm * self.e_kv)
        return op_cost(self.kernel_s, compute, memory)

    def allreduce_layer(self, tokens: int) -> float:
        if self.dep.tp == 1 or tokens <= 0:
            return 0.0
        return 2 * roofline.allreduce_seconds(self.dep, tokens * self.dep.model.hidden * ACT)

    def head(self, tokens: int, sampled: int) -> Cost:
        """Final norm and LM head over the sampled tokens, plus the embedding rows looked up."""
        key = (tokens, sampled)
        hit = self._head.get(key)
        if hit is None:
            m = self.dep.model
            lookup = tokens * m.hidden * self.weight_bytes / (self.hbm * self.e_weights)
            hit = (self.gemm(sampled, m.hidden, m.vocab / self.dep.tp)
                   + op_cost(self.elementwise_s, 0.0, sampled * 2 * ACT * m.hidden / (self.hbm * self.e_norm))
                   + Cost(lookup, 0.0, lookup, 0.0))
            self._head[key] = hit
        return hit

    # -- a step ----------------------------------------------------------------------------------

    def step_time(self, shape: BatchShape) -> StepTime:
        n = shape.new_tokens
        if n == 0:
            return StepTime(seconds=0.0, bound="memory", compute_s=0.0, memory_s=0.0, comm_s=0.0, overhead_s=0.0)
        layer = self.linear_layer(n) + self.attention_layer(n, shape.context_tokens, shape.attention_pairs)
        ops = layer.scaled(self.layers) + self.head(n, shape.sampled)
        comm = self.layers * self.allreduce_layer(n)
        overhead = self.fixed_s + shape.sampled * self.sequence_s
        bound = "compute" if 2 * ops.compute_bound_s >= ops.seconds else "memory"
        return StepTime(seconds=ops.seconds + comm + overhead, bound=bound, compute_s=ops.compute_s,
                        memory_s=ops.memory_s, comm_s=comm, overhead_s=overhead)

    def decode_run_times(self, batch: int, context_sum: int, steps: int) -> np.ndarray:
        """`steps` decode steps of `batch` sequences whose contexts each grow by one token per step;
        equal to step_time step by step (only attention changes from one step to the next)."""
        fixed = self.step_time(BatchShape(new_tokens=batch, sampled=batch))
        fixed_s = fixed.seconds - self.layers * self.attention_layer(batch, 0, 0).seconds
        context = context_sum + np.arange(steps, dtype=np.float64) * batch
        compute = (context + batch) * self.flops_per_pair / (self.peak * self.e_attention)
        memory = (context + batch) * self.kv_per_token_layer / (self.hbm * self.e_kv)
        return fixed_s + self.layers * (self.kernel_s + np.maximum(compute, memory))
