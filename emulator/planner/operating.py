"""One operating point: a cluster at one arrival rate -> latencies, utilizations, and what fails.

Constraint names (what `violations` and `binding` hold):
  ceilings (no steady state beyond them; latencies are infinite):
    compute / bandwidth   a queue is unstable, named by the roofline bound of the steps that saturate
    kv_link               a decode worker's KV-import link is saturated
    preemption            the mean KV in use reaches the pool: the engine preempts continuously
  SLOs: ttft_slo / itl_slo / e2e_slo, a p99 latency above its target
  tenant_limit          the router refuses more than 1% of requests at the tenants' limits (a refused
                        request misses the SLO: planner.tenant_limits)
  sizing rules (design 3b; they shape the fleet a plan buys, not the rate at which SLOs break):
    kv_memory             more than kv_wait_fraction of arrivals would wait for KV blocks
    max_num_seqs          more than kv_wait_fraction of arrivals would find the sequence cap reached
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgspec

from emulator.planner import (
    colocated,
    conditional,
    decode,
    dist,
    kv_capacity,
    prefill,
    prefill_queue,
    prefix_cache,
    tenant_limits,
)
from emulator.planner.context import Context
from emulator.planner.inputs import Slo
from emulator.planner.latency import Mixture, QueueLaw

CEILINGS = ("compute", "bandwidth", "kv_link", "preemption")
SIZING_RULES = ("kv_memory", "max_num_seqs")


class Cluster(msgspec.Struct, frozen=True, kw_only=True):
    """Worker counts: `workers` for colocated; `prefill` and `decode` for disaggregated."""
    workers: int = 0
    prefill: int = 0
    decode: int = 0

    def gpus(self, tp: int) -> int:
        return (self.workers + self.prefill + self.decode) * tp


@dataclass
class OperatingPoint:
    rate: float
    stable: bool
    ttft_p50: float
    ttft_p99: float
    ttft_mean: float
    itl_p50: float
    itl_p99: float
    itl_mean: float
    e2e_p99: float
    decode_batch: float           # mean running sequences per decode (or colocated) worker
    prefill_utilization: float    # rate x full-batch share per prefill (or colocated) worker
    kv_usage: float               # mean KV pool use per decode (or colocated) worker
    kv_wait_probability: float
    good_share: float             # share of requests meeting TTFT (and e2e) with mean ITL in SLO
    violations: list[str] = field(default_factory=list)
    decode_side: list[str] = field(default_factory=list)  # disaggregated: the violations the decode pool causes

    @property
    def prefill_side(self) -> list[str]:
        return [v for v in self.violations if v not in self.decode_side]


def evaluate(ctx: Context, cluster: Cluster, rate: float, slo: Slo | None = None) -> OperatingPoint:
    """The cluster at `rate`. Memoized per context: the searches for C_max and for each constraint's
    limit start alike and meet the same rates (disagg-70b-h100: 132 evaluations, 43 distinct).
    The point is shared: callers read it and never change it."""
    key = ("operating_point", cluster, rate, slo)
    found = ctx.memo.get(key)
    if found is None:
        found = ctx.memo[key] = _evaluate(ctx, cluster, rate, slo)
    return found


def _evaluate(ctx: Context, cluster: Cluster, rate: float, slo: Slo | None) -> OperatingPoint:
    ctx = at_rate(ctx, cluster, rate)
    if ctx.mode == "colocated":
        return _colocated(ctx, cluster, rate, slo)
    return _disaggregated(ctx, cluster, rate, slo)


def at_rate(ctx: Context, cluster: Cluster, rate: float) -> Context:
    """The context the laws read at this rate: with the prefix hits the LRU keeps, where the workload
    names its prefixes; else `ctx` itself."""
    if ctx.workload.prefix_groups is not None and rate > 0:
        return _with_prefix_cache(ctx, cluster, rate)
    return ctx


def _with_prefix_cache(ctx: Context, cluster: Cluster, rate: float) -> Context:
    """The context whose cached tokens are what the LRU prefix cache keeps at this rate, on the
    workers that prefill: the running requests' own blocks come from the point with every prefix
    cached (emulator.planner.prefix_cache)."""
    key = ("prefix_cache", cluster, rate)
    found = ctx.memo.get(key)
    if found is None:
        if ctx.mode == "colocated":
            p = colocated.evaluate(ctx, rate, cluster.workers)
            held = min(kv_capacity.state(ctx, p.batch, colocated.mean_prefilling(ctx, p)).usage, 1.0) * ctx.pool_tokens
            workers = cluster.workers
        else:   # prefill workers hold only the prompts they are prefilling
            held, workers = 0.0, cluster.prefill
        found = ctx.memo[key] = prefix_cache.at_rate(ctx, rate, workers, held)
    return found


def _colocated(ctx: Context, cluster: Cluster, rate: float, slo: Slo | None) -> OperatingPoint:
    key = ("colocated", cluster, rate)   # the laws do not depend on the SLO: one set for every slo
    found = ctx.memo.get(key)
    if found is None:
        found = ctx.memo[key] = _colocated_laws(ctx, cluster, rate)
    p, gaps, kv, e2e_shift, slot_wait = found
    stable = p.stable and slot_wait is not None
    ttft, e2e = _laws(p.queue, slot_wait, e2e_shift)
    point = _assemble(ctx, slo, rate, stable, p.queue, ttft, e2e, gaps, p.itl_mean, p.batch, kv)
    if not p.stable:
        point.violations.append(p.limit)
    elif slot_wait is None:
        point.violations.append("max_num_seqs")
    return point


def _colocated_laws(ctx: Context, cluster: Cluster, rate: float):
    p = colocated.evaluate(ctx, rate, cluster.workers)
    gaps = colocated.gaps(ctx, p)
    kv = kv_capacity.state(ctx, p.batch, colocated.mean_prefilling(ctx, p))
    e2e_shift = dist.Points((ctx.outputs.values - 1.0) * p.itl_mean, ctx.outputs.weights)
    slot_wait = colocated.slot_wait(ctx, rate, cluster.workers) if p.stable else None
    return p, gaps, kv, e2e_shift, slot_wait


def _disaggregated(ctx: Context, cluster: Cluster, rate: float, slo: Slo | None) -> OperatingPoint:
    split = conditional.split(ctx)
    if split is not None:
        return _conditional(ctx, cluster, rate, slo, split)
    pq = prefill_queue.queue(ctx, prefill.profile(ctx, 0), rate, cluster.prefill)
    dp = decode.disaggregated(ctx, rate / cluster.decode)
    gaps = decode.disaggregated_gaps(ctx, dp)
    ttft, e2e = _laws(pq, *_remote_shifts(ctx, dp))
    kv = kv_capacity.state(ctx, dp.batch, _landing_tokens(ctx, dp, dp.rate))
    point = _assemble(ctx, slo, rate, pq.stable and dp.stable, pq, ttft, e2e, gaps, dp.itl_mean, dp.batch, kv)
    _prefill_ceiling(ctx, pq, point)
    return _decode_side(point, dp, [])


def _conditional(ctx: Context, cluster: Cluster, rate: float, slo: Slo | None,
                 split: conditional.Split) -> OperatingPoint:
    """Conditional disaggregation: the local share prefills on its decode worker, in that worker's mixed
    steps, and its first token comes from there; the remote share as without it, on the prefill pool."""
    remote = split.remote_ctx
    pq = prefill_queue.queue(remote, prefill.profile(remote, 0), rate * (1.0 - split.local), cluster.prefill)
    dw = conditional.decode_worker(ctx, split, rate, cluster.decode)
    p, dp = dw.point, dw.pool
    stable = pq.stable and dp.stable and dw.slot_wait is not None
    if stable:
        local_ttft, local_e2e = _laws(p.queue, dw.slot_wait,
                                      dist.Points((ctx.outputs.values - 1.0) * p.itl_mean, ctx.outputs.weights))
        remote_ttft, remote_e2e = _laws(pq, *_remote_shifts(ctx, dp))
        gaps = conditional.gaps(ctx, split, dw)
    else:       # no steady state: the point reads no law (and the decode times may be infinite)
        local_ttft = local_e2e = QueueLaw(p.queue)
        remote_ttft = remote_e2e = QueueLaw(pq)
        gaps = dist.Points.fixed(math.inf)
    ttft = Mixture(((split.local, local_ttft), (1.0 - split.local, remote_ttft)))
    e2e = Mixture(((split.local, local_e2e), (1.0 - split.local, remote_e2e)))
    held = _landing_tokens(remote, dp, dp.rate * (1.0 - split.local)) + colocated.mean_prefilling(ctx, p)
    kv = kv_capacity.state(ctx, dp.batch, held)
    point = _assemble(ctx, slo, rate, stable, pq, ttft, e2e, gaps, dp.itl_mean, dp.batch, kv)
    _prefill_ceiling(remote, pq, point)
    extra = []
    if not p.stable:
        extra.append(p.limit)            # the local prefills and the decodes overload the decode worker
    elif dw.slot_wait is None:
        extra.append("max_num_seqs")
    # the local share alone puts over 1% of all requests past the TTFT SLO: more prefill workers
    # cannot help, more decode workers do
    if slo is not None and "ttft_slo" in point.violations and \
            split.local * (1.0 - local_ttft.cdf(slo.ttft_p99)) > 0.01:
        extra.append("ttft_slo")
    return _decode_side(point, dp, extra)


def _laws(pq: prefill_queue.PrefillQueue, ttft_shift: dist.Points | None,
          e2e_shift: dist.Points) -> tuple[QueueLaw, QueueLaw]:
    """TTFT and e2e laws of requests prefilled in `pq`: e2e adds the time after the first token."""
    e2e_base = dist.outer_sum(ttft_shift, e2e_shift) if ttft_shift is not None else e2e_shift
    return QueueLaw(pq, ttft_shift), QueueLaw(pq, e2e_base)


def _remote_shifts(ctx: Context, dp: decode.DecodePool) -> tuple[dist.Points | None, dist.Points]:
    """(TTFT shift, time after the first token) of a request prefilled on the prefill pool: the KV
    handoff lands in TTFT or in the first inter-token gap."""
    handoff = decode.first_gap(ctx, dp)  # prefill's first token -> decode's first token
    if ctx.req.first_token_after_transfer:
        ttft_shift, rest = handoff, ctx.outputs.values - 1.0
    else:
        ttft_shift, rest = None, ctx.outputs.values - 2.0
    e2e = dist.Points(dp.itl_mean * rest.clip(0, None), ctx.outputs.weights)
    return ttft_shift, e2e if ttft_shift is not None else dist.outer_sum(handoff, e2e)


def _prefill_ceiling(ctx: Context, pq: prefill_queue.PrefillQueue, point: OperatingPoint) -> None:
    if not pq.stable:
        point.violations.append("compute" if prefill.profile(ctx, 0).full_step.bound == "compute" else "bandwidth")


def _decode_side(point: OperatingPoint, dp: decode.DecodePool, extra: list[str]) -> OperatingPoint:
    """Mark the violations the decode pool causes (more decode workers fix them)."""
    decode_side = [v for v in point.violations if v in ("kv_memory", "max_num_seqs", "preemption", "itl_slo")]
    decode_side += [v for v in extra if v not in decode_side]
    if dp.link_rho >= 1:
        decode_side.append("kv_link")
    elif not dp.stable and not extra:
        decode_side.append("compute" if dp.bound == "compute" else "bandwidth")
    point.violations += [v for v in decode_side if v not in point.violations]
    point.decode_side = decode_side
    return point


def _landing_tokens(ctx: Context, dp: decode.DecodePool, rate: float) -> float:
    """Blocks a decode worker holds for KV still crossing the link (Little's law: rate x time x prompt),
    `rate` the worker's arrivals whose KV is shipped (those of `ctx`'s prompt points)."""
    if not dp.stable:
        return 0.0
    return rate * (dp.link_wait + dp.transfers.mean()) * float(ctx.new_tokens @ ctx.prompts.weights)


def _assemble(ctx, slo, rate, stable, pq, ttft, e2e, gaps, itl_mean, batch, kv) -> OperatingPoint:
    """The point from its laws: `pq` the prefill queue whose load it reports, `ttft` and `e2e` the
    latency laws (latency.QueueLaw or a Mixture of request classes)."""
    inf = math.inf
    thrashing = kv.usage >= 1.0
    ok = stable and pq.stable and not thrashing
    point = OperatingPoint(
        rate=rate, stable=ok,
        ttft_p50=ttft.quantile(0.50) if ok else inf,
        ttft_p99=ttft.quantile(0.99) if ok else inf,
        ttft_mean=ttft.mean() if ok else inf,
        itl_p50=gaps.quantile(0.50) if ok else inf,
        itl_p99=gaps.quantile(0.99) if ok else inf,
        itl_mean=itl_mean if ok else inf,
        e2e_p99=e2e.quantile(0.99) if ok else inf,
        decode_batch=batch, prefill_utilization=pq.rho, kv_usage=kv.usage,
        kv_wait_probability=kv.wait_probability, good_share=0.0)
    if thrashing:
        point.violations.append("preemption")
    if not kv.ok(ctx):
        point.violations.append("kv_memory")
    if kv_capacity.seq_cap_probability(ctx, batch) > ctx.req.kv_wait_fraction:
        point.violations.append("max_num_seqs")
    if slo is not None:
        _check_slo(point, slo)
        if ctx.req.tenants and refused_share(ctx, point) > tenant_limits.REFUSED_LIMIT:
            point.violations.append("tenant_limit")
        point.good_share = _good_share(point, slo, ttft, e2e)
    return point


def refused_share(ctx: Context, point: OperatingPoint) -> float:
    """The share of arrivals the tenants' limits refuse at the point (each holds a slot for its mean
    lifetime; 1 where the point has no steady state)."""
    if not point.stable:
        return 1.0
    lifetime = point.ttft_mean + ctx.decode_tokens * point.itl_mean
    tokens = ctx.prompts.mean() + ctx.outputs.mean()
    return tenant_limits.refused_share(ctx.req.tenants, point.rate, lifetime, tokens)


def _check_slo(point: OperatingPoint, slo: Slo) -> None:
    checks = [("ttft_slo", point.ttft_p99, slo.ttft_p99), ("itl_slo", point.itl_p99, slo.itl_p99),
              ("e2e_slo", point.e2e_p99, slo.e2e_p99)]
    for name, value, limit in checks:
        if limit is not None and not value <= limit:
            point.violations.append(name)


def _good_share(point: OperatingPoint, slo: Slo, ttft, e2e) -> float:
    """Requests with TTFT (and e2e) within SLO and a mean ITL (TPOT) within the ITL SLO.

    TTFT and e2e share the same wait, so the two events are taken as nested (the smaller share);
    a request's TPOT averages its many gaps, so it passes when the mean ITL does.
    """
    if not point.stable or point.itl_mean > slo.itl_p99:
        return 0.0
    share = ttft.cdf(slo.ttft_p99)
    if slo.e2e_p99 is not None:
        share = min(share, e2e.cdf(slo.e2e_p99))
    return share
