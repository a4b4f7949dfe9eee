"""Decode: the running batch as a fixed point of Little's law, and inter-token latency from step time.

Every running sequence advances one token per engine step, so a sequence's time in decode is
(output tokens - 1) x ITL, and Little's law gives the batch:  b = rate x (E[output] - 1) x ITL(b).
ITL(b) is the roofline step time of a batch holding the tagged sequence plus b others (b is the
time-average number running, and a Poisson arrival's view of an infinite-server queue is 1 + that).
The batch b is the smallest root of h(b) = b - rate x E[out - 1] x ITL(b), found by bracketing and
bisection (`solve_batch`); no root below the batch cap means the decode side is saturated.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.fft import next_fast_len

from emulator.physics import roofline
from emulator.planner import dist, queueing
from emulator.planner.context import Context


@dataclass(frozen=True)
class DecodeProfile:
    """Time-averaged view of one running decode sequence (weights: the number of steps it runs)."""
    context: float        # mean cached tokens it attends over
    context_var: float    # their variance over sequences and steps (a batch's total context varies)
    resident: float       # mean tokens of KV it holds alone (shared prefix blocks excluded), rounding included
    resident2: float      # second moment of the same (for the pool's variance)


def profile(ctx: Context) -> DecodeProfile:
    if "decode_profile" not in ctx.memo:
        ctx.memo["decode_profile"] = _profile(ctx)
    return ctx.memo["decode_profile"]


def _profile(ctx: Context) -> DecodeProfile:
    p, m, w, cached = _requests(ctx)
    if w.sum() <= 0:
        return DecodeProfile(context=float(ctx.prompts.mean()), context_var=0.0,
                             resident=float(ctx.prompts.mean()), resident2=float(ctx.prompts.moment2()))
    w = w / w.sum()
    context = p + (m - 1.0) / 2.0                                # step k reads P + k - 1 cached tokens
    # sum_{k=1..m} (P + k - 1)^2 / m = P^2 + P (m - 1) + (m - 1)(2m - 1)/6
    context2 = p ** 2 + p * (m - 1.0) + (m - 1.0) * (2.0 * m - 1.0) / 6.0
    own = p - ctx.workload.kv_sharing * cached                   # shared prefix blocks are held once
    resident = own + (m + 1.0) / 2.0                             # and holds P + k tokens of KV
    # sum_{k=1..m} (P' + k)^2 = m P'^2 + P' m (m+1) + m (m+1)(2m+1)/6, per step: divide by m
    second = own ** 2 + own * (m + 1.0) + (m + 1.0) * (2.0 * m + 1.0) / 6.0
    waste = (ctx.limits.block_size - 1) / 2.0                    # half a block rounding, on average
    mean_context = float((w * context).sum())
    return DecodeProfile(context=mean_context, context_var=max(0.0, float((w * context2).sum()) - mean_context ** 2),
                         resident=float((w * resident).sum()) + waste, resident2=float((w * second).sum()))


def _requests(ctx: Context):
    """(prompt, decode steps, weight by steps run, cached) per kind of request: the paired samples
    themselves when the workload has them, else every prompt point with every output point."""
    wl = ctx.workload
    if wl.paired and wl.prompt.max is None and wl.output.max is None and wl.prompt.samples:
        prompts = np.asarray(wl.prompt.samples, dtype=float)
        m = np.maximum(np.asarray(wl.output.samples, dtype=float) - 1.0, 0.0)
        if ctx.sample_point is None and ctx.sample_hits is not None:   # hits at a rate: each sample's expected one
            cached = ctx.sample_hits * (1.0 if ctx.sample_held is None else ctx.sample_held)
        else:
            point = ctx.sample_point if ctx.sample_point is not None else dist.point_of_each(prompts)
            cached = ctx.cached[point]                   # the sample's prompt point's hit
        return np.round(prompts), m, m / len(m), cached
    p = ctx.prompts.values[:, None]
    m = np.maximum(ctx.outputs.values[None, :] - 1.0, 0.0)      # decode steps per request
    return p, m, ctx.prompts.weights[:, None] * ctx.outputs.weights[None, :] * m, ctx.cached[:, None]


def step(ctx: Context, n: float) -> roofline.StepTime:
    """Roofline time of a decode step with n sequences at the mean context (n >= 1, integer)."""
    key = ("decode_step", n)
    if key not in ctx.memo:
        c = profile(ctx).context
        # A mean batch may be fractional (colocated points): the step cost is linear in these counts.
        shape = roofline.BatchShape(new_tokens=n, context_tokens=int(round(n * c)),  # type: ignore[arg-type]
                                    attention_pairs=int(round(n * c)) + n, sampled=n)  # type: ignore[arg-type]
        ctx.memo[key] = roofline.step_time(ctx.dep, shape)
    return ctx.memo[key]


def step_seconds(ctx: Context, n: float) -> float:
    """Decode step time for a fractional batch (linear between whole batches; at least one sequence)."""
    n = max(1.0, n)
    lo = math.floor(n)
    t_lo = step(ctx, lo).seconds
    if n == lo:
        return t_lo
    return t_lo + (n - lo) * (step(ctx, lo + 1).seconds - t_lo)


def solve_batch(h: Callable[[float], float], cap: float, tol: float = 1e-4) -> float | None:
    """Smallest root of h(b) = b - rate x tokens x ITL(b) on [0, cap]; None when h < 0 all the way.

    No shape is assumed (a colocated ITL(b) can turn infinite past a batch whose decode tokens leave
    the prefill budget too small, so h need not be concave or even finite): scan a grid of batches
    for the first sign change (every whole batch up to 16, then 5% steps), then bisect that bracket.
    A root between two grid points that h crosses twice is below the grid's resolution.
    """
    if h(0.0) >= 0:
        return 0.0
    lo = 0.0
    for hi in _batch_grid(cap):
        if h(hi) >= 0:
            break
        lo = hi
    else:
        return None
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if h(mid) < 0 else (lo, mid)
    return hi


def _batch_grid(cap: float):
    b = 0.0
    while b < cap:
        b = min(cap, b + 1.0 if b < 16 else math.ceil(b * 1.05))
        yield b


def batch_spread(ctx: Context, others: float, law: dist.Points | None = None) -> dist.Points:
    """Batch sizes a decode token sees: itself + the others running (`law`, see `running_law`; else
    Poisson), spread by burstiness."""
    spread = _running(ctx, others, law)
    return dist.Points(1.0 + spread.values, spread.weights)


def arrival_batches(ctx: Context, others: float, law: dist.Points | None = None) -> dist.Points:
    """Batch sizes the steps an arriving prompt waits out and runs in carry, given some decode runs: the
    sequences running as a Poisson arrival finds them (the time average, PASTA), without the +1 a
    decode token adds for itself (`batch_spread`), and without the idle worker (counted apart)."""
    spread = _running(ctx, others, law)
    # A point below 1 is a bin mixing idle (0) with one running: its share of one running is its value.
    weights = np.where(spread.values >= 1.0, spread.weights, spread.weights * spread.values)
    if weights.sum() <= 0:
        return dist.Points.fixed(1.0)
    return dist.Points(np.maximum(spread.values, 1.0), weights)


def _running(ctx: Context, others: float, law: dist.Points | None) -> dist.Points:
    """The number of sequences running (`law`, else Poisson of mean `others`), spread by burstiness."""
    if law is None:
        return dist.poisson(others, queueing.infinite_server_dispersion(ctx.ca2))
    mean = law.mean()
    stretched = mean + math.sqrt(queueing.infinite_server_dispersion(ctx.ca2)) * (law.values - mean)
    return dist.Points(np.maximum(stretched, 0.0), law.weights)


def running_law(ctx: Context, rate: float, itl: Callable[[float], float]) -> dist.Points | None:
    """The number of sequences running, as a time average, binned on the quantile grid (None without
    decode work). Each step takes ITL(n) with n running, so every sequence slows every other: the
    count is the birth-death chain of `seq_slots` (arrivals at `rate`, departures n / (E[steps] x
    ITL(n))), held at max_num_seqs past the cap. That law is exact for Poisson arrivals whatever the
    output lengths (a processor-sharing queue whose speed depends on n is insensitive to the service
    law), and wider than the Poisson law of independent sequences: 8B on an MI300X, 13 running, the
    Poisson count put the decode steps' p99 at 6.37 ms where the engine's is 6.87. A token sees the
    others as this time average (Palm: tokens come at n / ITL(n), and pi(n) n / ITL(n) ~ pi(n - 1))."""
    from emulator.planner import seq_slots
    steps, cap = ctx.decode_tokens, ctx.limits.max_num_seqs
    if rate <= 0 or steps <= 0:
        return None
    logs, rho = seq_slots.running_law(rate, steps, itl, cap)
    if not np.isfinite(logs).all():
        return None
    pmf = np.exp(logs - logs.max())
    if rho < 1:
        pmf[-1] /= 1.0 - rho                  # the queue past the cap: still cap running
    pmf /= pmf.sum()
    return dist.bin_pmf(np.arange(cap + 1, dtype=float), pmf)


def decode_only_gaps(ctx: Context, others: float, law: dist.Points | None = None,
                     batches: dist.Points | None = None) -> dist.Points:
    """Inter-token gaps from decode-only steps, over the batch sizes a token sees and, for each, the
    batch's total context: the n sequences' contexts summed (`total_context`), each sum's step time
    off the mean-context step by what its extra or missing KV reads cost.
    With the mean context alone the gaps' tail was too narrow (8B, 12 running: p99 3% low); with the
    sum as a normal (three points, the highest 1.7 sd up) it was still too narrow where a few long
    prompts decode together: 8B on an MI300X, code prompts, ~5 running, the engine's decode-only
    gaps past 5.45 ms were 0.108% of all at 1.73 req/s where that law put 0.013%, and the draw's
    ITL-bound C_max came out 11% high."""
    batches = batch_spread(ctx, others, law) if batches is None else batches
    if profile(ctx).context_var <= 0:
        return batches.map(lambda n: step_seconds(ctx, n))
    parts = []
    for n, w in zip(batches.values, batches.weights, strict=True):
        lo = max(1, math.floor(n))
        base = step_seconds(ctx, n) - step(ctx, lo).seconds
        totals = total_context(ctx, lo)
        parts.append((float(w), dist.Points([base + _step_at(ctx, lo, t) for t in totals.values], totals.weights)))
    return dist.rebin(dist.mixture(parts))


CONTEXT_CELLS = 128    # grid cells over one sequence's context range (the sum's law is convolved on it)
CONTEXT_GRAIN = 256    # tokens: step times of total contexts are computed to this grain (memo key)
TRIM = 1e-9            # mass the sum's law may drop at either end (FFT round-off is ~1e-16 a cell)


def total_context(ctx: Context, n: int) -> dist.Points:
    """Law of the total context of n decoding sequences: the n-fold convolution of one sequence's
    context at a random step (its prompt plus the tokens it has made, each request weighted by its
    decode steps), on the quantile grid. A sum of a few heavy-tailed contexts is skewed: its tail,
    which sets the decode-only gaps' p99, lies well past a normal's."""
    memo = shared(ctx)
    key = ("total_context", n)
    if key not in memo:
        pmf, h = _context_pmf(ctx)
        size = next_fast_len(n * len(pmf), real=True)
        total = np.clip(np.fft.irfft(np.fft.rfft(pmf, size) ** n, size)[:n * len(pmf)], 0.0, None)
        total /= total.sum()
        cum = np.cumsum(total)   # the sum sits within a few sd of its mean: bin only the cells that hold mass
        lo, hi = np.searchsorted(cum, TRIM), np.searchsorted(cum, 1.0 - TRIM) + 1
        memo[key] = dist.bin_pmf(np.arange(lo, hi) * h, total[lo:hi] / total[lo:hi].sum())
    return memo[key]


def _context_pmf(ctx: Context) -> tuple[np.ndarray, float]:
    """One decoding sequence's context on a grid: (pmf, cell width in tokens). A request of prompt P
    and m decode steps reads P .. P + m - 1 cached tokens, one per step (four points stand for that
    range)."""
    memo = shared(ctx)
    if "context_pmf" not in memo:
        p, m, w, _ = _requests(ctx)
        p, m, w = (np.broadcast_to(a, np.broadcast_shapes(p.shape, m.shape, w.shape)).ravel() for a in (p, m, w))
        quarters = (np.arange(4) + 0.5) / 4
        contexts = (p[:, None] + (m[:, None] - 1.0).clip(0, None) * quarters[None, :]).ravel()
        weights = np.repeat(w, 4)
        h = max(1.0, float(contexts.max()) / (CONTEXT_CELLS - 1))
        memo["context_pmf"] = (dist.on_grid(dist.Points(contexts, weights), h, CONTEXT_CELLS), h)
    return memo["context_pmf"]


def _step_at(ctx: Context, n: int, total: float) -> float:
    """Decode step time of n sequences with `total` cached tokens of context between them."""
    memo = shared(ctx)
    grain = int(round(total / CONTEXT_GRAIN))
    key = ("step_total", n, grain)
    if key not in memo:
        tokens = grain * CONTEXT_GRAIN
        shape = roofline.BatchShape(new_tokens=n, context_tokens=tokens, attention_pairs=tokens + n, sampled=n)
        memo[key] = roofline.step_time(ctx.dep, shape).seconds
    return memo[key]


def shared(ctx: Context) -> dict:
    """Results that depend only on the decodes' lengths and the deployment, not on prefix-cache hits or
    on which prompts a worker prefills: a context derived with the same decodes (the LRU's hits at a
    rate, `prefix_cache.at_rate`; a prompt class, `conditional`) carries this dict, so its sums of
    contexts are convolved once per plan, not once per rate."""
    return ctx.memo.setdefault("decode_shared", {})


def carried(ctx: Context) -> dict:
    """The memo a context derived from `ctx` with the same decodes starts from (see `shared`); one
    sequence's context law is taken from `ctx` now, before a prompt class could stand in for it."""
    _context_pmf(ctx)
    return {"decode_shared": shared(ctx)}


