"""From raw request records to per-rate summaries, the knee and C_max. Pure: plain data in and out.

Latencies are reported in the server's time: a wall-clock measurement divided by the cluster's time
scale, so measured, simulated and planned numbers share units (emulated seconds and requests/s).
A stage's latencies cover the requests *sent* inside its measurement window (after its warm-up), each
followed to its end, as emulator.sim.report windows requests by arrival. Throughput and goodput are
different: requests *finished* inside the window per second (goodput: those that met the SLO), which
saturate at the cluster's capacity however long the queue grows (counting finished arrivals instead
would credit every queued request once it is finally served).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emulator.sim.report import Percentiles, Summary, percentiles


@dataclass(frozen=True)
class Window:
    stage: int
    rate: float          # offered requests per emulated second
    start_s: float       # wall offsets from the run's start
    end_s: float


def windows(stages: Sequence[tuple[float, float]], warmup_s: float) -> list[Window]:
    """Measurement windows of (rate, wall seconds) stages: each stage minus its first warmup_s."""
    out, t = [], 0.0
    for i, (rate, length) in enumerate(stages):
        out.append(Window(i, rate, t + min(warmup_s, length * 0.9), t + length))
        t += length
    return out


def summarize(records: Sequence[dict], window: Window, time_scale: float, ttft_slo: float,
              itl_slo: float) -> Summary:
    """A sim_report.Summary for one window (latencies in emulated seconds, rates per emulated second)."""
    rows = [r for r in records if window.start_s <= r["sched"] < window.end_s]
    done = [r for r in rows if r.get("error") is None and r.get("ttft") is not None]
    span = (window.end_s - window.start_s) / time_scale
    scale = 1.0 / time_scale
    gaps: np.ndarray | list[float] = (np.concatenate([np.asarray(r["gaps"], dtype=float) for r in done]) * scale
                                      if done else [])
    finished = [r for r in records if r.get("error") is None and r.get("e2e") is not None and not r.get("unfinished")
                and window.start_s <= _end(r) < window.end_s]
    hits = [r["cached_tokens"] for r in done if r.get("cached_tokens") is not None]
    prompts = [r["prompt_tokens"] for r in done if r.get("cached_tokens") is not None]
    return Summary(
        requests=len(rows), completed=len(done), rejected=sum(1 for r in rows if r.get("error")), duration_s=span,
        throughput_rps=len(finished) / span, output_tokens_per_s=sum(r["tokens"] for r in finished) / span,
        ttft=percentiles([r["ttft"] * scale for r in done]), itl=percentiles(gaps),
        tpot=percentiles([_tpot(r) * scale for r in done]),
        e2e=percentiles([r["e2e"] * scale for r in done if r.get("e2e") is not None]),
        goodput_rps=sum(_good(r, scale, ttft_slo, itl_slo) for r in finished) / span,
        slo_attainment=sum(_good(r, scale, ttft_slo, itl_slo) for r in done) / len(rows) if rows else 0.0,
        # The server's own count of cached prompt tokens (usage.prompt_tokens_details); the sweep
        # replaces it with the workers' counters when it can read them.
        prefix_hit_rate=sum(hits) / sum(prompts) if prompts else float("nan"),
        preemptions=0, workers={})


def _good(r: dict, scale: float, ttft_slo: float, itl_slo: float) -> bool:
    """Met both SLOs: TTFT, and its mean inter-token gap (TPOT) against the ITL target (as sim_report)."""
    return r["ttft"] * scale <= ttft_slo and _tpot(r) * scale <= itl_slo


def _end(record: dict) -> float:
    """Wall offset at which a request finished: scheduled + sent late by `lag` + its e2e."""
    return record["sched"] + record.get("lag", 0.0) + record["e2e"]


def _tpot(record: dict) -> float:
    gaps = record["gaps"]
    return float(np.mean(gaps)) if gaps else 0.0


def client_lag_p99(records: Sequence[dict], window: Window) -> float:
    """How late the load generator sent its requests (wall s): a busy client distorts the load too."""
    lags = [r.get("lag", 0.0) for r in records if window.start_s <= r["sched"] < window.end_s]
    return float(np.percentile(lags, 99)) if lags else 0.0


# -- capacity ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Capacity:
    """The highest rate meeting both p99 SLOs; `bound` says how it was found."""
    rate: float | None
    bound: str            # "interpolated", "bracket" (somewhere in [rate, upper]), "at_least" (every rate
                          # met the SLO), "below" (none did), "none"
    limited_by: str = ""  # "ttft" or "itl": the metric that crossed first
    upper: float | None = None   # "bracket": the first rate that missed the SLO

    def describe(self) -> str:
        if self.rate is None:
            return "n/a"
        if self.bound == "bracket":
            return f"{self.rate:.3g}-{self.upper:.3g}"
        prefix = {"at_least": ">= ", "below": "< "}.get(self.bound, "")
        return f"{prefix}{self.rate:.3g}"


def c_max(rates: Sequence[float], ttft_p99: Sequence[float], itl_p99: Sequence[float],
          ttft_slo: float, itl_slo: float, ttft_misses: Sequence[float] | None = None) -> Capacity:
    """Where p99 TTFT or p99 ITL first crosses its SLO, interpolated between the two rates around it.

    Latency grows roughly exponentially near the knee, so the crossing is interpolated linearly in
    log(latency) against rate; the smaller crossing of the two metrics wins. Where a load shedder
    refuses over 1% at the upper rate its p99 TTFT is infinite; given each rate's share of TTFT misses
    (refused, or over the SLO), the crossing is where that share reaches 1%, linear in rate.
    """
    misses = list(ttft_misses) if ttft_misses is not None else [math.nan] * len(rates)
    points = sorted(zip(rates, ttft_p99, itl_p99, misses, strict=True))
    if not points:
        return Capacity(None, "none")
    meets = [_meets(t, i, ttft_slo, itl_slo) for _, t, i, _ in points]
    if not meets[0]:
        return Capacity(points[0][0], "below", _culprit(points[0], ttft_slo, itl_slo))
    for k in range(len(points) - 1):
        if not meets[k + 1]:
            return _crossing(points[k], points[k + 1], ttft_slo, itl_slo)
    return Capacity(points[-1][0], "at_least")


MISS_SHARE = 0.01   # a p99 meets its SLO while at most 1% of requests miss it


def miss_crossing(lo_rate: float, hi_rate: float, lo_miss: float, hi_miss: float) -> float | None:
    """The rate where the share of TTFT misses (refused, or over the SLO) reaches 1%, linear in rate
    between a rate below it and one above; None when the shares do not bracket it (or are unknown).
    Where a load shedder refuses over 1%, p99 TTFT is infinite and has no slope to follow; this does."""
    if not (math.isfinite(lo_miss) and hi_miss > max(lo_miss, MISS_SHARE)):
        return None
    frac = min(max((MISS_SHARE - lo_miss) / (hi_miss - lo_miss), 0.0), 1.0)
    return lo_rate + frac * (hi_rate - lo_rate)


def _meets(ttft: float, itl: float, ttft_slo: float, itl_slo: float) -> bool:
    return bool(np.isfinite(ttft) and np.isfinite(itl) and ttft <= ttft_slo and itl <= itl_slo)


def _culprit(point, ttft_slo: float, itl_slo: float) -> str:
    _, t, i, *_ = point
    return "ttft" if not (np.isfinite(t) and t <= ttft_slo) else "itl"


def _crossing(lo, hi, ttft_slo: float, itl_slo: float) -> Capacity:
    candidates = []
    for name, index, slo in (("ttft", 1, ttft_slo), ("itl", 2, itl_slo)):
        a, b = lo[index], hi[index]
        by_misses = miss_crossing(lo[0], hi[0], lo[3], hi[3]) if name == "ttft" and not np.isfinite(b) else None
        if by_misses is not None:
            candidates.append((by_misses, name))
            continue
        if not np.isfinite(b):
            # Too many requests failed at `hi` for a p99: no slope to follow, only the bracket is known.
            return Capacity(lo[0], "bracket", name, upper=hi[0])
        if b > slo:
            candidates.append((_log_interp(lo[0], hi[0], a, b, slo), name))
    rate, name = min(candidates)
    return Capacity(rate, "interpolated", name)


def _log_interp(r0: float, r1: float, y0: float, y1: float, target: float) -> float:
    """The rate between r0 and r1 where a latency going from y0 (<= target) to y1 (> target) hits target."""
    if y0 > 0:
        frac = (math.log(target) - math.log(y0)) / (math.log(y1) - math.log(y0))
    else:
        frac = (target - y0) / (y1 - y0)
    return r0 + min(max(frac, 0.0), 1.0) * (r1 - r0)


def knee(rates: Sequence[float], ttft_p99: Sequence[float], factor: float = 2.0) -> float | None:
    """The rate where p99 TTFT reaches `factor` x its value at the lowest rate (the curve turns up).

    A simple, reproducible definition: below the knee the cluster has spare capacity and TTFT is
    prefill time; past it requests queue and TTFT climbs steeply. None if it never doubles.
    """
    points = sorted((r, t) for r, t in zip(rates, ttft_p99, strict=True) if np.isfinite(t))
    if len(points) < 2 or points[0][1] <= 0:
        return None
    threshold = factor * points[0][1]
    for (r0, t0), (r1, t1) in zip(points, points[1:], strict=False):
        if t1 >= threshold:
            return _log_interp(r0, r1, t0, t1, threshold)
    return None


def gap_percent(measured: float | None, planned: float | None) -> float | None:
    """(measured - planned) / planned, in percent."""
    if measured is None or planned is None or planned == 0:
        return None
    return 100.0 * (measured - planned) / planned


def nan_percentiles() -> Percentiles:
    return percentiles([])


def ttft_p99_with_failures(records: Sequence[dict], window: Window, time_scale: float, missing: int = 0) -> float:
    """p99 TTFT where a rejected or failed request counts as an infinite TTFT.

    A cluster that sheds load keeps the TTFT of the requests it does serve low; for capacity, a request
    turned away has missed its SLO, so it must count against the percentile. A request cut short by
    the end of the run before its first token counts with the time it had waited (a lower bound);
    `missing` requests, never recorded at all, count as infinite.
    """
    values = ttfts_with_failures(records, window, time_scale) + [math.inf] * missing
    # "higher": no interpolation between a finite TTFT and an infinite one (inf - x is NaN)
    return float(np.percentile(values, 99, method="higher")) if values else float("nan")


def ttfts_with_failures(records: Sequence[dict], window: Window, time_scale: float) -> list[float]:
    """Emulated TTFTs of the requests sent in the window, a failed one infinite, a cut-short one its wait."""
    return [_ttft_or_bound(r) / time_scale for r in records if window.start_s <= r["sched"] < window.end_s]


def _ttft_or_bound(r: dict) -> float:
    if r.get("error") is not None:
        return math.inf
    if r.get("ttft") is not None:
        return r["ttft"]
    return r.get("waited", math.inf)


def summary_ttft_p99_with_failures(summary: Summary) -> float:
    """The same for a simulated Summary (no raw records): infinite once more than 1% failed."""
    failed = summary.requests - summary.completed
    if summary.requests and failed / summary.requests > 0.01:
        return math.inf
    return summary.ttft.p99
