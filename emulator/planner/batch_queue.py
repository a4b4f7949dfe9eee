"""A prefill worker's queue as the batch server it is: Poisson arrivals, and FCFS steps that each take
every queued prompt's tokens up to the step budget (`workers.core.scheduler`, chunked prefill).

The M/G/1 law (`prefill_queue`) costs each queued prompt its token share of steps at the mean packing,
so every prompt in a backlog pays the mean step's fixed costs (weight reads, per-layer overhead) again.
In the engine the prompts queued together share one step and its fixed costs: a prompt that arrives
during a step runs in the next one, with everyone else who arrived during it. Where steps rarely fill
the budget (8,192 tokens, prompts of ~620 new tokens: 1.9 prompts a step) that overstated the wait.
Llama-3.1-70B TP8 on A100-80GB, agentic, 9.5 req/s, the prefill worker 83% busy: the M/G/1 law gave
TTFT mean 0.448 s, p50 0.340 s; the simulator 0.386 s and 0.279 s (6,128 requests); this server
replayed exactly on the simulated arrivals and prompts 0.386 s and 0.269 s, the M/G/1 law on the same
ones 0.474 s and 0.312 s. Over 24,004 simulated requests TTFT p99 was 1.404 s (the M/G/1 law: 1.795 s;
this law: 1.303 s; the server replayed on 55,000 Poisson arrivals of the simulated prompts: 1.33 s).
Agentic turns ride on the workload's Poisson arrivals (`emulator.workload`), so their queue is this one.

The chain: B, the queued prefill tokens when a step starts. The step takes m = min(B, budget) and lasts
T(m) (`prefill.packed_step`: typical chunks); the arrivals meanwhile add X(T(m)), compound Poisson, so
B' = B - m + X. At B' = 0 the worker idles until the next arrival, whose prompt starts the next step.
Its stationary law on a token grid (`_stationary`) gives what an arrival finds (PASTA): the worker idle
(it runs its own steps: `prefill_queue._own_latency`), or in a step of m tokens at a uniform point of
it, with A = B - m + X(elapsed) tokens queued ahead. Its first token then comes after the step's
residual r, ceil((A + n) / budget) - 1 full steps, and the step with its last token, which also carries
what arrived behind it (at its mean, as `prefill_queue._packed_behind` takes it) up to the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.fft import next_fast_len

from emulator.planner import dist, prefill
from emulator.planner.context import Context

CELLS_PER_BUDGET = 64   # token cells per step budget: a step's fill to 1/64 of the budget
MAX_STATES = 1024       # backlog cells at most (16 budgets at 64 a budget): one dense solve of this
                        # size per rate (~10 ms on one core)
MIN_CELLS = 16          # ... down to this many cells a budget (a step's fill to 1/16 of it)
ROOM = 4                # the largest prompt and a budget take at most 1/ROOM of the states (`server`)
PHASES = 8              # points at which an arrival finds the step in progress (midpoints of equal parts)
ITERATIONS = 400        # power-iteration steps before the dense solve (`_stationary`)
CONVERGED = 1e-11       # ... done when one step moves less probability than this
NEGLIGIBLE = 1e-13      # probability below which a found state is left out


@dataclass(frozen=True)
class BatchServer:
    rate: float             # arrivals per second
    cell: float             # tokens per cell
    k: int                  # cells per budget
    step: np.ndarray        # T(m) for m = 0..k cells (m = 0: one token)
    sizes: np.ndarray       # prompt points' new tokens, in cells (fractional)
    weights: np.ndarray     # their probabilities
    own_excess: np.ndarray  # a prompt's own last step beyond a typical step of as many tokens
    states: int             # backlog cells

    @property
    def flow(self) -> float:
        """Prefill cells arriving per second."""
        return self.rate * float(self.sizes @ self.weights)


def server(ctx: Context, prof: prefill.PrefillProfile, rate: float, extent_tokens: float) -> BatchServer | None:
    """The server of a prefill worker (no decodes in its steps) at `rate`, on a grid whose backlog
    reaches `extent_tokens` (cells coarsened from CELLS_PER_BUDGET to MIN_CELLS a budget to hold it in
    MAX_STATES); None where even the coarsest cannot, or where the largest prompt and a budget take over
    1/ROOM of the states at CELLS_PER_BUDGET. There prompts span many budgets, or the backlog does: a
    backlog runs full steps, and the M/G/1 law of full steps' shares (`prefill_queue`) is this
    server's (its heavy-traffic limit). Where a rising rate crosses into it, the grid would need over
    64 budgets of backlog, and that law, whose services are at least full steps' shares, lies above this one
    (draw #4 of benchmarks/planner_vs_sim.py: TTFT p99 3.2 s at 12.2 req/s here, 37.6 s at 12.6 there)."""
    k = max(1, min(CELLS_PER_BUDGET, prof.budget))
    if (float(ctx.new_tokens.max()) + prof.budget) / (prof.budget / k) > MAX_STATES / ROOM:
        return None
    while k > MIN_CELLS and math.ceil(extent_tokens * k / prof.budget) > MAX_STATES:
        k //= 2                                      # a longer backlog: coarser cells
    cell = prof.budget / k
    states = max(2 * k + 2, math.ceil(extent_tokens / cell))
    if states > MAX_STATES:
        return None
    tokens = [max(1, min(prof.budget, int(round(m * cell)))) for m in range(k + 1)]
    step = np.asarray([prefill.packed_step(ctx, 0, t).seconds for t in tokens])
    own_excess = prof.last_step - np.interp(prof.last_tokens / cell, np.arange(k + 1), step)
    w = ctx.prompts.weights / ctx.prompts.weights.sum()
    return BatchServer(rate=rate, cell=cell, k=k, step=step, sizes=np.asarray(ctx.new_tokens, float) / cell,
                       weights=w, own_excess=own_excess, states=states)


def ttft(s: BatchServer, own: dist.Points) -> tuple[np.ndarray, np.ndarray, float]:
    """(values, weights, busy) of the TTFT law: an idle worker's arrivals take `own`."""
    if s.rate <= 0:
        return own.values, own.weights, 0.0
    L, k = s.states, s.k
    n_fft = next_fast_len(2 * L, real=True)
    phi = np.fft.rfft(_size_pmf(s, L), n_fft)
    arrivals = _arrivals(s, phi, n_fft, s.step[1:])          # X(T(m)), m = 1..k
    pi, empty = _stationary(s, arrivals)
    busy_time = float(pi @ s.step[np.minimum(np.arange(L), k)]) if L else 0.0
    cycle = busy_time + empty / s.rate
    idle = empty / s.rate / cycle
    values, weights = [own.values], [own.weights * idle]
    for m_values, m_weights in _found(s, pi, phi, n_fft, cycle):
        values.append(m_values)
        weights.append(m_weights)
    return np.concatenate(values), np.concatenate(weights), 1.0 - idle


def _size_pmf(s: BatchServer, L: int) -> np.ndarray:
    """One prompt's new tokens on the cell grid, each point split between its two cells (mean kept)."""
    x = np.minimum(s.sizes, L - 1.000001)
    lo = np.floor(x).astype(int)
    frac = x - lo
    pmf = np.bincount(lo, s.weights * (1 - frac), L) + np.bincount(lo + 1, s.weights * frac, L)
    return pmf[:L]


def _arrivals(s: BatchServer, phi: np.ndarray, n_fft: int, times: np.ndarray) -> np.ndarray:
    """Cells arriving in each of `times` (compound Poisson), one row each, mass past the grid at its edge."""
    law = np.fft.irfft(np.exp(s.rate * np.asarray(times)[:, None] * (phi[None, :] - 1.0)), n_fft, axis=1)
    law = np.clip(law, 0.0, None)
    out = law[:, :s.states].copy()
    out[:, -1] += np.maximum(0.0, 1.0 - out.sum(axis=1))
    return out


def _stationary(s: BatchServer, arrivals: np.ndarray) -> tuple[np.ndarray, float]:
    """The backlog's law at step starts (index = cells; 0 holds nothing) and the probability a step
    ends with nothing queued (the worker then idles until the next arrival, whose prompt starts the
    next step: `restart`). Power iteration first (a few hundred steps of the chain where steps rarely
    fill the budget: ~3 ms), the dense linear solve where it has not converged."""
    restart = _size_pmf(s, s.states)
    restart[0] = 0.0
    restart /= restart.sum()
    pi = _iterate(s, arrivals, restart)
    if pi is None:
        pi = _solve(s, arrivals, restart)
    k = s.k
    empty = float(pi[1:k] @ arrivals[:k - 1, 0]) + (float(pi[k] * arrivals[k - 1, 0]) if s.states > k else 0.0)
    return pi, empty


def _advance(s: BatchServer, pi: np.ndarray, arrivals: np.ndarray, full: np.ndarray, n: int,
             restart: np.ndarray) -> np.ndarray:
    """The backlog's law one step on: B < budget leaves X(T(B)); B >= budget leaves B - budget +
    X(T(budget)) (mass past the grid at its last cell); nothing left: the next arrival's prompt."""
    L, k = s.states, s.k
    out = pi[1:k] @ arrivals[:k - 1]
    if L > k:
        over = np.fft.irfft(np.fft.rfft(pi[k:], n) * full, n)
        out += over[:L]
        out[-1] += over[L:].sum()
    out = np.clip(out, 0.0, None)
    out += out[0] * restart
    out[0] = 0.0
    return out / out.sum()


def _iterate(s: BatchServer, arrivals: np.ndarray, restart: np.ndarray) -> np.ndarray | None:
    n = next_fast_len(2 * s.states, real=True)
    full = np.fft.rfft(arrivals[s.k - 1], n)
    pi = restart
    for _ in range(ITERATIONS):
        nxt = _advance(s, pi, arrivals, full, n, restart)
        if np.abs(nxt - pi).sum() < CONVERGED:
            return nxt
        pi = nxt
    return None


def _solve(s: BatchServer, arrivals: np.ndarray, restart: np.ndarray) -> np.ndarray:
    L, k = s.states, s.k
    P = np.zeros((L, L))
    P[1:k, :] = arrivals[:k - 1]                     # B < budget: all taken, next = X(T(B))
    full = arrivals[k - 1]
    for b in range(k, L):                            # B >= budget: B - budget stays, X(T(budget)) joins
        P[b, b - k:] = full[:L - (b - k)]
        P[b, -1] += full[L - (b - k):].sum()
    P += P[:, :1] * restart[None, :]                 # idle until an arrival, whose prompt starts a step
    A = P[1:, 1:].T - np.eye(L - 1)
    A[-1, :] = 1.0                                   # one balance equation replaced by sum(pi) = 1
    rhs = np.zeros(L - 1)
    rhs[-1] = 1.0
    pi = np.concatenate([[0.0], np.clip(np.linalg.solve(A, rhs), 0.0, None)])
    return pi / pi.sum()


def _found(s: BatchServer, pi: np.ndarray, phi: np.ndarray, n_fft: int, cycle: float):
    """TTFT points of arrivals that find a step in progress, per kind of step (m cells taken)."""
    k = s.k
    phases = (np.arange(PHASES) + 0.5) / PHASES
    over = pi[k:].sum()
    excess = pi[k:] / over if over > 0 else None
    for m in range(1, k + 1):
        weight = (pi[m] if m < k else over) * s.step[m] / cycle
        if weight <= NEGLIGIBLE:
            continue
        ahead = _arrivals(s, phi, n_fft, phases * s.step[m])          # X(elapsed) per phase
        if m == k and excess is not None:
            n = next_fast_len(2 * s.states, real=True)
            ahead = np.fft.irfft(np.fft.rfft(ahead, n, axis=1) * np.fft.rfft(excess, n)[None, :], n,
                                 axis=1)[:, :s.states].clip(0.0, None)
        yield _after(s, m, phases, ahead * (weight / PHASES))


def _after(s: BatchServer, m: int, phases: np.ndarray, ahead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TTFT of an arrival of each prompt point that finds a step of m cells at each phase with the
    given law of cells queued ahead (rows: phases)."""
    phase_i, cells = np.nonzero(ahead > NEGLIGIBLE)
    mass = ahead[phase_i, cells]
    residual = (1.0 - phases[phase_i]) * s.step[m]
    total = cells[:, None] + s.sizes[None, :]                          # cells to its last token
    steps_before = np.maximum(np.ceil(total / s.k - 1e-9), 1.0) - 1.0   # full steps ahead of its last one
    waited = residual[:, None] + steps_before * s.step[s.k]
    fill = np.minimum(s.k, total - steps_before * s.k + s.flow * waited)
    last = np.interp(fill, np.arange(s.k + 1), s.step) + s.own_excess[None, :]
    values = waited + last
    return values.ravel(), (mass[:, None] * s.weights[None, :]).ravel()
