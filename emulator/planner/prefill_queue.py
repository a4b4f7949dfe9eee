"""The prefill queue: how long a prompt waits for its steps, and its TTFT.

Load: `busy` from `prefill.packing` (packed steps share their fixed costs). Wait: M/G/1 with an
exceptional first service (Welch 1964): a prompt that finds the worker idle runs alone and pays each
of its steps' fixed costs (`alone`), one that finds a backlog is packed into steps with the prompts
around it and costs its token share of them, at the load `prefill.packing` finds (`_backlog_service`).
Its law is the standard M/G/1 law of the packed services (`queueing.mg1_wait_pmf`,
Pollaczek-Khinchine/Benes, with Kingman's and Erlang C's corrections for burstiness and pooling)
plus an independent delay for the alone services' excess (`queueing.first_service_delay_pmf`), plus,
on a colocated worker, the residual of a decode-only step in progress. TTFT = wait + own steps, where
FCFS packing makes a prompt's last step also carry prompts that arrived behind it.

A prefill worker with Poisson arrivals of its own (no decodes in its steps, one queue per worker) is
solved as the batch server it is instead (`batch_queue`): the prompts queued together share one step
and its fixed costs, which the M/G/1 law charges each of them at the mean packing's rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from emulator.planner import batch_queue, context, dist, prefill, queueing
from emulator.planner.context import Context


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
    service: dist.Points    # per-request server time in a backlog: its token share of packed steps
    first: dist.Points      # ... and when it finds the worker idle: its own steps alone
    rate: float             # arrivals per server (the first-service delay's lam)
    servers: int
    ca2: float
    vacation: tuple[float, float]  # (probability, length) of a decode-only step an arrival waits out
    own: dist.Points        # an arrival's own prefill latency (its steps, with what packs in behind it)
    packed: float           # mean prefill tokens in a prefill-carrying step
    # (waits, seconds): what a prompt that waited that long gains in its last step from the prompts that
    # arrived behind it meanwhile (`_behind_waiting`), on a grid of waits
    behind: tuple[np.ndarray, np.ndarray]
    # a prefill worker's own queue under Poisson arrivals: the batch server itself (`batch_queue`)
    # gives the TTFT law in place of the M/G/1 one
    batches: batch_queue.BatchServer | None = None
    # laws already computed, by the identity of their shift (the SLO checks read p50, p99, the mean and
    # the CDF of one law: each FFT convolution once per point, not four times)
    _laws: dict = field(default_factory=dict, compare=False, repr=False)

    def stepping(self, service: dist.Points, first: dist.Points, own: dist.Points) -> PrefillQueue:
        """This queue on a worker whose steps run back to back, taking every queued prompt into the next
        one (`colocated._stepping`): its services, first services and own latencies, no vacation, and
        its laws computed afresh (not the memo of the queue it came from)."""
        return replace(self, service=service, first=first, own=own, vacation=(0.0, 0.0), _laws={})

    @property
    def stable(self) -> bool:
        return self.rho < 1 and self.busy < 1 and self.rate * self.service.mean() < 1

    @property
    def mean_wait(self) -> float:
        """Mean time to the start of its own steps (M/G/1 wait plus a decode step's residual)."""
        if not self.stable:
            return math.inf
        p_v, t_v = self.vacation
        return self._standard_mean_wait + self._first_service_mean + p_v * t_v / 2

    @property
    def _standard_mean_wait(self) -> float:
        return queueing.mg1_mean_wait(self.service.values, self.service.weights, self._backlog_load, self.ca2,
                                      self.servers)

    @property
    def _backlog_load(self) -> float:
        """Utilization of the packed services alone (the standard part of the first-service law)."""
        return self.rate * self.service.mean()

    @property
    def _first_service_mean(self) -> float:
        return queueing.first_service_delay_mean(self.service.values, self.first.values, self.service.weights,
                                                 self.rate, self.servers)

    def ttft_quantile(self, q: float, shift: dist.Points | None = None) -> float:
        if not self.stable:
            return math.inf
        pmf, h = self._law(shift)
        return dist.grid_quantile(pmf, h, q)

    def ttft_mean(self, shift: dist.Points | None = None) -> float:
        """Mean of wait + own steps (+ shift), from the same law as the quantiles."""
        if not self.stable:
            return math.inf
        pmf, h = self._law(shift)
        return float(np.arange(len(pmf)) @ pmf) * h / float(pmf.sum())

    def ttft_cdf(self, t: float, shift: dist.Points | None = None) -> float:
        if not self.stable:
            return 0.0
        pmf, h = self._law(shift)
        return dist.grid_cdf(pmf, h, t)

    def grid(self, shift: dist.Points | None = None) -> tuple[np.ndarray, float]:
        """(pmf, cell width) of wait + own steps (+ shift) on its grid (quantiles read it linearly within a cell)."""
        return self._law(shift)

    def _law(self, shift: dist.Points | None):
        """Grid law of wait + own steps (+ shift): the M/G/1 wait (+ a decode step's residual) convolved."""
        found = self._laws.get(id(shift))
        if found is None or found[0] is not shift:
            found = self._laws[id(shift)] = (shift, *self._new_law(shift))   # the shift kept: its id stays its own
        return found[1], found[2]

    def _new_law(self, shift: dist.Points | None):
        # The shift is convolved on the grid, not summed as points (a sum of points is re-binned on the
        # quantile grid), and the grid spans its 1 - 1e-4 quantile, not its last point: mass past the
        # grid stays at its edge, where no quantile up to that level reads it, while a slot wait of
        # probability 2e-6 reaching 6.6 s had coarsened the cells tenfold and moved the median down
        # by 4% (70B TP4, 195-token prompts: TTFT p50 42.1 ms at 20% load, 41.1 ms at 40%).
        top = self.own.values.max() + (shift.quantile(1 - SHIFT_TAIL) if shift is not None else 0.0)
        # the wait's tail: at light load a few residuals of the longest service (two covered), in heavy
        # traffic exponential on the scale of its mean (12 means: e^-12 of it is left off the grid)
        extent = top + self.vacation[1] + 12 * self.mean_wait + 2 * self.first.values.max()
        cells = _cells(extent, self.service.mean() / self.servers, self.own.values.min())
        h = extent / cells
        if self.batches is not None:
            laws = [_histogram(*self._batch_points(self.batches), h, cells)]
            if shift is not None:
                laws.append(dist.on_grid(shift, h, cells))
            return dist.convolve(*laws) if len(laws) > 1 else laws[0], h
        first = queueing.first_service_delay_pmf(self.service.values, self.first.values, self.service.weights,
                                                 self.rate, h, cells, self.servers)
        wait = queueing.mg1_wait_pmf(self.service.values, self.service.weights, self._backlog_load, h, cells,
                                     self.ca2, self.servers, extra=first)
        if wait.sum() < 1 - 1e-3:   # so close to saturation that the FFT loses mass: the heavy-traffic law
            wait = queueing.exponential_wait_pmf(1 - wait[0], self._standard_mean_wait, h, cells)
            wait = dist.convolve(wait, first)
        p_v, t_v = self.vacation
        if p_v > 0 and t_v > 0:
            k = max(1, int(t_v / h))
            vac = np.zeros(cells)
            vac[0] = 1 - p_v
            vac[:k] += p_v / k                     # residual of a decode-only step: uniform over it
            wait = dist.convolve(wait, vac)
        wait = self._packed_behind(wait, h)
        laws = [wait, dist.on_grid(self.own, h, cells)]
        if shift is not None:
            laws.append(dist.on_grid(shift, h, cells))
        return dist.convolve(*laws), h

    def _batch_points(self, batches: batch_queue.BatchServer) -> tuple[np.ndarray, np.ndarray]:
        """The batch server's TTFT points, once per queue (each shift puts them on its own grid)."""
        found = self._laws.get("batch")
        if found is None:
            found = self._laws["batch"] = batch_queue.ttft(batches, self.own)[:2]
        return found

    def _packed_behind(self, wait: np.ndarray, h: float) -> np.ndarray:
        """A prompt that waited w gets a last step that also packs what arrived behind it during w (FCFS:
        they queue after it, and fill the room its last chunk leaves): each wait cell moves by that
        step's extra seconds (`behind`, an expectation over the arrivals), split between the two
        cells it lands between."""
        waits, extra = self.behind
        if wait[0] >= 1 or not extra.any():
            return wait
        at = np.arange(len(wait)) + np.interp(np.arange(len(wait)) * h, waits, extra) / h
        lo = np.minimum(at.astype(int), len(wait) - 1)
        frac = np.where(lo < len(wait) - 1, at - lo, 0.0)
        out = np.bincount(lo, weights=wait * (1 - frac), minlength=len(wait))
        out += np.bincount(np.minimum(lo + 1, len(wait) - 1), weights=wait * frac, minlength=len(wait))
        return out


def _histogram(values: np.ndarray, weights: np.ndarray, h: float, cells: int) -> np.ndarray:
    """Many weighted points on a grid of step h, normalized (mass past the grid at its edge)."""
    pmf = dist.split_onto(values, weights, h, cells)
    return pmf / pmf.sum()


FINE = 256          # cells per fastest own latency (a quantile in the body to ~0.4%, interpolated finer)
SHIFT_TAIL = 1e-4     # mass of a TTFT shift (slot wait, handoff) the grid may leave at its edge
MAX_CELLS = 1 << 16   # the finest grid a heavy-traffic law gets (an FFT of 2^17 points: milliseconds)


def _cells(extent: float, service_mean: float, fastest: float = 0.0) -> int:
    """Grid cells for a law spanning `extent`: GRID_CELLS, or more near saturation so a cell stays
    within an eighth of a mean service (up to MAX_CELLS; beyond, the residual's exact cell masses
    still keep the wait's mean, see queueing.residual_pmf), and within 1/FINE of the fastest own
    latency, so a median read in the body keeps its precision when a long slot-wait tail (seconds,
    beside 40 ms prefills) stretches the grid."""
    if service_mean <= 0:
        return dist.GRID_CELLS
    need = max(dist.GRID_CELLS, math.ceil(8 * extent / service_mean))
    if fastest > 0:
        need = max(need, math.ceil(FINE * extent / fastest))
    return int(min(MAX_CELLS, need))


def queue(ctx: Context, prof: prefill.PrefillProfile, rate: float, workers: int = 1,
          vacation: tuple[float, float] = (0.0, 0.0)) -> PrefillQueue:
    """Prefill queue of a pool of `workers` at pool rate `rate`.

    The load is `busy` from `packing` (packed steps share their fixed costs); the wait is M/G/1 with
    an exceptional first service (module docstring): a prompt served in a backlog costs its token
    share of full-budget steps scaled to the load `packing` finds, one that starts a busy period its
    steps alone. Scaling every prompt's alone time to the load instead gave a short prompt that waits
    in a backlog its alone step (a 60-token chunk costs 29 ms alone and 7 ms of a full step on a 70B
    TP2 H200): p99 TTFT 1.444 s at 1.45 req/s where this law gives 1.41 s (simulated: 1.343 s).
    vacation = (probability, length): a colocated arrival first waits out a decode-only step in
    progress (the M/G/1-with-vacations decomposition: W = W_M/G/1 + residual vacation).
    """
    per_worker = rate / workers
    servers, ca2 = servers_and_ca2(ctx, workers)
    rho = per_worker * prof.mean_share(ctx)
    packed, busy = prefill.packing(ctx, prof, per_worker, before=vacation[1])
    service = dist.Points(_backlog_service(ctx, prof, per_worker, busy), ctx.prompts.weights)
    first = dist.Points(np.maximum(prof.alone, prof.share), ctx.prompts.weights)
    flow = per_worker * float(ctx.new_tokens @ ctx.prompts.weights)
    arrivals = queueing.CappedArrivals(ctx.new_tokens, ctx.prompts.weights, prof.budget)
    spans = np.maximum(prof.alone - prof.last_step, 0.0)   # its earlier chunks: arrivals meanwhile queue behind
    rooms = np.maximum(prof.budget - prof.last_tokens, 0.0)
    own = _own_latency(ctx, prof, arrivals.mean(per_worker * spans, rooms))
    behind = _behind_waiting(ctx, arrivals, per_worker, spans, rooms, prefill.token_seconds(ctx, prof))
    batches = _batch_server(ctx, prof, per_worker, service, flow) \
        if prof.decodes == 0 and vacation == (0.0, 0.0) and servers == 1 and ca2 == 1.0 else None
    return PrefillQueue(rho=rho, busy=busy, service=service, first=first, rate=per_worker, servers=servers,
                        ca2=ca2, vacation=vacation, own=own, packed=packed, behind=behind, batches=batches)


def _batch_server(ctx: Context, prof: prefill.PrefillProfile, rate: float, service: dist.Points,
                  flow: float) -> batch_queue.BatchServer | None:
    """A prefill worker's own queue under Poisson arrivals as the batch server (`batch_queue`), on a
    grid that reaches 12 of the M/G/1 law's mean waits of backlog (which it overstates) past two of the
    largest prompts and two budgets; None where that grid is too large (the M/G/1 law holds there)."""
    if rate <= 0:
        return None
    mean_wait = queueing.mg1_mean_wait(service.values, service.weights, rate * service.mean())
    if not math.isfinite(mean_wait):
        return None
    reach = 2 * float(ctx.new_tokens.max()) + 2 * prof.budget + 12 * flow * mean_wait
    return batch_queue.server(ctx, prof, rate, reach)


def _backlog_service(ctx: Context, prof: prefill.PrefillProfile, rate: float, busy: float) -> np.ndarray:
    """Each prompt point's server time in a backlog: its token share of full-budget steps, scaled so
    that they load the worker as `prefill.packing` finds (busy / rate x mean share), at most its steps
    alone. Full-budget steps overstate what a backlog packs where the budget is many prompts long (an
    8,192-token budget, prompts of ~1,000 tokens); costing each prompt at the mean fill's step instead
    made the services jump with the fill's GEMM tiles and the p99 fall as the rate rose."""
    mean_share = prof.mean_share(ctx)
    scale = busy / (rate * mean_share) if rate > 0 and mean_share > 0 else 1.0
    return np.minimum(prof.alone, prof.share * max(1.0, scale))


def _own_latency(ctx: Context, prof: prefill.PrefillProfile, behind: np.ndarray) -> dist.Points:
    """Own steps. FCFS fills each step's budget with whoever is queued next, so a prompt's last step
    also carries prompts that arrived behind it: `behind` per point, the tokens expected to arrive during
    its earlier chunks and fit in the room its last chunk leaves (`queueing.CappedArrivals`: as Poisson
    arrivals, not a fluid flow, which fills that room whenever its mean does: a 70B L40S worker of
    ~4,000-token code prompts at 0.8 req/s, 1,024-token budget, packed its last step full where 70% of
    prompts find none behind, and read TTFT p50 669 ms against 519 replayed, 502 simulated). Those that
    came while it waited are `PrefillQueue._packed_behind`.
    The law is read on the tail-refined grid where the context keeps its samples (`_finer`)."""
    values = []
    for i, (alone, last, last_s) in enumerate(zip(prof.alone, prof.last_tokens, prof.last_step, strict=True)):
        cached = ctx.cached[i] + ctx.new_tokens[i] - last
        values.append(alone - last_s + prefill.with_packing(ctx, prof, last, cached, True, last_s, last + behind[i]))
    return _finer(ctx, np.asarray(values))


def _finer(ctx: Context, own: np.ndarray) -> dist.Points:
    """Own latencies costed at the prompt points, read at the new tokens of the tail-refined grid
    (context.fine_new_tokens) by interpolating between the points (linear past the last two): costing
    every refined point would double the planner's step-time work, and own latency is smooth in new
    tokens between points, where the spread a point's mean stands for is not (dist.TAIL_EDGES)."""
    fine = context.fine_new_tokens(ctx)
    new = ctx.new_tokens
    if fine is None or len(new) < 2:
        return dist.Points(own, ctx.prompts.weights)
    order = np.argsort(new, kind="stable")
    x, y = new[order], own[order]
    values = np.interp(fine.values, x, y)
    if x[-1] > x[-2]:
        past = fine.values > x[-1]
        values[past] = y[-1] + (fine.values[past] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return dist.Points(values, fine.weights)


WAITS = np.concatenate([[0.0], np.geomspace(1e-4, 1e4, 81)])   # seconds: the grid `behind` is kept on


def _behind_waiting(ctx: Context, arrivals: queueing.CappedArrivals, rate: float, spans: np.ndarray,
                    rooms: np.ndarray, slope: float) -> tuple[np.ndarray, np.ndarray]:
    """(waits, seconds): the mean extra time of a prompt's last step when it waited w, over what it
    packs with no wait (`_own_latency`): the tokens arriving over w + its earlier chunks, fit in its
    room, minus those over its earlier chunks alone, at the step's marginal seconds a token."""
    mus = rate * (spans[None, :] + WAITS[:, None])
    packed = arrivals.mean(mus.ravel(), np.tile(rooms, len(WAITS))).reshape(mus.shape)
    w = ctx.prompts.weights / ctx.prompts.weights.sum()
    return WAITS, slope * ((packed - packed[0][None, :]) @ w)