@dataclass(frozen=True)
class DecodePool:
    """One decode worker (disaggregated) at its share of the rate."""
    rate: float
    batch: float            # mean sequences running (time average)
    itl_mean: float
    stable: bool
    bound: str              # ceiling of the decode step at this batch
    link_rho: float         # utilization of the worker's KV-import link
    link_wait: float        # mean wait for the link (transfers are serialized per worker)
    transfers: dist.Points  # transfer seconds per prompt point
    running: dist.Points | None = None  # law of the number running (`running_law`)


def disaggregated(ctx: Context, rate: float) -> DecodePool:
    """Decode worker at per-worker rate: Little's-law batch, and the KV-import link as an M/G/1 queue."""
    tokens = ctx.decode_tokens
    cap = float(ctx.limits.max_num_seqs)
    b = solve_batch(lambda x: x - rate * tokens * step_seconds(ctx, 1.0 + x), cap)
    transfers = transfer_times(ctx)
    rho = rate * transfers.mean()
    link_wait = queueing.pk_wait(rate, transfers.mean(), transfers.moment2()) if rho < 1 else math.inf
    stable = b is not None and rho < 1
    batch = b if b is not None else cap
    running = running_law(ctx, rate, functools.partial(step_seconds, ctx)) if stable else None
    return DecodePool(rate=rate, batch=batch, itl_mean=step_seconds(ctx, 1.0 + batch), stable=stable,
                      bound=step(ctx, max(1, round(1 + batch))).bound, link_rho=rho, link_wait=link_wait,
                      transfers=transfers, running=running)


