"""Prefill: per-request service time from the roofline, and the queue in front of it.

A prompt's new tokens (prompt minus its cached prefix) run in chunks of at most the step's prefill
budget (max_num_batched_tokens, less the decode tokens that share a colocated step). Two service
times matter:
- alone: the request's own steps when nothing else is queued (its latency at low load);
- share: its token share of full-budget steps. Under load the engine packs queued prompts into one
  step, so the fixed costs of a step (weight reads, per-layer overhead) are shared; the share is
  what each request really costs the server, and rate x share is the utilization that must stay < 1.
TTFT = wait + own steps, the wait from `queueing.step_queue_wait` with an exponential tail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from emulator import roofline
from emulator.planner import decode, dist, queueing
from emulator.planner.context import Context


@dataclass(frozen=True)
class PrefillProfile:
    decodes: int            # decode sequences in every step (colocated); 0 on a prefill worker
    budget: int             # prefill tokens one step can take
    alone: np.ndarray       # per prompt point: seconds of its own steps, nothing else queued
    share: np.ndarray       # per prompt point: its token share of full-budget steps
    last_tokens: np.ndarray  # per prompt point: tokens of its last chunk
    last_step: np.ndarray   # per prompt point: seconds of its last step
    chunks: "Chunks"
    full_step: roofline.StepTime  # a step whose prefill fills the budget

    def mean_alone(self, ctx: Context) -> float:
        return float(self.alone @ ctx.prompts.weights)

    def mean_share(self, ctx: Context) -> float:
        return float(self.share @ ctx.prompts.weights)

    def share_scv(self, ctx: Context) -> float:
        return dist.Points(self.share, ctx.prompts.weights).scv()

    def residual(self, ctx: Context) -> float:
        """E[S^2] / (2 E[S]) of the alone service: what an arrival waits for the running request."""
        s, w = self.alone, ctx.prompts.weights
        mean = float(s @ w)
        return float((s ** 2) @ w) / (2 * mean) if mean > 0 else 0.0


@dataclass(frozen=True)
class Chunks:
    """Every prefill chunk of every prompt point (one engine step each when run alone)."""
    tokens: np.ndarray
    cached: np.ndarray
    final: np.ndarray
    weight: np.ndarray      # the prompt point's probability
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
    """A step: the decodes, one prefill chunk, and `extra` tokens of other prompts packed behind it."""
    key = ("step_with", decodes, chunk, cached, final, extra)
    hit = ctx.memo.get(key)
    if hit is None:
        shape = _base(ctx, decodes).add(chunk, cached, samples=final)
        if extra > 0:
            shape.add(extra, 0, samples=False)
        hit = ctx.memo[key] = roofline.step_time(ctx.dep, shape)
    return hit


def _profile(ctx: Context, decodes: int) -> PrefillProfile:
    budget = max(1, ctx.limits.max_num_batched_tokens - decodes)
    alone, share, last_tokens, last_step = [], [], [], []
    rows: list[tuple[int, int, bool, float, float]] = []
    for new, cached, weight in zip(ctx.new_tokens, ctx.cached, ctx.prompts.weights):
        a = s = 0.0
        done = 0
        new = int(new)
        while done < new:
            chunk = min(budget, new - done)
            final = done + chunk >= new
            t = step_with(ctx, decodes, chunk, int(cached) + done, final).seconds
            full = step_with(ctx, decodes, chunk, int(cached) + done, final, extra=budget - chunk).seconds
            a, s = a + t, s + full * chunk / budget
            rows.append((chunk, int(cached) + done, final, weight, t))
            done += chunk
        alone.append(a)
        share.append(s)
        last_tokens.append(chunk)
        last_step.append(t)
    cols = list(zip(*rows))
    chunks = Chunks(*(np.asarray(c, dtype=float) for c in cols[:2]), np.asarray(cols[2], dtype=bool),
                    *(np.asarray(c, dtype=float) for c in cols[3:]))
    full = step_with(ctx, decodes, budget, 0, True)
    return PrefillProfile(decodes=decodes, budget=budget, alone=np.asarray(alone), share=np.asarray(share),
                          last_tokens=np.asarray(last_tokens, dtype=float), last_step=np.asarray(last_step),
                          chunks=chunks, full_step=full)


def servers_and_ca2(ctx: Context, workers: int) -> tuple[int, float]:
    """How dispatch shapes each worker's queue: (servers pooled in one queue, arrival SCV per queue).

    random: Poisson splitting keeps each worker's arrivals' SCV; one M/G/1 per worker.
    round_robin: worker i gets every c-th arrival, a sum of c gaps, so its SCV is ca2 / c.
    jsq (least loaded): the pool behaves as one G/G/c queue (Allen-Cunneen).
    """
    how = ctx.req.dispatch
    if how == "jsq":
        return workers, ctx.ca2
    if how == "round_robin":
        return 1, ctx.ca2 / workers
    return 1, ctx.ca2


@dataclass(frozen=True)
class PrefillQueue:
    rho: float              # rate x full-batch share: the throughput ceiling is rho = 1
    busy: float             # share of time a server runs prefill-carrying steps (the queue's load)
    service: dist.Points    # per-request server time at this load (alone, scaled to busy / rate)
    servers: int
    ca2: float
    vacation: tuple[float, float]  # (probability, length) of a decode-only step an arrival waits out
    own: dist.Points | None  # an arrival's own prefill latency (its steps, with what packs in behind it)
    packed: float           # mean prefill tokens in a prefill-carrying step
    stretch: float          # extra step time per second waited: later prompts packed into its step
    stretch_cap: float      # ... at most a step filled to the budget

    @property
    def stable(self) -> bool:
        return self.rho < 1 and self.busy < 1

    @property
    def mean_wait(self) -> float:
        """Mean time to the start of its own steps (M/G/1 wait plus a decode step's residual)."""
        if not self.stable:
            return math.inf
        p_v, t_v = self.vacation
        return queueing.mg1_mean_wait(self.service.values, self.service.weights, self.busy, self.ca2,
                                      self.servers) + p_v * t_v / 2

    def ttft_quantile(self, q: float, shift: dist.Points | None = None) -> float:
        if not self.stable:
            return math.inf
        pmf, h = self._law(shift)
        return dist.grid_quantile(pmf, h, q)

    def ttft_cdf(self, t: float, shift: dist.Points | None = None) -> float:
        if not self.stable:
            return 0.0
        pmf, h = self._law(shift)
        return dist.grid_cdf(pmf, h, t)

    def _law(self, shift: dist.Points | None):
        """Grid law of wait + own steps (+ shift): the M/G/1 wait (+ a decode step's residual) convolved."""
        cells = dist.GRID_CELLS
        base = self.own if shift is None else dist.outer_sum(self.own, shift)
        extent = base.values.max() + self.vacation[1] + 12 * self.mean_wait + 2 * self.service.values.max()
        h = extent / cells
        wait = queueing.mg1_wait_pmf(self.service.values, self.service.weights, self.busy, h, cells,
                                     self.ca2, self.servers)
        p_v, t_v = self.vacation
        if p_v > 0 and t_v > 0:
            k = max(1, int(t_v / h))
            vac = np.zeros(cells)
            vac[0] = 1 - p_v
            vac[:k] += p_v / k                     # residual of a decode-only step: uniform over it
            wait = dist.convolve(wait, vac)
        wait = self._packed_behind(wait, h)
        return dist.convolve(wait, dist.on_grid(base, h, cells)), h

    def _packed_behind(self, wait: np.ndarray, h: float) -> np.ndarray:
        """A request that waits runs in a step that also takes the prompts that arrived behind it while
        the step in progress finished: stretch x (that step's residual, an equilibrium residual of the
        service law, independent of the rest of the wait), at most a step filled to the budget."""
        if self.stretch <= 0 or wait[0] >= 1:
            return wait
        s, w = self.service.values, self.service.weights
        grid = np.arange(len(wait)) * h
        residual = (w[None, :] * (s[None, :] > grid[:, None])).sum(axis=1)
        residual /= residual.sum()
        extra = dist.on_grid(dist.Points(np.minimum(grid * self.stretch, self.stretch_cap), residual + 1e-300),
                             h, len(wait))
        waited = wait.copy()
        waited[0] = 0.0
        out = dist.convolve(waited, extra)
        out[0] += wait[0]
        return out


def queue(ctx: Context, prof: PrefillProfile, rate: float, workers: int = 1,
          vacation: tuple[float, float] = (0.0, 0.0), with_own: bool = True) -> PrefillQueue:
    """Prefill queue of a pool of `workers` at pool rate `rate`.

    The load is `busy` from `packing` (packed steps share their fixed costs), each request's server
    time its alone time scaled to that load, and the wait the M/G/1 law (`queueing.mg1_wait_pmf`).
    vacation = (probability, length): a colocated arrival first waits out a decode-only step in
    progress (the M/G/1-with-vacations decomposition: W = W_M/G/1 + residual vacation).
    """
    per_worker = rate / workers
    servers, ca2 = servers_and_ca2(ctx, workers)
    rho = per_worker * prof.mean_share(ctx)
    packed, busy = packing(ctx, prof, per_worker, before=vacation[1])
    mean_alone = prof.mean_alone(ctx)
    scale = busy / (per_worker * mean_alone) if per_worker > 0 and mean_alone > 0 else 1.0
    service = dist.Points(prof.alone * scale, ctx.prompts.weights)
    slope = token_seconds(ctx, prof)
    flow = per_worker * float(ctx.new_tokens @ ctx.prompts.weights)
    cap = prof.full_step.seconds - float(prof.last_step @ ctx.prompts.weights)
    own = _own_latency(ctx, prof, flow) if with_own else None
    return PrefillQueue(rho=rho, busy=busy, service=service, servers=servers, ca2=ca2, vacation=vacation,
                        own=own, packed=packed, stretch=flow * slope, stretch_cap=max(0.0, cap))


def token_seconds(ctx: Context, prof: PrefillProfile) -> float:
    """Marginal step time of one more prefill token (the compute slope of a half-to-full step)."""
    half = max(1, prof.budget // 2)
    return (prof.full_step.seconds - step_with(ctx, prof.decodes, half, 0, True).seconds) / (prof.budget - half)


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
    cached = int(round(float(ch.cached @ w)))
    if flow <= 0:
        return size, 0.0

    def step_s(n: float) -> float:  # packed sizes rounded to whole KV blocks: close enough, and memoizable
        blocks = ctx.limits.block_size
        n = min(float(prof.budget), max(1.0, n))
        return step_with(ctx, prof.decodes, max(1, int(round(n / blocks)) * blocks), cached, True).seconds

    start = _truncated_mean(chunk_rate * before)
    t, n = step_s(size), size
    for _ in range(30):
        mu = chunk_rate * t
        run = math.exp(min(mu, 50.0))
        n = min(float(prof.budget), size * (start / run + (1 - 1 / run) * _truncated_mean(mu)))
        t_new = step_s(n)
        if abs(t_new - t) <= 1e-6 * t:
            break
        t = t_new
    return n, flow * step_s(n) / n


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


def _own_latency(ctx: Context, prof: PrefillProfile, flow: float) -> dist.Points:
    """Own steps. FCFS fills each step's budget with whoever is queued next, so a prompt's last step
    also carries prompts that arrived behind it: those that came during its earlier chunks are added
    here; those that came while it waited are the wait's stretch (`dist.stretch`)."""
    values = []
    for i, (alone, last, last_s) in enumerate(zip(prof.alone, prof.last_tokens, prof.last_step)):
        behind = flow * (alone - last_s)
        cached = ctx.cached[i] + ctx.new_tokens[i] - last
        values.append(alone - last_s + with_packing(ctx, prof, last, cached, True, last_s, last + behind))
    return dist.Points(values, ctx.prompts.weights)
