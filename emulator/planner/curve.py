"""The predicted latency-throughput curve of a given cluster: one point per offered rate."""
from __future__ import annotations

import math

import msgspec

from emulator.planner import sizing
from emulator.planner.context import Context
from emulator.planner.inputs import Slo
from emulator.planner.operating import CEILINGS, Cluster, OperatingPoint, evaluate

DEFAULT_POINTS = 16


class CurvePoint(msgspec.Struct, frozen=True, kw_only=True):
    rate: float                  # offered requests/s
    throughput: float            # served requests/s (the ceiling once overloaded)
    output_tokens_per_s: float
    goodput: float               # requests/s meeting the SLOs
    ttft_p50: float              # seconds; inf once overloaded (JSON: null)
    ttft_p99: float
    ttft_mean: float             # what Little's law takes
    itl_p50: float
    itl_p99: float
    itl_mean: float
    e2e_p99: float
    decode_batch: float          # per decode (or colocated) worker
    prefill_utilization: float   # per prefill (or colocated) worker, full-batch share
    kv_usage: float              # mean share of a worker's KV pool in use
    stable: bool
    violations: list[str]


class Curve(msgspec.Struct, frozen=True, kw_only=True):
    cluster: Cluster
    saturation_rate: float       # the throughput ceiling (requests/s)
    max_rate: float              # C_max: the largest rate meeting the SLOs
    points: list[CurvePoint]


def point(ctx: Context, op: OperatingPoint, saturation: float) -> CurvePoint:
    served = op.rate if op.stable else min(op.rate, saturation)
    f = float  # plain floats: numpy scalars do not encode to JSON
    return CurvePoint(rate=f(op.rate), throughput=f(served), output_tokens_per_s=f(served * ctx.outputs.mean()),
                      goodput=f(served * op.good_share), ttft_p50=f(op.ttft_p50), ttft_p99=f(op.ttft_p99),
                      ttft_mean=f(op.ttft_mean), itl_p50=f(op.itl_p50), itl_p99=f(op.itl_p99),
                      itl_mean=f(op.itl_mean), e2e_p99=f(op.e2e_p99),
                      decode_batch=f(op.decode_batch), prefill_utilization=f(op.prefill_utilization),
                      kv_usage=f(op.kv_usage), stable=bool(op.stable), violations=list(op.violations))


def curve(ctx: Context, slo: Slo, cluster: Cluster, rates: list[float] | None = None) -> Curve:
    saturation = sizing.max_rate(ctx, None, cluster, only=CEILINGS)
    best = sizing.max_rate(ctx, slo, cluster)
    if rates is None:
        rates = default_rates(saturation, best)
    points = [point(ctx, evaluate(ctx, cluster, r, slo), saturation) for r in rates]
    return Curve(cluster=cluster, saturation_rate=saturation, max_rate=best, points=points)


def default_rates(saturation: float, best: float, n: int = DEFAULT_POINTS) -> list[float]:
    """From 5% to 110% of the ceiling, with C_max itself included."""
    top = saturation * 1.1 if math.isfinite(saturation) and saturation > 0 else max(best, 1.0) * 2
    rates = [top * (i + 1) / n for i in range(n)]
    return sorted(set([round(r, 6) for r in rates] + ([round(best, 6)] if best > 0 else [])))
