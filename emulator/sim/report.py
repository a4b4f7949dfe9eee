"""Per-request latency records and the summary every kvlab measurement reports.

The same summary shape comes out of the simulator, the live cluster's load tests and the planner's
predictions, so they can be compared field by field. Latencies are emulated seconds.
"""
from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import msgspec
import numpy as np


class RequestRecord:
    __slots__ = ("arrival", "first", "last", "tokens", "prompt_tokens", "cached_tokens", "host_cached_tokens",
                 "worker", "done", "error")

    def __init__(self, arrival: float, prompt_tokens: int):
        self.arrival = arrival
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.host_cached_tokens = 0   # of cached_tokens, those onboarded from a host KV tier
        self.worker = ""
        self.done = False
        self.error: str | None = None


class Served(NamedTuple):
    """A finished request that produced tokens: arrival, first and last token times, token count."""
    arrival: float
    first: float
    last: float
    tokens: int

    @property
    def ttft(self) -> float:
        return self.first - self.arrival

    @property
    def tpot(self) -> float:
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else 0.0

    def meets(self, ttft_slo: float, itl_slo: float) -> bool:
        return self.ttft <= ttft_slo and self.tpot <= itl_slo


def served(records: Iterable[RequestRecord]) -> list[Served]:
    """The records of finished requests that produced a token."""
    return [Served(r.arrival, r.first, r.last, r.tokens) for r in records
            if r.done and r.first is not None and r.last is not None]


class Percentiles(msgspec.Struct, kw_only=True):
    p50: float
    p90: float
    p99: float
    mean: float


class Summary(msgspec.Struct, kw_only=True):
    requests: int
    completed: int
    rejected: int
    duration_s: float
    throughput_rps: float
    output_tokens_per_s: float
    ttft: Percentiles
    itl: Percentiles           # over every gap between consecutive tokens of a request
    tpot: Percentiles          # per request: (last - first) / (tokens - 1)
    e2e: Percentiles
    goodput_rps: float         # completed requests meeting both the TTFT and the ITL SLO, per second
    slo_attainment: float      # share of all requests meeting the SLO
    prefix_hit_rate: float     # prefix-cache hit tokens / queried tokens, all workers (in a window:
                               # cached / prompt tokens of the requests that arrived in it)
    preemptions: int
    workers: dict[str, dict]
    host_hit_rate: float = 0.0  # the part of prefix_hit_rate onboarded from host memory (host KV tier)
    ttft_miss_share: float = 0.0   # share of all requests refused or with TTFT over the SLO: p99 TTFT
                                   # meets the SLO while this is at most 1%
    fill_s: float = 0.0        # from the run's start until the requests in the system first reach their
                               # mean over the window (LatencyLog.fill_time)


def percentiles(values) -> Percentiles:
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return Percentiles(p50=float("nan"), p90=float("nan"), p99=float("nan"), mean=float("nan"))
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return Percentiles(p50=float(p50), p90=float(p90), p99=float(p99), mean=float(a.mean()))


# LatencyLog.fill_time: "filled" at 90% of the window's mean requests in the system. A window that opens
# d short of the mean N = rate x L (Little) serves d x N fewer than it is sent while it fills: d/10 of a
# 10-lifetime window's arrivals, 1% at d = 10%, a third of the sweep's 3% tolerance.
FILL_SHARE = 0.9
FILL_SAMPLES = 2000


