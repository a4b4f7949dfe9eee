"""A colocated ("both") worker: decodes and chunked prefills share every step.

Each step carries every running decode (one token each) plus queued prompt tokens up to the budget
(vLLM V1 schedules running requests first, then waiting ones FCFS). Decode tokens therefore see two
kinds of steps: decode-only steps, and mixed steps that also carry a prefill chunk and take longer.
That is the chunked-prefill interference: with `busy` the share of time the engine has prefill work,
a running sequence's mean ITL is the harmonic mix

    ITL(b) = 1 / (busy / E[mixed step] + (1 - busy) / decode_step(1 + b))

and the batch is the fixed point b = per-worker rate x E[out - 1] x ITL(b). The prefill queue sees
mixed steps as its service (their decode part included), so decodes slow prefill down too.

The same laws hold for a disaggregated decode worker that prefills some prompts itself (pd_pair's
conditional disaggregation, `planner.conditional`): every arrival decodes there, but only the local
share's prompts are prefilled in its steps (`Prefills`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from emulator.planner import decode, dist, prefill, prefill_queue, seq_slots
from emulator.planner.context import Context


@dataclass(frozen=True)
class Prefills:
    """The prompts a worker prefills in its own steps: their prompt points (`ctx`) and their share of
    the worker's arrivals. A colocated worker prefills all of them; a disaggregated decode worker only
    those the router keeps local."""
    ctx: Context
    share: float = 1.0


@dataclass(frozen=True)
class ColocatedPoint:
    rate: float               # per worker (arrivals that decode here)
    batch: float              # mean running decodes (time average)
    itl_mean: float
    mixed_share: float        # share of a decode's steps that carry prefill
    queue: prefill_queue.PrefillQueue
    mixed_steps: dist.Points  # durations of steps that carry prefill
    stable: bool
    limit: str                # what saturates when unstable: "compute" or "bandwidth" (else "")
    running: dist.Points | None = None  # law of the number of decodes running (`decode.running_law`)
    prefills: Prefills | None = None    # what its steps prefill (None: every arrival's prompt)
    prefill_rate: float = 0.0           # per worker: arrivals prefilled here

    @property
    def prefill_ctx(self) -> Context | None:
        return None if self.prefills is None else self.prefills.ctx


def _mean_itl(ctx: Context, pre: Prefills, rate: float, workers: int, b: float) -> float:
    """Mean ITL with b decodes running: mixed steps of the packed size for `busy` of the time
    (inf when the prefill left at that batch cannot keep up: no steady state with b running).
    Memoized: the batch search, the running-count law and the slot wait read it at the same batches."""
    key = ("mean_itl", pre.share, rate, workers, b)   # a context's Prefills are fixed by their share
    hit = ctx.memo.get(key)
    if hit is None:
        hit = ctx.memo[key] = _mean_itl_at(ctx, pre, rate, workers, b)
    return hit


def _mean_itl_at(ctx: Context, pre: Prefills, rate: float, workers: int, b: float) -> float:
    prof = prefill.profile(pre.ctx, int(round(b)))
    per_worker = rate * pre.share / workers
    if per_worker * prof.mean_share(pre.ctx) >= 1:
        return math.inf
    t_dec = decode.step_seconds(ctx, 1.0 + b)
    before = decode.step_seconds(ctx, max(b, 1.0))
    packed, busy = prefill.packing(pre.ctx, prof, per_worker, before=before)
    if busy >= 1:
        return math.inf
    t_packed = _packed_step(pre.ctx, prof, packed)
    steps = busy / t_packed                       # prefill-carrying steps a second
    busy = steps * _mean_mixed_step(pre.ctx, prof, per_worker, t_packed, before)
    if busy >= 1:
        return math.inf
    return 1.0 / (steps + (1.0 - busy) / t_dec)


def _mean_mixed_step(ctx: Context, prof: prefill.PrefillProfile, per_worker: float, t_run: float,
                     before: float) -> float:
    """Mean duration of a prefill-carrying step, its packing random as in `_mixed_packing`: K >= 1
    chunks (zero-truncated Poisson: those that arrived during the step before, `t_run` a prefill
    step's, `before` a decode-only one's for the first of a run), the first at its own place in its
    prompt, K - 1 typical chunks packed behind it. A step's time is convex in what it packs (each
    prompt is a sequence of its own, attending over its own cached context), so the steps' mean is above
    the step at the mean packing (`_packed_step`): 70B TP8 H100, chat + RAG prompts of ~90 new tokens
    over long cached documents, 89 decodes, 21.7 req/s (seed-14 draw #5 of benchmarks/planner_curve.py):
    24.8 ms at the mean packing, 25.4 ms this way (25.5 ms over the random packing law), the simulated
    engine's mixed steps 25.5 ms at that batch. The step at the mean packing put the mean ITL 3% under
    the engine's, the batch with it (89 against 93), and the share of arrivals that wait for a sequence
    slot at 0.16% against the engine's ~0.6% (now 0.33%)."""
    ch = prof.chunks
    counts = _chunk_counts(ctx, prof, per_worker, t_run, before)
    alone = float(ch.seconds @ ch.weight) / float(ch.weight.sum())
    # packings under 0.1% of steps are left out: each costs a step a chunk, and would move the mean by
    # well under 1%
    return alone + sum(p * _packed_behind(ctx, prof.decodes, k) for k, p in enumerate(counts[1:], start=2) if p > 1e-3)


def _chunk_counts(ctx: Context, prof: prefill.PrefillProfile, prefill_rate: float, t_run: float,
                  before: float) -> list[float]:
    """P(a prefill-carrying step packs K = 1, 2, 3, >= 4 chunks): those that arrived during the step
    before it, a prefill step (`t_run`) within a run, a decode-only one (`before`) for the first of a
    run (the share of steps that start one: e^-mu_run); `prefill_rate`: prompts a second prefilled here."""
    ch = prof.chunks
    chunk_rate = prefill_rate * float(ch.weight.sum() / ctx.prompts.weights.sum())
    mu_run, mu_start = chunk_rate * t_run, chunk_rate * before
    first = math.exp(-min(mu_run, 50.0))
    return [first * a + (1 - first) * c for a, c in zip(_ztp(mu_start), _ztp(mu_run), strict=True)]


def _packed_behind(ctx: Context, decodes: int, k: int) -> float:
    """What k - 1 typical chunks packed behind the first add to a step, over the first chunk's law, with
    `decodes` running: costed at the decode counts of a grid 25% apart and read between them (the
    difference moves little with the batch; costing it at every batch the planner visits took 40% of
    a capacity search's CPU)."""
    lo = max((g for g in _BATCH_GRID if g <= decodes), default=0)
    hi = min((g for g in _BATCH_GRID if g >= decodes), default=lo)
    at_lo = _packed_behind_at(ctx, lo, k)
    if hi == lo:
        return at_lo
    return at_lo + (_packed_behind_at(ctx, hi, k) - at_lo) * (decodes - lo) / (hi - lo)


_BATCH_GRID = sorted({0, 1, 2, 4, 6, 8} | {round(8 * 1.25 ** j) for j in range(1, 40)})


def _packed_behind_at(ctx: Context, decodes: int, k: int) -> float:
    key = ("packed_behind", decodes, k)
    hit = ctx.memo.get(key)
    if hit is None:
        prof = prefill.profile(ctx, decodes)
        ch = prof.chunks
        w = ch.weight / ch.weight.sum()
        behind = (k - 1) * float(ch.tokens @ w)   # k - 1 chunks of the mean size
        blocks = ctx.limits.block_size

        def added(tokens: float, cached: float, final: bool, alone: float) -> float:
            extra = int(min(prof.budget - int(tokens), behind)) // blocks * blocks
            if extra <= 0:   # a full chunk: nothing packs behind it
                return 0.0
            return prefill.step_with(ctx, decodes, int(tokens), int(cached), bool(final), extra).seconds - alone

        rows = zip(ch.tokens, ch.cached, ch.final, ch.seconds, strict=True)
        hit = ctx.memo[key] = float(np.dot([added(*row) for row in rows], w))
    return hit


def _state_itl(ctx: Context, pre: Prefills, rate: float, workers: int, n: float) -> float:
    """ITL while n sequences run (a state of the running-count chain, not a steady state): the mean
    ITL, or, where the prefill budget that n decodes leave cannot keep up, every step a mixed step
    filled to that budget (the engine schedules running decodes first, so they still advance)."""
    itl = _mean_itl(ctx, pre, rate, workers, n)
    if math.isfinite(itl):
        return itl
    prof = prefill.profile(pre.ctx, int(round(n)))
    return _packed_step(pre.ctx, prof, float(prof.budget))


def _packed_step(ctx: Context, prof: prefill.PrefillProfile, packed: float) -> float:
    return prefill.packed_step(ctx, prof.decodes, prefill.packed_tokens(ctx, prof, packed)).seconds


def _queue_at(ctx: Context, pre: Prefills, rate: float, workers: int, b: float) -> prefill_queue.PrefillQueue:
    """The prefill queue with b decodes running: when it has no prefill work the engine still runs
    decode-only steps (vacations, in queueing terms), unless no decode is running (Poisson: e^-b)."""
    prof = prefill.profile(pre.ctx, int(round(b)))
    vacation = (1.0 - math.exp(-b), decode.step_seconds(ctx, max(b, 1.0)))
    return prefill_queue.queue(pre.ctx, prof, rate * pre.share, workers, vacation)


def _mixed_steps(ctx: Context, prof: prefill.PrefillProfile, q: prefill_queue.PrefillQueue) -> dist.Points:
    """Durations of prefill-carrying steps: each chunk, with queued prompts packed behind it."""
    ch = prof.chunks
    values = [prefill.with_packing(ctx, prof, n, c, bool(f), s, q.packed)
              for n, c, f, s in zip(ch.tokens, ch.cached, ch.final, ch.seconds, strict=True)]
    return dist.Points(values, ch.weight)


def evaluate(ctx: Context, rate: float, workers: int = 1, prefills: Prefills | None = None) -> ColocatedPoint:
    """A pool of `workers` colocated workers at pool rate `rate` (each gets rate / workers), whose
    steps prefill `prefills` (default: every arrival's prompt)."""
    pre = prefills or Prefills(ctx)
    per_worker = rate / workers
    tokens = ctx.decode_tokens
    cap = float(ctx.limits.max_num_seqs)

    def h(b: float) -> float:
        itl = _mean_itl(ctx, pre, rate, workers, b)
        return b - per_worker * tokens * itl if math.isfinite(itl) else -math.inf

    b = decode.solve_batch(h, cap, tol=1e-3)
    stable = b is not None
    b = cap if b is None else b
    q = _queue_at(ctx, pre, rate, workers, b)
    prof = prefill.profile(pre.ctx, int(round(b)))
    mixed = _mixed_steps(pre.ctx, prof, q)
    itl = _mean_itl(ctx, pre, rate, workers, b)
    share = q.busy / _packed_step(pre.ctx, prof, q.packed) * itl if math.isfinite(itl) else 1.0
    limit = "" if stable else _limit(ctx, pre, q, b)
    running = decode.running_law(ctx, per_worker, lambda n: _state_itl(ctx, pre, rate, workers, n)) \
        if stable else None
    point = ColocatedPoint(rate=per_worker, batch=b, itl_mean=itl, mixed_share=min(1.0, share), queue=q,
                           mixed_steps=mixed, stable=stable, limit=limit, running=running, prefills=prefills,
                           prefill_rate=per_worker * pre.share)
    return dataclasses.replace(point, queue=_stepping(ctx, point, prof)) if stable else point


def _stepping(ctx: Context, point: ColocatedPoint, prof: prefill.PrefillProfile) -> prefill_queue.PrefillQueue:
    """The prefill queue of a worker that steps without pause while decodes run.

    The engine takes every queued prompt into its next step, up to the budget its decodes leave
    (workers.core.scheduler), so an arrival waits out the step in progress, decode-only or mixed, and
    runs in the next one: a prompt ahead of it delays it only where the backlog passes that budget,
    and a backlog drains a full budget a step. So the wait is the residual of the step in progress
    (the steps' equilibrium residual, over the steps' spread) and an M/G/1 wait whose services are
    each prompt's token share of a full step (`prof.share`, the load `rho` already reads), with no
    exceptional first service (the step in progress is that residual). The prefill worker's law
    (`prefill_queue.queue`) serialized prompts instead: each cost the mixed step it rode in (the
    decodes' part included), and a residual of a decode-only step was added on top of the wait for a
    mixed step in progress, so a tenth of arrivals waited two steps. The step in progress and the
    prompt's own step carry the same running decodes (the batch changes over a request's lifetime, a
    hundred steps and more), so the batch's spread (`_decode_spread`) is added to both at once
    (`_waited`), not drawn for each independently, over the batches an arrival finds (N running, not
    the 1 + N a decode token sees beside itself: read as a token sees them, p99 TTFT came out 1.8-2.6%
    high on draw #16 with 512 local tokens, 6.0-7.8 req/s, and C_max 6.12 req/s where the simulator's
    p99 crosses the SLO at about 6.8; now within 0.4%, C_max 6.89).

    8B MI300X, decode worker prefilling rag prompts of 76 uncached tokens (4096 budget, 18 decodes),
    17.9 req/s: the engine's TTFT is exactly the step in progress's residual plus the next step for
    every request; p99 13.65 ms (residual p99 6.33 ms, own step p99 8.37 ms), where the prefill
    worker's law gave 15.93 ms (no double wait, no spread: 11.95 ms; the spread drawn for each step
    independently: 13.32 ms) and this one 13.87 ms with a token's batches, 13.66 with an arrival's
    (8,000 simulated requests: 13.72 ms; at 22.8 req/s 16.48 simulated, 16.35 -> 16.15 planned).
    The step in progress packs a random number of prompts (`_mixed_packing`), not the mean packing,
    and the prompts that arrive while it runs join the arrival's own step (`PrefillQueue.behind`): 70B
    TP8 H100, chat + RAG prompts of ~70 new tokens, 8,192-token budget, 69 decodes, 18.2 req/s (seed-14
    draw #5 of benchmarks/planner_curve.py): the engine's mixed steps p90 / p99 29.0 / 44.8 ms against
    24.1 / 33.9 at the mean packing; TTFT p99 planned 52.7 -> 55.5 ms, simulated 59.9 ms."""
    q, pre_ctx = point.queue, point.prefill_ctx or ctx
    running = q.vacation[0]          # P(a decode runs): else the worker is idle and a prompt runs alone
    alone = np.maximum(prof.alone, prof.share)
    first = dist.Points(running * prof.share + (1.0 - running) * alone, pre_ctx.prompts.weights)
    steps = dist.mixture([(1.0 - point.mixed_share, dist.Points.fixed(decode.step_seconds(ctx, max(prof.decodes, 1)))),
                          (point.mixed_share, _mixed_packing(ctx, point))])
    waited = _waited(steps, _decode_spread(ctx, point, prof.decodes, arrival=True))
    waits, behind = q.behind                     # what arrives meanwhile packs into its step too
    waited = dist.Points(waited.values + np.interp(waited.values, waits, behind), waited.weights)
    residual = dist.mixture([(running, waited), (1.0 - running, dist.Points.fixed(0.0))])
    own = dist.outer_sum(q.own, residual, dist.TAIL_EDGES)
    return q.stepping(dist.Points(prof.share, pre_ctx.prompts.weights), first, own)


RESIDUAL_POINTS = 16   # points per step length in its residual (uniform over the step)


def _waited(steps: dist.Points, spread: dist.Points) -> dist.Points:
    """U s + (1 + U) d: the residual of the step in progress, s from `steps` (at the mean batch) found
    with odds s x its share of steps and U uniform along it (the equilibrium residual, density
    P(S > t) / E[S]), and the decode part's spread d that it shares with the next step."""
    u = (np.arange(RESIDUAL_POINTS) + 0.5) / RESIDUAL_POINTS
    s, d = steps.values, spread.values
    values = u[:, None, None] * s[None, :, None] + (1.0 + u)[:, None, None] * d[None, None, :]
    weights = np.broadcast_to((steps.values * steps.weights)[None, :, None] * spread.weights[None, None, :],
                              values.shape)
    return dist.rebin(dist.Points(values.ravel(), weights.ravel()))


def slot_wait(ctx: Context, rate: float, workers: int = 1, prefills: Prefills | None = None) -> dist.Points | None:
    """Time an arrival waits for one of max_num_seqs slots (emulator.planner.seq_slots), with the
    ITL that n running sequences see at this rate; None when the slots cannot keep up."""
    pre = prefills or Prefills(ctx)
    return seq_slots.wait(rate / workers, ctx.decode_tokens, lambda n: _state_itl(ctx, pre, rate, workers, n),
                          ctx.limits.max_num_seqs)


def _limit(ctx: Context, pre: Prefills, q: prefill_queue.PrefillQueue, b: float) -> str:
    """Which roofline ceiling saturates: the prefill steps' when prefill is overloaded, else the decode step's."""
    step = prefill.profile(pre.ctx, int(round(b))).full_step if not q.stable \
        else decode.step(ctx, max(1, round(1 + b)))
    return "compute" if step.bound == "compute" else "bandwidth"


def gaps(ctx: Context, point: ColocatedPoint) -> dist.Points:
    """All inter-token gaps: decode-only steps (over the batch sizes a token sees) and mixed steps."""
    steady = decode.decode_only_gaps(ctx, point.batch, point.running)
    mixed = _mixed_spread(ctx, point) if point.stable else point.mixed_steps
    return dist.mixture([(1.0 - point.mixed_share, steady), (point.mixed_share, mixed)])


def _mixed_spread(ctx: Context, point: ColocatedPoint) -> dist.Points:
    """Mixed-step durations as a decode token sees them; their tail is the colocated ITL p99: the
    prefill part with its packing random (`_mixed_packing`), and the decode part's spread.
    Decode part: the running batch and its total context vary from step to step as they do in
    decode-only steps, and the decodes' cost adds to the step's (their attention reads their own KV),
    so the decode-only gaps' spread around their step at the mean batch is added. A point mass here
    put every mixed step at its mean: the ITL p99 came out 9.4 ms where the engine's is 10.2 ms."""
    return dist.outer_sum(_mixed_packing(ctx, point), _decode_spread(ctx, point, int(round(point.batch))))


def _mixed_packing(ctx: Context, point: ColocatedPoint) -> dist.Points:
    """Mixed-step durations at the mean batch, with the packing random as in `prefill.packing`: a step
    carries K >= 1 chunks (zero-truncated Poisson: chunks that arrived during the step before, a
    decode-only step for the first of a run, a prefill step after that). The first is any chunk at
    its own place in its prompt (a late chunk of a long prompt attends over thousands of cached
    tokens: 8B TP2, 256-token budget, 8.6 to 9.6 ms), the other K - 1 are packed behind it up to the
    budget."""
    dctx, ctx = ctx, point.prefill_ctx or ctx       # decodes: every arrival; prefills: those prefilled here
    prof = prefill.profile(ctx, int(round(point.batch)))
    ch = prof.chunks
    counts = _chunk_counts(ctx, prof, point.prefill_rate, _packed_step(ctx, prof, point.queue.packed),
                           decode.step_seconds(dctx, max(point.batch, 1.0)))
    sizes = dist.Points(ch.tokens, ch.weight)
    parts, others = [(counts[0], dist.Points(ch.seconds, ch.weight))], None
    for p_k in counts[1:]:
        others = sizes if others is None else dist.outer_sum(others, sizes)
        parts.append((p_k, _led_by_each_chunk(ctx, prof, others)))
    return dist.rebin(dist.mixture(parts))


def _led_by_each_chunk(ctx: Context, prof: prefill.PrefillProfile, others: dist.Points) -> dist.Points:
    """Steps led by each chunk with `others` tokens of queued prompts packed behind it, up to the
    budget (exact token counts, not whole blocks: the budget left beside b decodes shrinks a token at
    a time, and rounding it to a block made the step tail fall as the batch grew)."""
    ch = prof.chunks
    values, weights = [], []
    for tokens, cached, final, weight, seconds in zip(ch.tokens, ch.cached, ch.final, ch.weight, ch.seconds,
                                                      strict=True):
        room = prof.budget - int(tokens)
        if room <= 0:                    # a full chunk: nothing packs behind it
            values.append(seconds)
            weights.append(weight)
            continue
        for x, w in zip(others.values, others.weights, strict=True):
            extra = int(min(room, x))
            values.append(prefill.step_with(ctx, prof.decodes, int(tokens), int(cached), bool(final), extra).seconds)
            weights.append(weight * w)
    return dist.Points(values, weights)


def _decode_spread(ctx: Context, point: ColocatedPoint, decodes: int, arrival: bool = False) -> dist.Points:
    """How much a step's decode part differs from `decodes` sequences at the mean context: over the
    batch sizes a token sees (itself included), or with `arrival` those an arriving prompt finds
    (`decode.arrival_batches`), and their total context (`decode.decode_only_gaps`)."""
    batches = decode.arrival_batches(ctx, point.batch, point.running) if arrival else None
    gaps = decode.decode_only_gaps(ctx, point.batch, point.running, batches)
    base = decode.step_seconds(ctx, max(decodes, 1))
    return dist.Points(gaps.values - base, gaps.weights)


def _ztp(mu: float, k_max: int = 4) -> list[float]:
    """P(K = 1..k_max) of a zero-truncated Poisson(mu), the last entry lumping K >= k_max (k_max = 4:
    for mu <= 1, the packing below the ceiling, P(K >= 4) is under 2%)."""
    if mu < 1e-9:
        return [1.0] + [0.0] * (k_max - 1)
    pmf = [math.exp(-mu) * mu ** k / math.factorial(k) for k in range(1, k_max)]
    norm = -math.expm1(-mu)
    pmf = [p / norm for p in pmf]
    return pmf + [max(0.0, 1.0 - sum(pmf))]


def mean_prefilling(ctx: Context, point: ColocatedPoint) -> float:
    """KV tokens held by prompts being prefilled (their blocks are allocated chunk by chunk)."""
    ctx = point.prefill_ctx or ctx
    prof = prefill.profile(ctx, int(round(point.batch)))
    in_service = point.prefill_rate * prof.mean_alone(ctx)
    return min(1.0, in_service) * float(np.dot(ctx.new_tokens, ctx.prompts.weights))
