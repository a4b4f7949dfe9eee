"""KV memory: resident tokens per running sequence against a worker's block pool.

A running request holds ceil((prompt + generated) / block) blocks, so the pool's occupancy is a sum
over the running sequences. Their number is Poisson (an infinite-server queue; spread by burstiness),
so occupancy is compound Poisson: mean = n x E[t], variance = dispersion x n x E[t^2] (t: tokens one
sequence holds, time-averaged over its life). An arriving request must find room for its prompt; by
PASTA it sees the time-average occupancy. Prefix blocks common to running requests are counted once
(workload.kv_sharing; they are assumed to take a small part of the pool). The pool is adequate while
P(occupancy + need > pool) stays
at or below kv_wait_fraction (1%, design 3b); sizing at 100% use would make a large share wait, and
the engine preempts (recompute) once the mean occupancy reaches the pool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from emulator.planner import decode, dist, queueing
from emulator.planner.context import Context


@dataclass(frozen=True)
class KvState:
    mean_tokens: float     # mean KV tokens held on one worker
    sd_tokens: float
    pool_tokens: int
    wait_probability: float  # share of arrivals that find too few free blocks

    @property
    def usage(self) -> float:
        return self.mean_tokens / self.pool_tokens

    def ok(self, ctx: Context) -> bool:
        return self.wait_probability <= ctx.req.kv_wait_fraction


def state(ctx: Context, running: float, extra_tokens: float = 0.0) -> KvState:
    """Occupancy with `running` decode sequences on average plus `extra_tokens` held by others
    (prompts being prefilled next to them, or KV landing over the link)."""
    prof = decode.profile(ctx)
    dispersion = queueing.infinite_server_dispersion(ctx.ca2)
    mean = running * prof.resident + extra_tokens
    sd = math.sqrt(max(0.0, dispersion * running * prof.resident2))
    need = float((ctx.prompts.values - ctx.workload.kv_sharing * ctx.cached) @ ctx.prompts.weights) + 1.0
    # a new request needs blocks for its prompt (less shared hits) and its first token
    room = ctx.pool_tokens - need - mean
    if sd == 0:
        p = 0.0 if room >= 0 else 1.0
    else:
        p = 1.0 - dist.phi(room / sd)
    return KvState(mean_tokens=mean, sd_tokens=sd, pool_tokens=ctx.pool_tokens, wait_probability=p)


def seq_cap_probability(ctx: Context, running: float) -> float:
    """Share of arrivals that find max_num_seqs sequences running (normal approximation)."""
    dispersion = queueing.infinite_server_dispersion(ctx.ca2)
    sd = math.sqrt(max(dispersion * running, 1e-12))
    return 1.0 - dist.phi((ctx.limits.max_num_seqs - 1 - running) / sd)


def max_running(ctx: Context) -> float:
    """Mean running sequences at which arrivals start waiting for blocks more than kv_wait_fraction."""
    lo, hi = 0.0, float(ctx.pool_tokens)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if state(ctx, mid).ok(ctx) else (lo, mid)
    return lo


def preemption_running(ctx: Context) -> float:
    """Mean running sequences at which the mean occupancy fills the pool: preemption is continuous."""
    return ctx.pool_tokens / decode.profile(ctx).resident