class LatencyLog:
    """Collects token times as they happen; inter-token gaps go to a compact float array."""

    def __init__(self):
        self.records: dict[str, RequestRecord] = {}
        self.gaps = array("f")
        self.gap_arrivals = array("d")   # the arrival of each gap's request, to window the gaps

    def arrive(self, request_id: str, arrival: float, prompt_tokens: int) -> RequestRecord:
        record = RequestRecord(arrival, prompt_tokens)
        self.records[request_id] = record
        return record

    def token(self, request_id: str, time: float) -> None:
        self.tokens(((request_id, 0),), (time,))

    def tokens(self, sampled: Sequence[tuple[str, int]], times: Sequence[float]) -> None:
        """Each (request id, token) at its time, in order (a step's tokens, in one call: the hot path)."""
        records, gaps, gap_arrivals = self.records, self.gaps, self.gap_arrivals
        for (request_id, _token), time in zip(sampled, times, strict=True):
            record = records[request_id]
            last = record.last   # set with `first`, at the first token
            if last is None:
                record.first = time
            else:
                gaps.append(time - last)
                gap_arrivals.append(record.arrival)
            record.last = time
            record.tokens += 1

    def summarize(self, ttft_slo: float, itl_slo: float, window: tuple[float, float] | None = None,
                  **extra) -> Summary:
        """Summary over requests arriving inside `window` (warm-up and drain excluded)."""
        records = [r for r in self.records.values() if window is None or window[0] <= r.arrival < window[1]]
        done = served(records)
        span = (window[1] - window[0]) if window else _span(done)
        ttft = [r.ttft for r in done]
        tpot = [r.tpot for r in done if r.tokens > 1]
        good = [r for r in done if r.meets(ttft_slo, itl_slo)]
        return Summary(
            requests=len(records), completed=len(done), rejected=sum(1 for r in records if r.error),
            duration_s=span, throughput_rps=len(done) / span if span else 0.0,
            output_tokens_per_s=sum(r.tokens for r in done) / span if span else 0.0,
            ttft=percentiles(ttft), itl=percentiles(self._gaps_in(window)),
            tpot=percentiles(tpot), e2e=percentiles([r.last - r.arrival for r in done]),
            goodput_rps=len(good) / span if span else 0.0,
            slo_attainment=len(good) / len(records) if records else 0.0,
            ttft_miss_share=1.0 - sum(1 for t in ttft if t <= ttft_slo) / len(records) if records else 0.0, **extra)


    def fill_time(self, window: tuple[float, float], share: float = FILL_SHARE) -> float:
        """Seconds from the start (an empty cluster) until the requests in the system (arrived, not yet
        finished) first reach `share` of their mean over `window`, sampled FILL_SAMPLES times."""
        done = [r for r in self.records.values() if r.done]
        if not done:
            return 0.0
        arrivals = np.sort([r.arrival for r in done])
        ends = np.sort([r.last for r in done])
        grid = np.linspace(0.0, window[1], FILL_SAMPLES)
        in_system = np.searchsorted(arrivals, grid, side="right") - np.searchsorted(ends, grid, side="right")
        inside = (grid >= window[0]) & (grid < window[1])
        if not inside.any():
            return 0.0
        reached = np.nonzero(in_system >= share * in_system[inside].mean())[0]
        return float(grid[reached[0]]) if reached.size else float(window[0])

    def _gaps_in(self, window: tuple[float, float] | None) -> np.ndarray:
        gaps = np.frombuffer(self.gaps, dtype=np.float32)
        if window is None:
            return gaps
        arrivals = np.frombuffer(self.gap_arrivals, dtype=np.float64)
        return gaps[(arrivals >= window[0]) & (arrivals < window[1])]


def _span(records: list[Served]) -> float:
    if not records:
        return 0.0
    return max(r.last for r in records) - min(r.arrival for r in records)


OVERLOAD_FACTOR = 10.0   # median TTFT over this many SLOs: queueing, not the engine, sets every latency
OVERLOAD_REFUSED = 0.10  # or the router's load shedder refused over 10% of requests


def refused_share(summary: Summary) -> float:
    return summary.rejected / summary.requests if summary.requests else 0.0


def overload_note(ttft_p50_s: float, ttft_slo_s: float, fix: str, refused: float = 0.0) -> str | None:
    """A one-line warning when the median request waits over 10x the TTFT SLO, or over 10% of requests
    were refused (None otherwise).

    At that point requests arrive faster than the cluster serves them: without shedding every latency
    grows with the run's length, so the figures describe the backlog rather than the cluster; with it,
    they describe the requests the shedder let through."""
    if refused > OVERLOAD_REFUSED:
        return (f"note: {refused:.0%} of requests were refused (503: the router's load shedder, the queues full "
                f"for the {ttft_slo_s:g} s TTFT SLO): the workload overloads this cluster; {fix}")
    if not ttft_p50_s > OVERLOAD_FACTOR * ttft_slo_s:   # NaN (nothing finished) is no verdict
        return None
    return (f"note: median TTFT {ttft_p50_s:.1f} s is over {OVERLOAD_FACTOR:g}x the {ttft_slo_s:g} s SLO: the "
            f"workload overloads this cluster and queueing decides every figure; {fix}")
