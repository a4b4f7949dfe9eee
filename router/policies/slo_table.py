"""The roofline figures the slo_aware policy may use, computed once from the spec at start-up.

The router does not import the planner; like router.frontdoor.drain it asks the emulator's physics
(emulator.physics.roofline, the same step-time seam the workers run) for a few numbers, here a small
table, and the policy only interpolates in it per request (no roofline call on the request path):

  step_s[i][j]   one engine step carrying a prefill chunk of CHUNKS[i] new tokens over CONTEXTS[j]
                 cached ones (the chunk's attention reads them), on one worker of the first
                 prompt-capable pool, as emulator.physics.roofline.step_time prices it;
  decode_s[k]    one decode step of DECODE_BATCHES[k] sequences with empty contexts; each cached
                 token a decode step reads adds kv_read_s (the slope of a one-sequence decode step
                 between context 0 and KV_SLOPE_CONTEXT);
  onboard_*      copying host-held KV back to HBM over the spec's host link
                 (emulator.physics.steptime.host_onboard_time: bytes per token / link bandwidth + latency).

A prefill chunk's step costs the step of the decode batch it rides with plus the chunk's *marginal*
time, step_s[chunk, context] - step_s[1 token, 0]: a compute-bound chunk pays the weights' read once,
and decode tokens in it cost little more (measured on the default spec: an 8,000-token chunk with 32
decoders at 1k context is 207 ms, the chunk alone 209 ms). Heterogeneous pools: the table is the first
prompt-capable pool's; workers of other pools are predicted with it.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

import msgspec

from emulator.physics import roofline, steptime
from emulator.spec import ClusterSpec

CHUNKS = (1, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)
CONTEXTS = (0, 1024, 4096, 16384, 65536, 131072)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
KV_SLOPE_CONTEXT = 32768


class SloTable(msgspec.Struct, frozen=True):
    block_size: int                  # tokens per KV block (the index's unit)
    budget: int                      # max_num_batched_tokens: new tokens one step may carry
    chunks: tuple[int, ...]
    contexts: tuple[int, ...]
    step_s: tuple[tuple[float, ...], ...]   # [chunk][context] seconds
    decode_batches: tuple[int, ...]
    decode_s: tuple[float, ...]      # decode step per batch size, empty contexts
    kv_read_s: float                 # a decode step's extra seconds per cached token read
    onboard_token_s: float = 0.0     # host -> HBM seconds per token (0: no host tier)
    onboard_latency_s: float = 0.0
    kv_tokens: int = 0               # one worker's HBM KV capacity in tokens (kv_usage x this: context held)
    ttft_slo_s: float = 1.0          # the spec's SLOs: the defaults for requests that state none
    itl_slo_s: float = 0.1
    time_scale: float = 1.0          # wall seconds per emulated second on the live cluster (HTTP glue only)

    # ---- lookups (pure, cheap) ------------------------------------------------------------------

    def chunk_marginal(self, new: int, context: int, decoders: int = 0) -> float:
        """What a prefill chunk of `new` tokens over `context` cached ones adds to a step that carries
        `decoders` decode tokens: the step priced as one chunk of both, less the decode step alone (once
        the chunk makes the step compute-bound, the decode tokens' GEMM work is no longer free)."""
        return max(0.0, self._step(new + decoders, context) - self._step(decoders, 0))

    def decode_step(self, batch: int, context_tokens: int) -> float:
        """One step of a decode batch of `batch` sequences reading `context_tokens` cached tokens in all
        (the fixed cost of a step: a batch of 0 costs what a batch of 1 does)."""
        return _interp(self.decode_batches, self.decode_s, max(batch, 1)) + self.kv_read_s * context_tokens

    def chunk_budget(self, decoders: int) -> int:
        """Prefill tokens a step has room for once its decode tokens are scheduled (vLLM: running first)."""
        return max(1, self.budget - decoders)

    def prefill_work(self, new: int, cached: int, decoders: int = 0) -> float:
        """Marginal seconds of prefilling `new` tokens after `cached` ones beside `decoders` decode
        tokens, in chunks of the budget they leave."""
        seconds, done, room = 0.0, 0, self.chunk_budget(decoders)
        while done < new:
            chunk = min(room, new - done)
            seconds += self.chunk_marginal(chunk, cached + done, decoders)
            done += chunk
        return seconds

    def onboard(self, tokens: int) -> float:
        return tokens * self.onboard_token_s + self.onboard_latency_s if tokens > 0 else 0.0

    def _step(self, new: int, context: int) -> float:
        """Bilinear in (chunk, context) on the grid; linear extrapolation past the largest context."""
        row = [_interp(self.chunks, [self.step_s[i][j] for i in range(len(self.chunks))], new)
               for j in range(len(self.contexts))]
        return _interp(self.contexts, row, context)


def _interp(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys); extrapolates from the last segment above the grid."""
    if x <= xs[0]:
        return ys[0]
    i = min(bisect_right(xs, x), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def from_spec(spec: ClusterSpec) -> SloTable:
    """The table for the spec's first prompt-capable pool (the pool drain.prefill_times also uses)."""
    pool = next(p for p in spec.pools if p.role != "decode")
    dep = spec.deployment(pool)
    step = [tuple(roofline.step_time(dep, roofline.BatchShape().add(n, c)).seconds for c in CONTEXTS)
            for n in CHUNKS]
    decode = tuple(roofline.step_time(dep, roofline.batch_shape((1, 0) for _ in range(b))).seconds
                   for b in DECODE_BATCHES)
    deep = roofline.step_time(dep, roofline.BatchShape().add(1, KV_SLOPE_CONTEXT)).seconds
    onboard_token = onboard_latency = 0.0
    if spec.engine.host_kv_gb > 0:
        link = spec.host_swap_link()
        onboard_latency = link.latency_s
        onboard_token = (steptime.host_onboard_time(dep, 1 << 20, link) - link.latency_s) / (1 << 20)
    return SloTable(block_size=spec.engine.block_size, budget=spec.engine.max_num_batched_tokens,
                    chunks=CHUNKS, contexts=CONTEXTS, step_s=tuple(step), decode_batches=DECODE_BATCHES,
                    decode_s=decode, kv_read_s=max(0.0, (deep - decode[0]) / KV_SLOPE_CONTEXT),
                    onboard_token_s=onboard_token, onboard_latency_s=onboard_latency,
                    kv_tokens=roofline.kv_capacity_tokens(dep, spec.engine.gpu_memory_utilization,
                                                          spec.engine.activation_reserve_gb),
                    ttft_slo_s=spec.slo.ttft_p99_s, itl_slo_s=spec.slo.itl_p99_s, time_scale=spec.engine.time_scale)


def steps(tokens: int, budget: int) -> int:
    """Engine steps to push `tokens` new tokens through a per-step budget (at least one)."""
    return max(1, math.ceil(tokens / budget))
