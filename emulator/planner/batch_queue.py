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
B' = B - m + X. With nothing left and nothing arrived the worker idles until the next arrival, whose
prompt starts the next step. Empty is a state of its own, not "0 cells": a prompt shorter than a cell
puts part of its mass in cell 0, and reading that as empty lost the steps of short prompts that
arrive alone (prompts of 30 and 45 tokens in 64-token cells at 30 req/s: the worker 59% busy by the
chain, 64% once empty stood apart).
Its stationary law on a token grid (`_stationary`) gives what an arrival finds (PASTA): the worker idle
(it runs its own steps: `prefill_queue._own_latency`), or in a step of m tokens at a uniform point of
it, with A = B - m + X(elapsed) tokens queued ahead. Its first token then comes after the step's
residual r, ceil((A + n) / budget) - 1 full steps, and the step with its last token, which also carries
what arrived behind it meanwhile up to the budget. Those arrivals are a compound Poisson sum too:
none with probability e^(-lambda w), else three nodes, the means of the bins between the 0.6 and 0.95
quantiles of their law given any (`_behind`, from Panjer's recursion on the cell grid). Their mean alone
left the tail short: the one 500-token prompt that lands behind a 36-token one is what makes its step
long. A two-node Gauss rule matching their first three moments read the p99 of draw #6's prefill worker
(below) 3.0-3.3% above an event replay of its points (17 and 21 req/s: 114.6 and 126.2 ms against
medians of five 400,000-arrival replays, 111.1 and 122.2; the bins: 110.2 and 122.0) and its C_max
17.7 req/s (the bins: 19.1; simulated ~20.1); on the synthetic cases of
tests/emulator/planner/test_planner_prefill_batches.py both read p50, p90 and p99 within 3% of the
replays' median, but for the sub-cell prompts' p99 (+4.4% by the bins, +4.8% by the rule). Prompts of 200
new tokens on the prefill worker of draw #6 (`benchmarks/planner_vs_sim.py --seed 13`, 70B TP4 H100)
at 10 req/s: TTFT p99 61.1 ms by the mean, 66.6 ms by the rule, 67.1 ms with the arrivals' whole law,
67.7 ms replayed event by event (each cell's step read at its token multiple; `_cell_step`'s average
reads 69.3 ms there, every prompt sitting mid-stair). With the prompt points binned from the
simulator's own prefill hits at 21 req/s, these fixes and `_cell_step` moved the planned p99 from
112.0 ms to 120.4 ms (117.9 without `_cell_step`); the simulator's is 120.4 ms (20,299 requests), an
event-by-event replay of the points under Poisson arrivals 118.1 ms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.fft import next_fast_len

from emulator.planner import dist, prefill, queueing
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
CELL_SAMPLES = (-0.75, -0.25, 0.25, 0.75)   # a cell's token counts its step time averages (`_cell_step`)
FINE_PER_FASTEST = 1024 # cells of the gathered law per fastest own latency (4x finer than any law's grid)
MAX_FINE_CELLS = 1 << 20   # ... at most (16x the finest law's grid, `prefill_queue.MAX_CELLS`)


@dataclass(frozen=True)
class BatchServer:
    rate: float             # arrivals per second
    cell: float             # tokens per cell
    k: int                  # cells per budget
    step: np.ndarray        # T(m) for m = 0..k cells, each over the token counts it stands for
    sizes: np.ndarray       # prompt points' new tokens, in cells (fractional)
    weights: np.ndarray     # their probabilities
    own_excess: np.ndarray  # a prompt's own last step beyond a typical step of as many tokens
    states: int             # backlog cells

    @property
    def flow(self) -> float:
        """Prefill cells arriving per second."""
        return self.rate * float(self.sizes @ self.weights)

    @cached_property
    def behind_nodes(self) -> np.ndarray:
        """Per expected count of arrivals (BEHIND_MUS) and bin of BEHIND_EDGES: the mean cells that
        bin of their compound Poisson sum holds, given any arrived (past the budget: k + 1, as the step
        takes no more), from its law on the cell grid (`queueing.compound_poisson_pmf`)."""
        k, mus = self.k, BEHIND_MUS
        size = dist.split_onto(np.minimum(self.sizes, k + 1), self.weights, 1.0, k + 2)
        f = queueing.compound_poisson_pmf(size[:k + 1], mus)
        f[:, 0] -= np.exp(-mus)                       # X = 0 with no arrival is the "none" node
        some = np.concatenate([np.clip(f, 0.0, None), np.zeros((len(mus), 1))], axis=1)
        some[:, -1] = np.clip(-np.expm1(-mus) - some.sum(axis=1), 0.0, None)   # past the budget
        some[0] = size                                # mu -> 0: one arrival, the size law itself
        return _bin_means(some / some.sum(axis=1, keepdims=True), BEHIND_EDGES)


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
    step = np.asarray([_cell_step(ctx, m * cell, cell, prof.budget) for m in range(k + 1)])
    own_excess = prof.last_step - np.interp(prof.last_tokens / cell, np.arange(k + 1), step)
    w = ctx.prompts.weights / ctx.prompts.weights.sum()
    return BatchServer(rate=rate, cell=cell, k=k, step=step, sizes=np.asarray(ctx.new_tokens, float) / cell,
                       weights=w, own_excess=own_excess, states=states)


def _cell_step(ctx: Context, centre: float, cell: float, budget: int) -> float:
    """The step time of a cell: T over the token counts the cell stands for, weighted as a prompt's
    tokens are split between two cells (a triangle one cell wide each side). T has stairs where the
    GEMMs take another tile (+7% every 128 tokens on a 70B TP8 A100 step), and cell multiples can sit
    on every stair's low end: reading T there alone left the worker 3% less busy than its steps
    (draw #4 of `test_planner_prefill_batches`, 9.5 req/s: 0.799 against 0.823 replayed; 0.819 so).
    The triangle assumes a cell's token counts spread evenly: prompts that all sit mid-stair read
    busier than they are (200-token prompts on a 70B TP4 H100 at 10 req/s: 0.282 against 0.273)."""
    times, weights = [], []
    for u in CELL_SAMPLES:
        tokens = centre + u * cell
        if 0 < tokens <= budget:
            times.append(prefill.packed_step(ctx, 0, max(1, min(budget, int(round(tokens))))).seconds)
            weights.append(1.0 - abs(u))
    return float(np.dot(times, weights) / sum(weights))


def ttft(s: BatchServer, own: dist.Points) -> tuple[np.ndarray, np.ndarray, float]:
    """(values, weights, busy) of the TTFT law: an idle worker's arrivals take `own`."""
    if s.rate <= 0:
        return own.values, own.weights, 0.0
    L, k = s.states, s.k
    n_fft = next_fast_len(2 * L, real=True)
    phi = np.fft.rfft(_size_pmf(s, L), n_fft)
    arrivals = _arrivals(s, phi, n_fft, s.step)              # X(T(m)), m = 0..k
    pi, empty = _stationary(s, arrivals)
    busy_time = float(pi @ s.step[np.minimum(np.arange(L), k)]) if L else 0.0
    cycle = busy_time + empty / s.rate
    idle = empty / s.rate / cycle
    # the latest first token: a step's residual, the whole backlog's full steps and the last one
    top = s.step[k] * ((L + float(s.sizes.max())) / k + 3) + max(0.0, float(s.own_excess.max())) \
        + float(own.values.max())
    law = _Fine(max(float(own.values.min()) / FINE_PER_FASTEST, top / MAX_FINE_CELLS), top)
    law.add(own.values, own.weights * idle)
    for m_values, m_weights in _found(s, pi, phi, n_fft, cycle):
        law.add(m_values, m_weights)
    values, weights = law.points()
    return values, weights, 1.0 - idle


class _Fine:
    """Weighted points gathered on a fine grid as they come (each split between its two cells, mean
    kept): the found steps give millions of points, the laws read them on grids hundreds of times
    coarser (`prefill_queue._cells`), and every law would histogram all of them again."""

    def __init__(self, width: float, top: float):
        self.width = width
        self.mass = np.zeros(int(math.ceil(top / width)) + 2)

    def add(self, values: np.ndarray, weights: np.ndarray) -> None:
        if not len(values):
            return
        top = float(np.max(values)) / self.width          # only the cells these reach (past the top: its edge)
        used = min(len(self.mass), int(top) + 2)
        self.mass[:used] += dist.split_onto(values, weights, self.width, used)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        cells = np.flatnonzero(self.mass)
        return cells * self.width, self.mass[cells]


def _size_pmf(s: BatchServer, L: int) -> np.ndarray:
    """One prompt's new tokens on the cell grid, each point split between its two cells (mean kept)."""
    return dist.split_onto(s.sizes, s.weights, 1.0, L)


def _arrivals(s: BatchServer, phi: np.ndarray, n_fft: int, times: np.ndarray) -> np.ndarray:
    """Cells arriving in each of `times` (compound Poisson), one row each, mass past the grid at its edge."""
    law = np.fft.irfft(np.exp(s.rate * np.asarray(times)[:, None] * (phi[None, :] - 1.0)), n_fft, axis=1)
    law = np.clip(law, 0.0, None)
    out = law[:, :s.states].copy()
    out[:, -1] += np.maximum(0.0, 1.0 - out.sum(axis=1))
    return out


def _stationary(s: BatchServer, arrivals: np.ndarray) -> tuple[np.ndarray, float]:
    """The backlog's law at step starts (index = cells, every state holding something: cell 0 is a
    prompt shorter than a cell) and the probability a step ends with nothing queued (the worker then
    idles until the next arrival, whose prompt starts the next step: `restart`). Power iteration first
    (a few hundred steps of the chain where steps rarely fill the budget: ~3 ms), the dense linear
    solve where it has not converged."""
    restart = _size_pmf(s, s.states)
    none = _nothing_arrives(s)
    pi = _iterate(s, arrivals, none, restart)
    if pi is None:
        pi = _solve(s, arrivals, none, restart)
    return pi, _empty(s, pi, none)


def _nothing_arrives(s: BatchServer) -> np.ndarray:
    """P(no arrival during a step of m cells), m = 0..k."""
    return np.exp(-s.rate * s.step)


def _empty(s: BatchServer, pi: np.ndarray, none: np.ndarray) -> float:
    """P(a step ends with nothing queued): it took all (B < budget, or B = budget) and nothing arrived."""
    k = s.k
    return float(pi[:k] @ none[:k]) + (float(pi[k] * none[k]) if s.states > k else 0.0)


def _advance(s: BatchServer, pi: np.ndarray, arrivals: np.ndarray, full: np.ndarray, n: int,
             none: np.ndarray, restart: np.ndarray) -> np.ndarray:
    """The backlog's law one step on: B < budget leaves X(T(B)); B >= budget leaves B - budget +
    X(T(budget)) (mass past the grid at its last cell); nothing left and nothing arrived: the next
    arrival's prompt."""
    L, k = s.states, s.k
    out = pi[:k] @ arrivals[:k]
    if L > k:
        over = np.fft.irfft(np.fft.rfft(pi[k:], n) * full, n)
        out += over[:L]
        out[-1] += over[L:].sum()
    out = np.clip(out, 0.0, None)
    empty = _empty(s, pi, none)
    out[0] -= empty
    out += empty * restart
    out = np.clip(out, 0.0, None)
    return out / out.sum()


def _iterate(s: BatchServer, arrivals: np.ndarray, none: np.ndarray, restart: np.ndarray) -> np.ndarray | None:
    n = next_fast_len(2 * s.states, real=True)
    full = np.fft.rfft(arrivals[s.k], n)
    pi = restart
    for _ in range(ITERATIONS):
        nxt = _advance(s, pi, arrivals, full, n, none, restart)
        if np.abs(nxt - pi).sum() < CONVERGED:
            return nxt
        pi = nxt
    return None


def _solve(s: BatchServer, arrivals: np.ndarray, none: np.ndarray, restart: np.ndarray) -> np.ndarray:
    L, k = s.states, s.k
    P = np.zeros((L, L))
    P[:k, :] = arrivals[:k]                          # B < budget: all taken, next = X(T(B))
    full = arrivals[k]
    for b in range(k, L):                            # B >= budget: B - budget stays, X(T(budget)) joins
        P[b, b - k:] = full[:L - (b - k)]
        P[b, -1] += full[L - (b - k):].sum()
    idle = np.zeros(L)                               # nothing left, nothing arrived: idle until an
    idle[:k] = none[:k]                              # arrival, whose prompt starts the next step
    if L > k:
        idle[k] = none[k]
    P[:, 0] -= idle
    P += idle[:, None] * restart[None, :]
    A = P.T - np.eye(L)
    A[-1, :] = 1.0                                   # one balance equation replaced by sum(pi) = 1
    rhs = np.zeros(L)
    rhs[-1] = 1.0
    pi = np.clip(np.linalg.solve(A, rhs), 0.0, None)
    return pi / pi.sum()


def _found(s: BatchServer, pi: np.ndarray, phi: np.ndarray, n_fft: int, cycle: float):
    """TTFT points of arrivals that find a step in progress, per kind of step (m cells taken)."""
    k = s.k
    phases = (np.arange(PHASES) + 0.5) / PHASES
    over = pi[k:].sum()
    excess = pi[k:] / over if over > 0 else None
    for m in range(k + 1):
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
    base = total - steps_before * s.k
    found = mass[:, None] * s.weights[None, :]
    grid = np.arange(s.k + 1)
    values, weights = [], []
    for behind, p in _behind(s, waited):
        last = np.interp(np.minimum(s.k, base + behind), grid, s.step) + s.own_excess[None, :]
        values.append((waited + last).ravel())
        weights.append((found * p).ravel())
    return np.concatenate(values), np.concatenate(weights)


# The law of what arrives behind a prompt, as nodes: given any arrival, the mean of each bin between
# these quantiles (module docstring). The top 5% carries the tail a p99 reads; the body splits at 0.6,
# where a bimodal law (a short prompt, or a long one) changes mode: one body bin below 0.9 put a 36-token
# prompt's median 6.6% above the replay's (36 and 500 tokens, 4:1, 25 req/s; so split: +2.7%).
BEHIND_EDGES = (0.0, 0.6, 0.95, 1.0)
# Expected arrivals behind (rate x wait) at which the bins are tabulated; between them, interpolated.
BEHIND_MUS = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 121)])


