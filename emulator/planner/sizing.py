"""Capacity and fleet size: the max sustainable rate at SLO (C_max), which constraint binds, and how
many workers (and GPUs) a target rate needs.

C_max is the largest rate at which an operating point has no violation (see `operating`). Every
check worsens with rate and improves with workers, so both searches are bisections: on the rate for
C_max, on the worker count for sizing (the smallest count that passes, found by doubling then halving).
Headroom and redundancy are applied explicitly, after the search:
  workers for rate x headroom (burst headroom: the mean rate is what the workload states; bursts
  above it, beyond what its CV already puts in the queueing terms, need spare throughput),
  then + spares per pool (N+k: `redundancy`, or what a target availability needs, see `spares`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from emulator.planner import decode, prefill
from emulator.planner.context import Context
from emulator.planner.errors import PlannerError
from emulator.planner.inputs import Slo
from emulator.planner.operating import CEILINGS, SIZING_RULES, Cluster, OperatingPoint, evaluate

RATE_TOL = 1e-3          # relative precision of C_max
MAX_WORKERS = 100_000    # beyond this a pool size is not a plan but a sign the SLO is out of reach
ORDER = ("ttft_slo", "itl_slo", "e2e_slo", "tenant_limit", "kv_memory", "max_num_seqs") + CEILINGS
# More workers do not lift a tenant's limits: sizing a fleet for a rate leaves them out (a note says so).
NOT_SIZED = ("tenant_limit",)


def max_rate(ctx: Context, slo: Slo | None, cluster: Cluster, only: tuple[str, ...] | None = None,
             side: str | None = None, rules: bool = False) -> float:
    """Largest rate with no violation: of the SLOs and ceilings (C_max), plus the sizing rules when
    `rules`; or only of `only` and the ceilings; with side "prefill" / "decode", only those that pool
    causes. 0 if even a trickle fails."""
    watched: set[str] | None
    if only is not None:
        watched = set(only) | set(CEILINGS)
    else:
        watched = None if rules else set(ORDER) - set(SIZING_RULES)

    def ok(rate: float) -> bool:
        point = evaluate(ctx, cluster, rate, slo)
        if side is None and not point.stable:   # never a rate at which any queue grows without bound
            return False
        found = point.violations if side is None else {"prefill": point.prefill_side,
                                                         "decode": point.decode_side}.get(side, point.violations)
        return not (found if watched is None else [v for v in found if v in watched])

    lo, hi = 0.0, _first_guess(ctx, cluster)
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1e9:
            raise PlannerError("the rate search diverged: no constraint binds (check the inputs)")
    if lo == 0.0 and not ok(hi * 1e-6):
        return 0.0
    lo = max(lo, hi * 1e-6) if lo == 0.0 else lo
    while hi - lo > RATE_TOL * hi:
        mid = math.sqrt(lo * hi) if hi / lo > 4 else 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _first_guess(ctx: Context, cluster: Cluster) -> float:
    """A rate near the throughput ceiling: prefill's full-batch limit, or the decode cap's."""
    share = prefill.profile(ctx, 0).mean_share(ctx)
    step = decode.step_seconds(ctx, ctx.limits.max_num_seqs)
    decode_limit = ctx.limits.max_num_seqs / max(ctx.decode_tokens, 1.0) / step
    if ctx.mode == "colocated":
        return cluster.workers * min(1.0 / share, decode_limit)
    return min(cluster.prefill / share, cluster.decode * decode_limit)


@dataclass(frozen=True)
class Limit:
    constraint: str
    rate: float              # the largest rate this constraint alone allows


def limits(ctx: Context, slo: Slo, cluster: Cluster) -> list[Limit]:
    """The rate each constraint alone allows, tightest first (ceilings grouped as one); a constraint
    that never fails below the throughput ceiling reports the ceiling's rate."""
    groups = [("ttft_slo",), ("itl_slo",), ("kv_memory",), ("max_num_seqs",), CEILINGS]
    if slo.e2e_p99 is not None:
        groups.insert(2, ("e2e_slo",))
    if ctx.req.tenants:
        groups.insert(2, ("tenant_limit",))
    out = []
    for group in groups:
        rate = max_rate(ctx, slo, cluster, only=group)
        name = group[0] if len(group) == 1 else _ceiling_name(ctx, cluster, rate)
        out.append(Limit(name, rate))
    return sorted(out, key=lambda lim: lim.rate)


def _ceiling_name(ctx: Context, cluster: Cluster, rate: float) -> str:
    """Which ceiling the throughput limit is: look just past it."""
    found = evaluate(ctx, cluster, rate * (1 + 4 * RATE_TOL) + 1e-9).violations
    return next((c for c in CEILINGS if c in found), "compute")


