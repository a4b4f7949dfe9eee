"""Planner vs simulator: the max sustainable rate at SLO (C_max) from both, on one spec and workload.

The simulator is stepped at rates around the planner's C_max (open-loop Poisson, thousands of
requests per point, warm-up excluded, as the design asks) and its C_max is where p99 TTFT (a refused
request counting as a miss) or p99 ITL first crosses the SLO. Both sides read the same spec: a gap is
a gap in the model, not the inputs.
"""
from __future__ import annotations

import msgspec

from emulator.spec import ClusterSpec
from loadtests import analysis, parallel_runs, planner_bridge, sim_curve

RATE_FACTORS = (0.5, 0.7, 0.85, 1.0, 1.15, 1.3)   # x planner C_max: brackets a +-15% disagreement


class CapacityCheck(msgspec.Struct, kw_only=True):
    spec: str
    planner_c_max: float
    sim_c_max: float | None
    sim_bound: str            # "interpolated", "at_least" (never crossed) or "below" (crossed at once)
    gap: float | None         # planner / sim - 1
    rates: list[float]
    sim_ttft_p99: list[float]
    sim_itl_p99: list[float]


def check(spec: ClusterSpec, min_requests: int = sim_curve.MIN_REQUESTS,
          factors: tuple[float, ...] = RATE_FACTORS, steady: bool = False) -> CapacityCheck:
    """`steady`: each rate in its steady state (sim_curve.steady: a warm-up and a window in request
    lifetimes), not a fixed count of requests after the spec's warm-up. A disaggregated decode pool
    fills its sequence slots over minutes: 2,000 requests after 30 s at 82 req/s on disagg-70b-h100
    met the SLOs (TTFT p99 0.94 s) where the steady state missed them from 74 req/s (5.5 s, before the
    simulator shed load)."""
    planned = planner_bridge.predict(spec, [1.0])
    if planned.c_max is None:
        raise ValueError(f"no planner C_max for {spec.name}: {planned.error}")
    rates = [planned.c_max * f for f in factors]
    run = sim_curve.steady if steady else sim_curve.simulate
    points = parallel_runs.run_all(run, [(spec, r, min_requests) for r in rates])   # side by side on the cores
    ttft = [analysis.summary_ttft_p99_with_failures(p) for p in points]   # refusals are misses, as in the sweep
    itl = [p.itl.p99 for p in points]
    misses = [p.ttft_miss_share for p in points]   # where a shedder refuses: the crossing of 1% misses
    cap = analysis.c_max(rates, ttft, itl, spec.slo.ttft_p99_s, spec.slo.itl_p99_s, misses)
    gap = planned.c_max / cap.rate - 1 if cap.rate and cap.bound == "interpolated" else None
    return CapacityCheck(spec=spec.name, planner_c_max=planned.c_max, sim_c_max=cap.rate, sim_bound=cap.bound,
                         gap=gap, rates=rates, sim_ttft_p99=ttft, sim_itl_p99=itl)
