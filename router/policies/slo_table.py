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
                 (emulator.physics.steptime.host_onboard_time: bytes per token / link bandwidth + latency);
  kv_tokens, max_num_seqs, mean_output_tokens
                 when a prompt must wait for a sequence slot or for KV blocks: the HBM KV capacity
                 (emulator.physics.roofline.kv_capacity_tokens, as the engine sizes its pool), the batch
                 cap, and the mean output of the spec's [workload] (what decoders have left to run).

A prefill chunk's step costs the step of the decode batch it rides with plus the chunk's *marginal*
time: mixed_s[decoders][their context][chunk], a step of such decoders with the chunk less their step
alone (not additive: a compute-bound chunk pays the weights' read once, so an 8,000-token chunk with
32 decoders at 1k context is 207 ms and the chunk alone 209 ms on the default spec, while a 300-token
chunk adds 5 ms to 30 decoders at 3k context), plus the chunk's own attention over its cached context
(step_s[chunk, context] - step_s[chunk, 0]). Heterogeneous pools: the table is the first
prompt-capable pool's; workers of other pools are predicted with it.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

import msgspec

from emulator import workload
from emulator.physics import roofline, steptime
from emulator.spec import ClusterSpec

CHUNKS = (1, 16, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 16384)
CONTEXTS = (0, 1024, 4096, 16384, 65536, 131072)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MIX_DECODERS = (0, 4, 16, 32, 64, 128, 256, 512)        # decode sequences a prefill chunk rides with
MIX_CONTEXTS = (0, 512, 1024, 2048, 4096, 8192, 16384)     # their context, per sequence
KV_SLOPE_CONTEXT = 32768
OUTPUT_SAMPLES = 1000   # workload requests whose mean output sets mean_output_tokens


class SloTable(msgspec.Struct, frozen=True):
    block_size: int                  # tokens per KV block (the index's unit)
    budget: int                      # max_num_batched_tokens: new tokens one step may carry
    chunks: tuple[int, ...]
    contexts: tuple[int, ...]
    step_s: tuple[tuple[float, ...], ...]   # [chunk][context] seconds
    # [decoders][decoder context][chunk]: what a chunk (no context) adds to a step of such decoders
    mixed_s: tuple[tuple[tuple[float, ...], ...], ...]
    decode_batches: tuple[int, ...]
    decode_s: tuple[float, ...]      # decode step per batch size, empty contexts
    kv_read_s: float                 # a decode step's extra seconds per cached token read
    onboard_token_s: float = 0.0     # host -> HBM seconds per token (0: no host tier)
    onboard_latency_s: float = 0.0
    kv_tokens: int = 0               # one worker's HBM KV capacity in tokens (kv_usage x this: context held)
    max_num_seqs: int = 256          # sequences one worker's batch may hold
    mean_output_tokens: float = 0.0  # the spec's workload: a request's mean output (batch / this leave per step)
    ttft_slo_s: float = 1.0          # the spec's SLOs: the defaults for requests that state none
    itl_slo_s: float = 0.1
    time_scale: float = 1.0          # wall seconds per emulated second on the live cluster (HTTP glue only)

    # ---- lookups (pure, cheap) ------------------------------------------------------------------

    def chunk_marginal(self, new: int, context: int, decoders: int = 0, decoder_context: int = 0) -> float:
        """What a prefill chunk of `new` tokens over `context` cached ones adds to a step that carries
        `decoders` decode tokens of `decoder_context` cached tokens each: the roofline's own figure for a
        chunk beside such decoders (mixed_s), plus the chunk's attention over its context."""
        row = self.mixed_row(decoders, decoder_context)
        return self.row_marginal(row, new, context)

    def mixed_row(self, decoders: int, decoder_context: int) -> list[float]:
        """mixed_s at (decoders, context per decoder), bilinear, one value per CHUNKS entry."""
        d = _bracket(self.mix_decoders, decoders)
        c = _bracket(MIX_CONTEXTS, decoder_context)
        (i0, i1, u), (j0, j1, v) = d, c
        m = self.mixed_s
        return [(1 - u) * ((1 - v) * m[i0][j0][k] + v * m[i0][j1][k]) + u * ((1 - v) * m[i1][j0][k] + v * m[i1][j1][k])
                for k in range(len(self.chunks))]

    def row_marginal(self, row: list[float], new: int, context: int) -> float:
        extra = self._step(new, context) - self._step(new, 0) if context else 0.0
        return max(0.0, _interp(self.chunks, row, new) + extra)

    @property
    def mix_decoders(self) -> tuple[int, ...]:
        return MIX_DECODERS

    def decode_step(self, batch: int, context_tokens: int) -> float:
        """One step of a decode batch of `batch` sequences reading `context_tokens` cached tokens in all
        (the fixed cost of a step: a batch of 0 costs what a batch of 1 does)."""
        return _interp(self.decode_batches, self.decode_s, max(batch, 1)) + self.kv_read_s * context_tokens

    def chunk_budget(self, decoders: int) -> int:
        """Prefill tokens a step has room for once its decode tokens are scheduled (vLLM: running first)."""
        return max(1, self.budget - decoders)

    def prefill_work(self, new: int, cached: int, decoders: int = 0, decoder_context: int = 0) -> float:
        """Marginal seconds of prefilling `new` tokens after `cached` ones beside `decoders` decode
        tokens (of `decoder_context` each), in chunks of the budget they leave."""
        seconds, done, room = 0.0, 0, self.chunk_budget(decoders)
        row = self.mixed_row(decoders, decoder_context)
        while done < new:
            chunk = min(room, new - done)
            seconds += self.row_marginal(row, chunk, cached + done)
            done += chunk
        return seconds

    def admission_wait(self, decoders: int, step_s: float, held: int, waiting: int, waiting_tokens: int) -> float:
        """Seconds before the scheduler can admit a prompt needing `waiting_tokens` of KV (its own and the
        queue's ahead of it) behind `waiting` requests: a prompt waits while the batch holds max_num_seqs
        sequences or HBM cannot take its blocks, until enough decoders finish. By Little's law a batch of
        `decoders` whose requests emit mean_output_tokens each, one per step, sees decoders /
        (mean_output_tokens x step) of them finish per second (not decoders / their mean *remaining*
        output: that counts each departure twice); each frees its share of `held`."""
        if decoders <= 0 or self.mean_output_tokens <= 0:
            return 0.0
        life = max(1.0, self.mean_output_tokens) * step_s   # a request's mean time in the batch
        slots = decoders + waiting + 1 - self.max_num_seqs
        kv = held + waiting_tokens - self.kv_tokens
        wait_slots = slots * life / decoders if slots > 0 else 0.0
        wait_kv = kv * life / held if kv > 0 and held > 0 else 0.0
        return max(wait_slots, wait_kv)

    def onboard(self, tokens: int) -> float:
        return tokens * self.onboard_token_s + self.onboard_latency_s if tokens > 0 else 0.0

    def _step(self, new: int, context: int) -> float:
        """Bilinear in (chunk, context) on the grid; linear extrapolation past the largest context."""
        row = [_interp(self.chunks, [self.step_s[i][j] for i in range(len(self.chunks))], new)
               for j in range(len(self.contexts))]
        return _interp(self.contexts, row, context)