def binding(ctx: Context, slo: Slo, cluster: Cluster, rate: float, rules: bool = False) -> str:
    """The constraint that fails first just above `rate`: a ceiling if one is crossed (beyond it every
    latency is infinite, so the SLOs fail with it), else the first SLO or rule in ORDER."""
    found = evaluate(ctx, cluster, rate * (1 + 4 * RATE_TOL) + 1e-9, slo).violations
    order = CEILINGS + tuple(c for c in ORDER if c not in CEILINGS and (rules or c not in SIZING_RULES))
    return next((c for c in order if c in found), "")


def _sized(violations: list[str]) -> list[str]:
    return [v for v in violations if v not in NOT_SIZED]


def smallest_count(ok, start: int = 1) -> int:
    """Smallest n >= start with ok(n), for ok monotone in n (doubling, then bisection)."""
    if ok(start):
        return start
    lo, hi = start, start * 2
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_WORKERS:
            raise PlannerError(f"no pool of up to {MAX_WORKERS} workers meets the SLO")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def per_worker(ctx: Context, slo: Slo) -> dict[str, float]:
    """What one worker of each kind may carry in a plan (SLOs, ceilings and sizing rules): colocated,
    or a prefill worker (TTFT) and a decode worker (ITL, KV memory, sequence cap, link), each with
    the other pool too large to matter."""
    if ctx.mode == "colocated":
        return {"colocated": max_rate(ctx, slo, Cluster(workers=1), rules=True)}
    return {"prefill": max_rate(ctx, slo, Cluster(prefill=1, decode=MAX_WORKERS), side="prefill", rules=True),
            "decode": max_rate(ctx, slo, Cluster(prefill=MAX_WORKERS, decode=1), side="decode", rules=True)}


@dataclass(frozen=True)
class Sizing:
    cluster: Cluster          # the workers that meet the SLO at rate x headroom, spares included
    serving: Cluster          # the same without spares
    rate: float               # the rate sized for (target x headroom)
    point: OperatingPoint     # the serving cluster at the target rate


def size(ctx: Context, slo: Slo, rate: float) -> Sizing:
    """Workers for `rate` (the target, before headroom) meeting every SLO, plus spares."""
    sized = rate * ctx.req.headroom
    if ctx.mode == "colocated":
        n = smallest_count(lambda c: not _sized(evaluate(ctx, Cluster(workers=c), sized, slo).violations))
        serving = Cluster(workers=n)
        spares = Cluster(workers=n + pool_spares(ctx, n))
    else:
        serving = _size_disaggregated(ctx, slo, sized)
        spares = Cluster(prefill=serving.prefill + pool_spares(ctx, serving.prefill),
                         decode=serving.decode + pool_spares(ctx, serving.decode))
    return Sizing(cluster=spares, serving=serving, rate=sized, point=evaluate(ctx, serving, rate, slo))


def pool_spares(ctx: Context, serving: int) -> int:
    """Spare workers for a pool of `serving` workers: `redundancy`, or more where a target availability
    needs more (emulator.planner.spares: N+k from GPU failures and repairs)."""
    req = ctx.req
    if req.availability is None:
        return req.redundancy
    from emulator.planner import spares
    failures = spares.GPU_FAILURES_PER_HOUR if req.gpu_failures_per_hour is None else req.gpu_failures_per_hour
    repair = spares.REPAIR_HOURS if req.repair_hours is None else req.repair_hours
    return max(req.redundancy, spares.spares(serving, req.tp, req.availability, failures, repair))


def _size_disaggregated(ctx: Context, slo: Slo, rate: float) -> Cluster:
    """Decode pool for ITL and memory (its checks do not depend on the prefill pool), then the prefill
    pool for TTFT with the decode pool known (the handoff may count in TTFT), then, while the e2e SLO
    fails, grow whichever pool shortens p99 e2e more."""
    def point(p: int, d: int) -> OperatingPoint:
        return evaluate(ctx, Cluster(prefill=p, decode=d), rate, slo)

    d = smallest_count(lambda n: not point(MAX_WORKERS, n).decode_side)
    p = smallest_count(lambda n: not [v for v in _sized(point(n, d).prefill_side) if v != "e2e_slo"])
    while "e2e_slo" in point(p, d).violations:
        p, d = min(((p + 1, d), (p, d + 1)), key=lambda pd: point(*pd).e2e_p99)
        if p + d > MAX_WORKERS:
            raise PlannerError("no cluster of reasonable size meets the e2e SLO")
    return Cluster(prefill=p, decode=d)
