"""The same spec and workload through the discrete-event simulator, two ways.

The simulator runs the live cluster's engine and routing policy on a virtual clock. `schedule` replays
the very requests the live sweep sends, stage for stage: what the measurement should read, short
stages and all, without a host's noise or lag. `curve` runs each rate alone for thousands of requests:
the steady state the planner models. The gap between the two is what the short stages cost.
"""
from __future__ import annotations

from collections.abc import Sequence

from emulator import workload
from emulator.sim.report import Summary, served
from emulator.sim.simulator import Simulator
from emulator.spec import ClusterSpec

MIN_REQUESTS = 2000   # per rate: p99s from fewer requests are too noisy to compare (design 3b)


def simulate(spec: ClusterSpec, rate: float, min_requests: int = MIN_REQUESTS) -> Summary:
    """One rate: the spec's warm-up, then `min_requests` measured arrivals (never more than duration_s)."""
    w = spec.workload
    duration = min(w.warmup_s + w.duration_s, w.warmup_s + min_requests / rate)
    requests = workload.from_spec(spec, rate, duration_s=duration)
    sim = Simulator(spec).run(requests)
    return sim.summary(window=(w.warmup_s, duration))


def curve(spec: ClusterSpec, rates: list[float], min_requests: int = MIN_REQUESTS, on_point=None) -> list[Summary]:
    out = []
    for rate in rates:
        out.append(simulate(spec, rate, min_requests))
        if on_point is not None:
            on_point(rate, out[-1])
    return out


def schedule(spec: ClusterSpec, items: Sequence[tuple[float, object, int]], windows,
             time_scale: float) -> list[Summary]:
    """The live sweep's own requests (schedule.spec_requests) through the simulator, summarized over the
    same measurement windows (wall offsets / time_scale = emulated seconds)."""
    sim = Simulator(spec).run([request for _, request, _ in items])
    out = []
    for w in windows:
        start, end = w.start_s / time_scale, w.end_s / time_scale
        summary = sim.summary(window=(start, end))
        finished = [r for r in served(sim.log.records.values()) if start <= r.last < end]
        # Finished inside the window, as the live measurement counts them (analysis.summarize).
        slo = spec.slo
        good = [r for r in finished if r.meets(slo.ttft_p99_s, slo.itl_p99_s)]
        summary.throughput_rps = len(finished) / (end - start)
        summary.goodput_rps = len(good) / (end - start)
        summary.output_tokens_per_s = sum(r.tokens for r in finished) / (end - start)
        out.append(summary)
    return out