def _behind(s: BatchServer, waited: np.ndarray) -> list[tuple[np.ndarray | float, np.ndarray]]:
    """Cells arriving during `waited` as (cells, probability) nodes: none (e^(-lambda w)), and given
    any, each bin of BEHIND_EDGES at its mean (`BatchServer.behind_nodes`, read at lambda w)."""
    lam_w = s.rate * waited
    none = np.exp(-lam_w)
    nodes = s.behind_nodes
    out: list[tuple[np.ndarray | float, np.ndarray]] = [(0.0, none)]
    for b, share in enumerate(np.diff(BEHIND_EDGES)):
        out.append((np.interp(lam_w, BEHIND_MUS, nodes[:, b]), (1 - none) * share))
    return out


def _bin_means(pmf: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Per row of a pmf over cells 0, 1, ...: the mean cell of each bin between consecutive quantile
    `edges` (a cell split where an edge falls inside it)."""
    cells = np.arange(pmf.shape[1], dtype=float)
    cdf = np.cumsum(pmf, axis=1)
    xs = np.cumsum(pmf * cells, axis=1)
    rows = np.arange(pmf.shape[0])
    out = np.zeros((pmf.shape[0], len(edges) - 1))
    prev_x = np.zeros(pmf.shape[0])
    for b, e in enumerate(edges[1:]):
        j = np.minimum((cdf < e - 1e-12).sum(axis=1), pmf.shape[1] - 1)   # the cell the edge falls in
        below = np.where(j > 0, cdf[rows, j - 1], 0.0)
        x = np.where(j > 0, xs[rows, j - 1], 0.0) + (e - below) * cells[j]
        out[:, b] = (x - prev_x) / (e - edges[b])
        prev_x = x
    return out
