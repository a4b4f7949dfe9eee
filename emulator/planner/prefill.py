"""Prefill: per-request service time from the roofline, and the queue in front of it.

A prompt's new tokens (prompt minus its cached prefix) run in chunks of at most the step's prefill
budget (max_num_batched_tokens, less the decode tokens that share a colocated step). Two service
times matter:
- alone: the request's own steps when nothing else is queued (its latency at low load);
- share: its token share of full-budget steps. Under load the engine packs queued prompts into one
  step, so the fixed costs of a step (weight reads, per-layer overhead) are shared; the share is
  what each request really costs the server, and rate x share is the utilization that must stay < 1.
The queue in front of these steps, and TTFT, are in `prefill_queue`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from emulator.physics import roofline
from emulator.planner import decode
from emulator.planner.context import Context


@dataclass(frozen=True)
class PrefillProfile:
    decodes: int            # decode sequences in every step (colocated); 0 on a prefill worker
    budget: int             # prefill tokens one step can take
    alone: np.ndarray       # per prompt point: seconds of its own steps, nothing else queued
    share: np.ndarray       # per prompt point: its token share of full-budget steps
    last_tokens: np.ndarray  # per prompt point: tokens of its last chunk
    last_step: np.ndarray   # per prompt point: seconds of its last step
    chunks: Chunks
    full_step: roofline.StepTime  # a step whose prefill fills the budget

    def mean_alone(self, ctx: Context) -> float:
        return float(self.alone @ ctx.prompts.weights)

    def mean_share(self, ctx: Context) -> float:
        return float(self.share @ ctx.prompts.weights)


@dataclass(frozen=True)
class Chunks:
    """Every prefill chunk of every prompt point (one engine step each when run alone)."""
    tokens: np.ndarray
    cached: np.ndarray
    final: np.ndarray
    weight: np.ndarray      # the prompt point's probability x the chunks this row stands for (`_chunking`)
    seconds: np.ndarray     # step time alone (with the step's decodes)


def profile(ctx: Context, decodes: int = 0) -> PrefillProfile:
    key = ("prefill_profile", decodes)
    if key not in ctx.memo:
        ctx.memo[key] = _profile(ctx, decodes)
    return ctx.memo[key]


def _base(ctx: Context, decodes: int) -> roofline.BatchShape:
    """The decode part of a colocated step: `decodes` sequences at the mean decode context."""
    c = decode.profile(ctx).context
    return roofline.BatchShape(new_tokens=decodes, context_tokens=int(round(decodes * c)),
                               attention_pairs=int(round(decodes * c)) + decodes, sampled=decodes)


def step_with(ctx: Context, decodes: int, chunk: int, cached: int, final: bool, extra: int = 0) -> roofline.StepTime:
    """A step: the decodes, one prefill chunk, and `extra` tokens of other prompts packed behind it
    (as the separate sequences they are: typical chunks, see `piece`)."""
    key = ("step_with", decodes, chunk, cached, final, extra)
    hit = ctx.memo.get(key)
    if hit is None:
        shape = _base(ctx, decodes).add(chunk, cached, samples=final)
        _add_pieces(ctx, shape, decodes, extra)
        hit = ctx.memo[key] = roofline.step_time(ctx.dep, shape)
    return hit


def packed_step(ctx: Context, decodes: int, tokens: int) -> roofline.StepTime:
    """A step carrying the decodes and `tokens` prefill tokens of queued prompts packed together."""
    key = ("packed_step", decodes, tokens)
    hit = ctx.memo.get(key)
    if hit is None:
        hit = ctx.memo[key] = roofline.step_time(ctx.dep, _add_pieces(ctx, _base(ctx, decodes), decodes, tokens))
    return hit


def piece(ctx: Context, decodes: int) -> tuple[int, int]:
    """(tokens, cached context) of the typical chunk a packed step carries: the mean over every chunk
    of every prompt point at this budget. Packed prompts are separate sequences, each attending over
    its own tokens only: costing them as one long sequence overstates attention (15% for 32 prompts
    of 256 tokens on an 8B)."""
    key = ("piece", decodes)
    if key not in ctx.memo:
        rows = list(_chunking(ctx, _budget(ctx, decodes)))
        w = np.asarray([r[3] * r[5] for r in rows])
        tokens = float(np.asarray([r[1] for r in rows]) @ w / w.sum())
        cached = float(np.asarray([r[2] for r in rows]) @ w / w.sum())
        ctx.memo[key] = (max(1, int(round(tokens))), int(round(cached)))
    return ctx.memo[key]


def _add_pieces(ctx: Context, shape: roofline.BatchShape, decodes: int, tokens: int) -> roofline.BatchShape:
    """Add `tokens` prefill tokens as whole typical chunks and a remainder, each its own sequence."""
    if tokens <= 0:
        return shape
    size, cached = piece(ctx, decodes)
    whole, rest = divmod(int(tokens), size)
    if whole:
        one = roofline.BatchShape().add(size, cached, samples=True)
        shape.new_tokens += whole * one.new_tokens
        shape.context_tokens += whole * one.context_tokens
        shape.attention_pairs += whole * one.attention_pairs
        shape.sampled += whole * one.sampled
    if rest:
        shape.add(rest, cached, samples=True)
    return shape


def _budget(ctx: Context, decodes: int) -> int:
    return max(1, ctx.limits.max_num_batched_tokens - decodes)


MAX_CHUNK_GROUPS = 16   # a prompt's full chunks are costed in at most this many groups (`_chunking`)


def _chunking(ctx: Context, budget: int):
    """(prompt point, chunk tokens, cached before it, weight, final, count) for the chunks of every
    point: its full chunks in at most MAX_CHUNK_GROUPS runs of `count` consecutive ones, each costed at
    its mean cached context (a step's time is close to linear in the context it attends over), then
    its last chunk. A budget that decodes have nearly used up leaves chunks of a few tokens (8B,
    256-token budget, 250 decodes: 667 chunks for a 4,000-token prompt), and costing each of them
    made one capacity search take minutes and gigabytes; the sizes, counts and mean context are kept."""
    for i, (new, cached, weight) in enumerate(zip(ctx.new_tokens, ctx.cached, ctx.prompts.weights, strict=True)):
        new, cached = int(new), int(cached)
        full, last = divmod(new, budget)
        if full and not last:
            full, last = full - 1, budget     # the last chunk is a full one
        groups = min(full, MAX_CHUNK_GROUPS)
        for g in range(groups):
            first, end = full * g // groups, full * (g + 1) // groups    # chunks first..end-1
            mean_done = budget * (first + end - 1) / 2
            yield i, budget, cached + int(round(mean_done)), weight, False, end - first
        if last:
            yield i, last, cached + full * budget, weight, True, 1


def _profile(ctx: Context, decodes: int) -> PrefillProfile:
    budget = _budget(ctx, decodes)
    points = len(ctx.prompts.values)
    alone, share = np.zeros(points), np.zeros(points)
    last_tokens, last_step = np.zeros(points), np.zeros(points)
    rows: list[tuple[int, int, bool, float, float]] = []
    for i, chunk, cached, weight, final, count in _chunking(ctx, budget):
        t = step_with(ctx, decodes, chunk, cached, final).seconds
        full = step_with(ctx, decodes, chunk, cached, final, extra=budget - chunk).seconds
        alone[i] += t * count
        share[i] += full * chunk / budget * count
        last_tokens[i], last_step[i] = chunk, t
        rows.append((chunk, cached, final, weight * count, t))
    tokens, cached_tokens, finals, weights, seconds = zip(*rows, strict=True)
    chunks = Chunks(np.asarray(tokens, dtype=float), np.asarray(cached_tokens, dtype=float),
                    np.asarray(finals, dtype=bool), np.asarray(weights, dtype=float), np.asarray(seconds, dtype=float))
    full_step = packed_step(ctx, decodes, budget)
    return PrefillProfile(decodes=decodes, budget=budget, alone=alone, share=share, last_tokens=last_tokens,
                          last_step=last_step, chunks=chunks, full_step=full_step)


def token_seconds(ctx: Context, prof: PrefillProfile) -> float:
    """Marginal step time of one more prefill token (the compute slope of a half-to-full step)."""
    half = prof.budget // 2
    lower = packed_step(ctx, prof.decodes, half) if half > 0 else roofline.step_time(ctx.dep, _base(ctx, prof.decodes))
    return (prof.full_step.seconds - lower.seconds) / (prof.budget - half)


def packing(ctx: Context, prof: PrefillProfile, per_worker: float, before: float = 0.0) -> tuple[float, float]:
    """(mean prefill tokens per prefill-carrying step N, share of time such steps run).

    A step takes every chunk queued when it starts, so it carries the chunks that arrived during the
    step before it: K >= 1 of them, Poisson given at least one (zero-truncated, mean mu / (1 - e^-mu),
    mu = chunk rate x that step's length). The step before is another prefill step (a run goes on
    while chunks keep arriving, so runs last e^mu steps) or, for the first of a run, whatever ran
    before (`before`: a decode-only step; 0 on an idle prefill worker, where an arrival starts at
    once). Then busy = token flow x T(N) / N, the time those tokens take at that packing.
    """
    ch = prof.chunks
    w = ch.weight / ch.weight.sum()
    size = float(ch.tokens @ w)
    chunk_rate = per_worker * float(ch.weight.sum() / ctx.prompts.weights.sum())
    flow = per_worker * float(ctx.new_tokens @ ctx.prompts.weights)
    if flow <= 0:
        return size, 0.0

    def step_s(n: float) -> float:
        return packed_step(ctx, prof.decodes, packed_tokens(ctx, prof, n)).seconds

    start = _truncated_mean(chunk_rate * before)
    t, n = step_s(size), size
    for _ in range(30):  # a contraction (step time grows slower than packing): converges in a few
        mu = chunk_rate * t
        run = math.exp(min(mu, 50.0))
        n = min(float(prof.budget), size * (start / run + (1 - 1 / run) * _truncated_mean(mu)))
        t_new = step_s(n)
        if abs(t_new - t) <= 1e-6 * t:
            break
        t = t_new
    return n, flow * step_s(n) / n


def packed_tokens(ctx: Context, prof: PrefillProfile, n: float) -> int:
    """A mean packing of n prefill tokens as a memoizable count: rounded to whole KV blocks (close
    enough), but never past the step's budget. Rounding up past it costed a step the engine never
    runs: with a 256-token budget beside 21 decodes, 235 tokens rounded to 240 put the step over a
    GEMM tile boundary (8B, TP2: 11.0 ms instead of 9.4 ms), and the mean ITL and batch with it."""
    blocks = ctx.limits.block_size
    n = min(float(prof.budget), max(1.0, n))
    return max(1, min(prof.budget, int(round(n / blocks)) * blocks))


def _truncated_mean(mu: float) -> float:
    """Mean of a Poisson(mu) count given it is at least 1."""
    return 1.0 if mu < 1e-9 else mu / -math.expm1(-mu)


def with_packing(ctx: Context, prof: PrefillProfile, tokens: float, cached: float, final: bool, seconds: float,
                 packed: float) -> float:
    """A chunk's step once the queue packs other prompts behind it up to `packed` tokens in all."""
    blocks = ctx.limits.block_size
    extra = int(min(prof.budget - tokens, packed - tokens) // blocks * blocks)
    if extra <= 0:
        return seconds
    return step_with(ctx, prof.decodes, int(tokens), int(cached), final, extra).seconds