def transfer_times(ctx: Context) -> dist.Points:
    """KV import per request: the prompt blocks the decode worker lacks, per GPU (one NIC per GPU,
    in parallel, as workers/engine does), over the kv link: bytes / bandwidth + latency."""
    if ctx.kv_link is None:
        return dist.Points.fixed(0.0)
    key = "transfers"
    if key not in ctx.memo:
        per_token = roofline.kv_bytes_per_token_per_gpu(ctx.dep)
        lacking = ctx.prompts.values - ctx.cached  # the decode worker's prefix hit mirrors the prefill's
        ctx.memo[key] = dist.Points([roofline.kv_transfer_time(n * per_token, ctx.kv_link) for n in lacking],
                                    ctx.prompts.weights)
    return ctx.memo[key]


def first_gap(ctx: Context, pool: DecodePool) -> dist.Points:
    """Token 1 (from the prefill worker) to token 2, as the engine admits a remote prefill: the step
    in progress ends (half a step on average); the next step's schedule admits it and its transfer
    starts (after the link's queue), but that step runs without it; the first schedule after the KV
    has landed (a whole step later at least, else half a step after it lands) adds it to the batch,
    and that step gives token 2. A transfer shorter than a step still costs the whole step: with
    0.2 ms transfers beside 5.4 ms steps the engine's first gaps are 13.2 ms, 2.5 steps, not 2."""
    s = pool.itl_mean
    landed = pool.transfers.map(lambda t: max(s, pool.link_wait + t + 0.5 * s) + s)
    return dist.outer_sum(landed, _residual_step(s))