def _bracket(xs: Sequence[int], x: float) -> tuple[int, int, float]:
    """(i, i + 1, weight of i + 1) around x on the grid, clamped to its ends."""
    if x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, len(xs) - 1, 0.0
    i = bisect_right(xs, x)
    return i - 1, i, (x - xs[i - 1]) / (xs[i] - xs[i - 1])


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
    mixed = tuple(tuple(_mixed(dep, d, c) for c in MIX_CONTEXTS) for d in MIX_DECODERS)
    deep = roofline.step_time(dep, roofline.BatchShape().add(1, KV_SLOPE_CONTEXT)).seconds
    onboard_token = onboard_latency = 0.0
    if spec.engine.host_kv_gb > 0:
        link = spec.host_swap_link()
        onboard_latency = link.latency_s
        onboard_token = (steptime.host_onboard_time(dep, 1 << 20, link) - link.latency_s) / (1 << 20)
    return SloTable(block_size=spec.engine.block_size, budget=spec.engine.max_num_batched_tokens,
                    chunks=CHUNKS, contexts=CONTEXTS, step_s=tuple(step), mixed_s=mixed,
                    decode_batches=DECODE_BATCHES,
                    decode_s=decode, kv_read_s=max(0.0, (deep - decode[0]) / KV_SLOPE_CONTEXT),
                    onboard_token_s=onboard_token, onboard_latency_s=onboard_latency,
                    kv_tokens=roofline.kv_capacity_tokens(dep, spec.engine.gpu_memory_utilization,
                                                          spec.engine.activation_reserve_gb),
                    max_num_seqs=spec.engine.max_num_seqs, mean_output_tokens=_mean_output(spec),
                    ttft_slo_s=spec.slo.ttft_p99_s, itl_slo_s=spec.slo.itl_p99_s, time_scale=spec.engine.time_scale)


def _mixed(dep: roofline.Deployment, decoders: int, context: int) -> tuple[float, ...]:
    """Per CHUNKS entry: a step of `decoders` decode tokens over `context` each plus the chunk, less the
    decoders' step alone (with no decoders: less the smallest step, one token)."""
    alone = roofline.step_time(dep, roofline.batch_shape([(1, context)] * max(decoders, 1))).seconds
    return tuple(roofline.step_time(dep, roofline.batch_shape([(1, context)] * decoders + [(n, 0)])).seconds - alone
                 for n in CHUNKS)


def _mean_output(spec: ClusterSpec) -> float:
    """Mean output tokens of the spec's workload (router.frontdoor.drain samples it the same way)."""
    requests = workload.from_spec(spec, 1.0, num_requests=OUTPUT_SAMPLES)
    return float(sum(r.max_tokens for r in requests)) / max(len(requests), 1)


def steps(tokens: int, budget: int) -> int:
    """Engine steps to push `tokens` new tokens through a per-step budget (at least one)."""
    return max(1, math.ceil(tokens / budget))
