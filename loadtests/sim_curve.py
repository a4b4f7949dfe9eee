"""The same spec and workload through the discrete-event simulator, two ways.

The simulator runs the live cluster's engine and routing policy on a virtual clock. `schedule` replays
the very requests the live sweep sends, stage for stage: what the measurement should read, short
stages and all, without a host's noise or lag. `curve` runs each rate alone for thousands of requests,
and `steady` for as many request lifetimes as a steady state needs: the state the planner models.
The gap between the two is what the short stages cost.
"""
from __future__ import annotations

from collections.abc import Sequence

from emulator import workload
from emulator.sim.report import Summary, served
from emulator.sim.simulator import Simulator
from emulator.spec import ClusterSpec
from loadtests import parallel_runs

MIN_REQUESTS = 2000   # per rate: p99s from fewer requests are too noisy to compare (design 3b)


STEADY_WARMUP_LIFETIMES = 10.0   # a steady state: the running batch forgets its start many times over
STEADY_WINDOW_LIFETIMES = 30.0   # (near the knee the batch relaxes over two to three lifetimes)


def simulate(spec: ClusterSpec, rate: float, min_requests: int = MIN_REQUESTS) -> Summary:
    """One rate: the spec's warm-up, then `min_requests` measured arrivals (never more than duration_s)."""
    w = spec.workload
    duration = min(w.warmup_s + w.duration_s, w.warmup_s + min_requests / rate)
    return _run(spec, rate, w.warmup_s, duration)


def steady(spec: ClusterSpec, rate: float, min_requests: int = MIN_REQUESTS) -> Summary:
    """One rate in its steady state: a first run of `min_requests` gives the mean lifetime L; then a
    warm-up of STEADY_WARMUP_LIFETIMES L and a window of STEADY_WINDOW_LIFETIMES L (at least the first
    run's). A fixed request count at a high rate can end before a slowly filling pool does: the
    disaggregated 70B spec's decode slots fill only ~80 s into a run at 77.8 req/s, after which its
    queue grows without bound, while 2,000 requests span 40 s."""
    w = spec.workload
    first_window = min(w.duration_s, min_requests / rate)
    first = _run(spec, rate, w.warmup_s, w.warmup_s + first_window)
    lifetime = first.e2e.mean if first.e2e.mean == first.e2e.mean else 0.0   # NaN: nothing finished
    warmup = max(w.warmup_s, STEADY_WARMUP_LIFETIMES * lifetime)
    window = max(first_window, STEADY_WINDOW_LIFETIMES * lifetime)
    if warmup <= w.warmup_s and window <= first_window:
        return first
    return _run(spec, rate, warmup, warmup + window)


def _run(spec: ClusterSpec, rate: float, warmup: float, end: float) -> Summary:
    requests = workload.from_spec(spec, rate, duration_s=end)
    sim = Simulator(spec).run(requests)
    summary = sim.summary(window=(warmup, end))
    summary.fill_s = sim.log.fill_time((warmup, end))
    return summary


def curve(spec: ClusterSpec, rates: list[float], min_requests: int = MIN_REQUESTS, on_point=None) -> list[Summary]:
    """`simulate` at each rate, the rates run side by side on the host's cores (loadtests.parallel_runs);
    `on_point` hears of each point in order."""
    out = parallel_runs.run_all(simulate, [(spec, rate, min_requests) for rate in rates])
    if on_point is not None:
        for rate, point in zip(rates, out, strict=True):
            on_point(rate, point)
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