def _residual_step(s: float, points: int = 8) -> dist.Points:
    """What is left of the step in progress when token 1 arrives: uniform over the step (token 1 comes
    from another worker, at no particular phase of this one's steps). As a point at its mean (s / 2) the
    first gaps were one value, and where they are about 1% of all gaps (answers of ~100 tokens) the ITL
    p99 fell on that atom or beside it as the neighbouring bins moved: 70B TP4, 96-token answers, 28 ms
    at 20 req/s, 47 ms at 25, 28 ms at 40, where the gaps' own spread puts it at ~2 steps throughout."""
    return dist.Points([s * (k + 0.5) / points for k in range(points)])


def disaggregated_gaps(ctx: Context, pool: DecodePool) -> dist.Points:
    """All inter-token gaps of a decode worker; the first gap carries the KV transfer unless TTFT does."""
    steady = decode_only_gaps(ctx, pool.batch, pool.running)
    if ctx.req.first_token_after_transfer or ctx.decode_tokens <= 0:
        return steady
    share = first_gap_share(ctx)
    return dist.mixture([(1.0 - share, steady), (share, first_gap(ctx, pool))])


def first_gap_share(ctx: Context) -> float:
    """Fraction of all gaps that are a request's first: P(output >= 2) / E[output - 1]."""
    has_gap = float(ctx.outputs.weights[ctx.outputs.values >= 2].sum())
    return min(1.0, has_gap / ctx.decode_tokens)
