"""Steady state for live measurements: windows sized in request lifetimes, a stationarity check, and
the bisection that brackets the SLO crossing. Pure: plain data in and out, no clock, no I/O.

A rate is measured after a warm-up of WARMUP_LIFETIMES and over a window of WINDOW_LIFETIMES mean
end-to-end latencies at that rate (emulated seconds, from the steady-state simulator): a window of a
few lifetimes holds the batches still filling from an empty cluster, so it reads below the offered
rate whatever the cluster's capacity. A window is stationary when its two halves agree (p99 TTFT,
requests in the system) and, below C_max, it serves what was sent. Past C_max a window whose halves
drift only towards worse (queue and TTFT growing) is `overloaded`: the rate's steady state is at least
as bad as its window, so the miss it reports cannot flip; one whose halves improve is not stationary.
For the same reason a window that met the SLO while drifting towards worse is judged by what it was
heading to (`steady_state_miss`): a miss when its later half misses, or it serves less than it was
sent while its TTFT or queue still grows.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from loadtests.analysis import miss_crossing

WARMUP_LIFETIMES = 3.0
WINDOW_LIFETIMES = 10.0
TAIL_LIFETIMES = 2.0        # load kept on after the window while its last requests finish (then cut short)
BRACKET_RATIO = 1.05        # bisect live until the SLO crossing lies within 5%
SERVED_TOLERANCE = 0.03     # below C_max a steady window serves within 3% of what it was sent
# Halves agree when within these (relative, or absolute for values near zero). p99 TTFT of half a
# window rests on a few dozen slow requests, so its tolerance is wider than the queue's.
TTFT_HALVES_REL, TTFT_HALVES_ABS_SLO = 0.35, 0.10   # or within 10% of the TTFT SLO
# Or both halves at most this share of the SLO: a p99 rests on its 1% slowest, which come in queueing
# episodes, so two halves of ~5 lifetimes each can differ widely below the SLO while the verdict
# cannot flip; a growing queue is what the requests-in-system halves catch.
WELL_BELOW = 0.8
QUEUE_HALVES_REL, QUEUE_HALVES_ABS = 0.15, 4.0      # requests in the system, summed over workers


@dataclass(frozen=True)
class Sizing:
    """Warm-up, window and tail of one live rate, emulated seconds, and the lifetime they rest on."""
    lifetime_s: float
    warmup_s: float
    window_s: float
    tail_s: float

    @classmethod
    def of(cls, lifetime_s: float, fill_s: float = 0.0) -> Sizing:
        """`fill_s`: how long the cluster, started empty, takes to hold its steady number of requests
        (the simulator's, at this rate): near C_max the running batch fills over several lifetimes, and
        a window that opens while it still fills serves less than it is sent."""
        return cls(lifetime_s, max(WARMUP_LIFETIMES * lifetime_s, fill_s), WINDOW_LIFETIMES * lifetime_s,
                   TAIL_LIFETIMES * lifetime_s)


@dataclass
class Stationarity:
    ttft_p99_halves: tuple[float, float]
    in_system_halves: tuple[float | None, float | None]
    sent_rps: float                 # arrivals inside the window per emulated second (Poisson: not the nominal rate)
    served_rps: float
    ttft_ok: bool
    queue_ok: bool
    served_ok: bool
    notes: list[str] = field(default_factory=list)

    worsening: bool = False         # past C_max: the halves that disagree all grow

    @property
    def stationary(self) -> bool:
        return self.ttft_ok and self.queue_ok and self.served_ok

    @property
    def state(self) -> str:
        """"yes", "overloaded" (past C_max, drifting only towards worse) or "NO"."""
        return "yes" if self.stationary else "overloaded" if self.worsening else "NO"


def halves_agree(a: float, b: float, rel: float, absolute: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), absolute)


def served_tolerance(sent_rps: float, lifetime_s: float, window_s: float) -> float:
    """How far served may sit from sent, relative: SERVED_TOLERANCE, or three times the window's edge
    noise (3 sigma, as for the queue) when that is larger. Requests in flight at the window's start
    finish inside it and those in flight at its end do not: about Poisson(rate x lifetime) each, so
    served - sent wanders by sqrt(2 x rate x lifetime) requests even at a perfect steady state (1% of a
    10-lifetime window at 150 requests in flight; a tiny cluster with a handful in flight needs the wider bound)."""
    if sent_rps <= 0 or lifetime_s <= 0 or window_s <= 0:
        return SERVED_TOLERANCE
    edge = math.sqrt(2 * sent_rps * lifetime_s) / (sent_rps * window_s)
    return max(SERVED_TOLERANCE, 3 * edge)


def queue_noise(a: float, b: float, samples: float) -> float:
    """Requests in the system wander like a Poisson count (mean = variance, Little's law's M/G/inf);
    the means of two halves of `samples` independent polls each differ by this much (3 sigma) at a
    steady state. Polls closer than a request lifetime see mostly the same requests: count lifetimes."""
    return 3 * math.sqrt(max(a + b, 0.0) / max(samples, 1))


def p99_band(values: Sequence[float], z: float = 2.0) -> tuple[float, float]:
    """Where the p99 of this many samples could lie (about 95%, distribution-free): the order statistics
    whose ranks are z binomial sigmas either side of the p99's rank. A p99 of n samples rests on its
    0.01 n largest, so two halves of ~1,500 requests can differ by tens of percent by chance alone."""
    ordered = np.sort(np.asarray(values, dtype=float))
    n = len(ordered)
    if n == 0:
        return (math.nan, math.nan)
    rank, spread = 0.99 * (n - 1), z * math.sqrt(n * 0.99 * 0.01)
    return float(ordered[max(0, math.floor(rank - spread))]), float(ordered[min(n - 1, math.ceil(rank + spread))])


def bands_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def check(ttft_halves: tuple[float, float], queue_halves: tuple[float | None, float | None], sent_rps: float,
          served_rps: float, ttft_slo: float, below_c_max: bool, served_tol: float = SERVED_TOLERANCE,
          queue_samples: int = 1_000_000,
          ttft_bands: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Stationarity:
    """Judge one window from its halves' p99 TTFT (emulated s; with `ttft_bands`, each p99's sampling
    band from p99_band), mean requests in the system, and its sent and served rates. Only a rate below
    C_max (one that meets the SLO) must be stationary. Above it the queue grows until the shedder caps
    it, which takes many lifetimes just past C_max: growth there is the finding (overload) and cannot
    turn the miss into a pass, so it is `worsening`, without a note. Halves that improve past C_max mean
    the window still held a transient worse than the rate's steady state, and the miss may be wrong:
    that gets a note, which invalidates the run."""
    notes = []
    ttft_ok = halves_agree(*ttft_halves, TTFT_HALVES_REL, TTFT_HALVES_ABS_SLO * ttft_slo) \
        or (ttft_bands is not None and bands_overlap(*ttft_bands)) \
        or max(ttft_halves) <= WELL_BELOW * ttft_slo   # both halves give the same verdict with room to spare
    if not ttft_ok and below_c_max:
        notes.append(f"p99 TTFT of the window's halves differ: {_ms(ttft_halves[0])} vs {_ms(ttft_halves[1])} ms")
    qa, qb = queue_halves
    queue_ok = qa is None or qb is None or halves_agree(
        qa, qb, QUEUE_HALVES_REL, max(QUEUE_HALVES_ABS, queue_noise(qa, qb, queue_samples)))
    if not queue_ok and below_c_max:
        notes.append(f"requests in the system drift: {qa:.0f} in the first half, {qb:.0f} in the second")
    served_ok = True
    if below_c_max and sent_rps > 0:
        served_ok = abs(served_rps - sent_rps) <= served_tol * sent_rps
        if not served_ok:
            notes.append(f"served {served_rps:.1f}/s of {sent_rps:.1f}/s sent (more than "
                         f"{served_tol:.1%} apart below C_max)")
    worsening = not below_c_max and _grows(ttft_halves, ttft_ok) and _grows(queue_halves, queue_ok)
    if not below_c_max and not (ttft_ok and queue_ok) and not worsening:
        notes.append(f"past C_max the window's second half is better than its first (p99 TTFT "
                     f"{_ms(ttft_halves[0])} -> {_ms(ttft_halves[1])} ms, requests in the system "
                     f"{_count(qa)} -> {_count(qb)}): a transient, so the miss may not hold")
    return Stationarity(ttft_halves, queue_halves, sent_rps, served_rps, ttft_ok, queue_ok, served_ok, notes,
                        worsening)


def steady_state_miss(station: Stationarity, ttft_slo: float) -> str | None:
    """Why a window that met the SLO over its length misses at its rate's steady state, or None.

    Each rate starts from an idle cluster, which only fills towards its steady state (a queue started
    empty grows stochastically to its stationary law), and the warm-up lasted as long as the simulated
    cluster took to fill. So a window whose halves drift only towards worse is judged by what it was
    heading to: a miss when its later half misses (refusals count), or when it serves less than was sent
    while its TTFT or requests in the system grow (the rate is past what the cluster sustains: held,
    the queue reaches the shedder's cap). Only where the halves really disagree, so one half's sampling
    noise cannot flip the verdict the whole window gave; where they agree, only a backlog does: served
    short of sent while neither half improves (54.7 req/s on default: served 53.0 of 55.3/s sent, p99 TTFT
    halves 76 -> 297 ms and 393 -> 453 requests in the system, each inside its noise)."""
    if station.ttft_ok and station.queue_ok:
        backlog = not station.served_ok and station.served_rps < station.sent_rps
        rising = _rising(station.ttft_p99_halves) and _rising(station.in_system_halves)
        return "queue growing" if backlog and rising else None
    a, b = station.ttft_p99_halves
    if not (_grows((a, b), station.ttft_ok) and _grows(station.in_system_halves, station.queue_ok)):
        return None
    if not (math.isfinite(b) and b <= ttft_slo):
        return "later half"
    if not station.served_ok and station.served_rps < station.sent_rps:
        return "queue growing"   # what was sent and not served is in the system: its backlog grows
    return None


def _rising(halves: tuple[float | None, float | None]) -> bool:
    """A second half at least as large as the first (both known)."""
    a, b = halves
    return a is not None and b is not None and not (math.isnan(a) or math.isnan(b)) and b >= a


def _grows(halves: tuple[float | None, float | None], agree: bool) -> bool:
    """Halves that agree, or a second half larger than the first (or one that cannot be told: NaN)."""
    a, b = halves
    if agree or a is None or b is None or math.isnan(a) or math.isnan(b):
        return True
    return b > a


def _count(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _ms(x: float) -> str:
    return f"{x * 1000:.0f}" if math.isfinite(x) else "inf"


def p99_or_inf(values: Sequence[float]) -> float:
    """p99 where an infinite value (a refused request) counts; NaN when there is nothing."""
    if not len(values):
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), 99, method="higher"))


# -- bracketing the SLO crossing --------------------------------------------------------------------

@dataclass
class Bracket:
    """Live bisection of the SLO crossing: rates that met the SLO and rates that missed it.

    Starts from a guess (the steady-state simulator's crossing) with a bracket of BRACKET_RATIO
    around it, steps outward on the side the guess was wrong, and halves the bracket geometrically
    until it is within BRACKET_RATIO. `next_rate` is None once done (or out of tries).
    """
    guess: float
    max_tries: int = 6
    passed: list[float] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)

    @property
    def lo(self) -> float | None:
        return max(self.passed) if self.passed else None

    @property
    def hi(self) -> float | None:
        above = [r for r in self.failed if self.lo is None or r > self.lo]
        return min(above) if above else None

    @property
    def done(self) -> bool:
        lo, hi = self.lo, self.hi
        return lo is not None and hi is not None and hi / lo <= BRACKET_RATIO * (1 + 1e-9)

    def record(self, rate: float, met_slo: bool) -> None:
        (self.passed if met_slo else self.failed).append(rate)

    def next_rate(self) -> float | None:
        if self.done or len(self.passed) + len(self.failed) >= self.max_tries:
            return None
        half = math.sqrt(BRACKET_RATIO)
        lo, hi = self.lo, self.hi
        if lo is None and hi is None:
            return self.guess / half
        # Wrong side of the guess: step on by 5%, then 10%, 21%, ... (the step squares each time), so
        # a guess far off costs a few rates, and the bisection narrows what the last step overshot.
        if lo is None:
            return min(self.failed) / BRACKET_RATIO ** (2 ** (len(self.failed) - 1))
        if hi is None:
            return lo * BRACKET_RATIO ** (2 ** (len(self.passed) - 1))
        return math.sqrt(lo * hi)


def crossing(lo: tuple[float, ...], hi: tuple[float, ...], ttft_slo: float, itl_slo: float) -> float:
    """The rate between a passing (rate, p99 TTFT, p99 ITL[, TTFT miss share]) and a failing one where
    the first metric reaches its SLO, linear in log latency. Where the failing p99 TTFT is infinite (a
    shedder refused over 1%), where the share of TTFT misses reaches 1%, linear in rate, when both
    shares are given; else the bracket's geometric middle."""
    rates = []
    for k, slo in ((1, ttft_slo), (2, itl_slo)):
        a, b = lo[k], hi[k]
        by_misses = miss_crossing(lo[0], hi[0], lo[3], hi[3]) if k == 1 and len(lo) > 3 and not math.isfinite(b) \
            else None
        if by_misses is not None:
            rates.append(by_misses)
            continue
        if not math.isfinite(b):
            return math.sqrt(lo[0] * hi[0])
        if b > slo:
            frac = (math.log(slo) - math.log(a)) / (math.log(b) - math.log(a)) if a > 0 and b > a else 0.5
            rates.append(lo[0] + min(max(frac, 0.0), 1.0) * (hi[0] - lo[0]))
    return min(rates) if rates else math.sqrt(lo[0] * hi[0])
