"""The planner's entry points: capacity (C_max), curve, and plan (fleet size and cost).

Each takes names and numbers (PlanRequest, Workload, Slo) and returns msgspec Structs, so results
encode to JSON as they are. Infeasible inputs raise PlannerError with the reason.
"""
from __future__ import annotations

import msgspec

from emulator.physics import roofline
from emulator.physics.catalog import Catalog
from emulator.planner import conditional, context, cost, decode, operating, prefill, sizing, tenant_limits
from emulator.planner import curve as curves
from emulator.planner.errors import PlannerError
from emulator.planner.inputs import PlanRequest, Slo, Workload
from emulator.planner.operating import Cluster, evaluate


class Limit(msgspec.Struct, frozen=True, kw_only=True):
    constraint: str
    rate: float


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    cluster: Cluster
    gpus: int
    max_rate: float              # C_max: the largest rate (requests/s) meeting every SLO, below every ceiling
    planned_rate: float          # the largest rate that also keeps the sizing rules (1% KV / slot waits)
    usable_rate: float           # planned_rate / headroom: what a plan loads it with
    concurrency: float           # requests in flight at max_rate (Little's law: rate x mean e2e)
    binding: str                 # the constraint that fails first above max_rate
    resource: str                # the roofline ceiling behind it: compute or bandwidth (or kv_memory...)
    limits: list[Limit]          # the rate each constraint alone allows, tightest first
    at_max: curves.CurvePoint
    notes: list[str] = []        # what the model assumes about this cluster (e.g. conditional disaggregation)


class PoolPlan(msgspec.Struct, frozen=True, kw_only=True):
    role: str                    # "colocated", "prefill" or "decode"
    workers: int                 # spares included
    spares: int
    gpus: int
    max_rate_per_worker: float   # C_max of one worker of this pool
    usable_rate_per_worker: float
    binding: str


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    gpu: str
    tp: int
    mode: str
    target_rate: float
    sized_rate: float            # target x headroom
    headroom: float
    redundancy: int
    pools: list[PoolPlan]
    gpus: int
    prefill_to_decode: float | None  # disaggregated: prefill workers per decode worker (serving, no spares)
    predicted: curves.CurvePoint     # the serving cluster (no spares) at the target rate
    cost: cost.Cost
    kv_pool_tokens: int              # per worker
    notes: list[str]


def capacity(req: PlanRequest, workload: Workload, slo: Slo, cluster: Cluster | None = None,
             catalog: Catalog | None = None) -> Capacity:
    """C_max of `cluster` (default: one worker, or one prefill + one decode worker)."""
    ctx = context.build(req, workload, catalog)
    check_feasible(ctx, slo)
    cluster = cluster or (Cluster(workers=1) if req.mode == "colocated" else Cluster(prefill=1, decode=1))
    _check_cluster(req, cluster)
    best = sizing.max_rate(ctx, slo, cluster)
    if best <= 0:
        raise PlannerError("no positive rate meets the SLOs on this cluster")
    op = evaluate(ctx, cluster, best, slo)
    saturation = sizing.max_rate(ctx, None, cluster, only=sizing.CEILINGS)
    at_max = curves.point(ctx, op, saturation)
    bind = sizing.binding(ctx, slo, cluster, best)
    lims = [Limit(constraint=lim.constraint, rate=float(lim.rate)) for lim in sizing.limits(ctx, slo, cluster)]
    planned = sizing.max_rate(ctx, slo, cluster, rules=True)
    return Capacity(cluster=cluster, gpus=cluster.gpus(req.tp), max_rate=float(best), planned_rate=float(planned),
                    usable_rate=float(planned / req.headroom), concurrency=float(best * mean_latency(ctx, op)),
                    binding=bind, resource=resource(ctx, bind, best, cluster, slo), limits=lims, at_max=at_max,
                    notes=conditional.note(ctx))


def curve(req: PlanRequest, workload: Workload, slo: Slo, cluster: Cluster, rates: list[float] | None = None,
          catalog: Catalog | None = None) -> curves.Curve:
    """Predicted TTFT/ITL percentiles, throughput and goodput of `cluster` at each rate."""
    ctx = context.build(req, workload, catalog)
    _check_cluster(req, cluster)
    return curves.curve(ctx, slo, cluster, rates)


def plan(req: PlanRequest, workload: Workload, slo: Slo, catalog: Catalog | None = None) -> Plan:
    """Workers and GPUs per pool for workload.rate under the SLOs, with headroom, spares and cost."""
    ctx = context.build(req, workload, catalog)
    check_feasible(ctx, slo)
    sized = sizing.size(ctx, slo, workload.rate)
    per = sizing.per_worker(ctx, slo)
    pools = _pools(ctx, slo, sized, per)
    gpus = sized.cluster.gpus(req.tp)
    saturation = sizing.max_rate(ctx, None, sized.serving, only=sizing.CEILINGS)
    predicted = curves.point(ctx, sized.point, saturation)
    ratio = sized.serving.prefill / sized.serving.decode if req.mode == "disaggregated" else None
    bill = cost.cost(gpus, req.price_per_gpu_hour, workload.rate, ctx.prompts.mean(), ctx.outputs.mean())
    return Plan(model=req.model, gpu=req.gpu, tp=req.tp, mode=req.mode, target_rate=workload.rate,
                sized_rate=float(sized.rate), headroom=req.headroom, redundancy=req.redundancy, pools=pools, gpus=gpus,
                prefill_to_decode=ratio, predicted=predicted, cost=bill, kv_pool_tokens=ctx.pool_tokens,
                notes=_notes(ctx))


def _pools(ctx, slo, sized, per) -> list[PoolPlan]:
    req = ctx.req
    if req.mode == "colocated":
        roles = [("colocated", sized.cluster.workers)]
    else:
        roles = [("prefill", sized.cluster.prefill), ("decode", sized.cluster.decode)]
    out = []
    for role, workers in roles:
        one = Cluster(workers=1) if role == "colocated" else (
            Cluster(prefill=1, decode=sizing.MAX_WORKERS) if role == "prefill"
            else Cluster(prefill=sizing.MAX_WORKERS, decode=1))
        bind = sizing.binding(ctx, slo, one, per[role], rules=True) if per[role] > 0 else "infeasible"
        serving = {"colocated": sized.serving.workers, "prefill": sized.serving.prefill,
                   "decode": sized.serving.decode}[role]
        out.append(PoolPlan(role=role, workers=workers, spares=workers - serving, gpus=workers * req.tp,
                            max_rate_per_worker=float(per[role]),
                            usable_rate_per_worker=float(per[role] / req.headroom),
                            binding=bind))
    return out


def mean_latency(ctx: context.Context, op) -> float:
    """Mean time in system (mean TTFT + mean decode time) at an operating point, for Little's law
    (which needs the mean: a median TTFT understates it by the wait's long tail)."""
    return op.ttft_mean + ctx.decode_tokens * op.itl_mean


def resource(ctx: context.Context, binding: str, rate: float, cluster: Cluster, slo: Slo | None = None) -> str:
    """The hardware limit behind a binding constraint: the roofline bound of the steps it depends on."""
    if binding == "tenant_limit":
        op = evaluate(ctx, cluster, rate * (1 + 4 * sizing.RATE_TOL))
        return tenant_limits.worst(ctx.req.tenants, op.rate, mean_latency(ctx, op),
                                   ctx.prompts.mean() + ctx.outputs.mean())
    if binding in ("kv_memory", "max_num_seqs", "preemption", "kv_link", "compute", "bandwidth"):
        return {"preemption": "kv_memory", "max_num_seqs": "batch slots"}.get(binding, binding)
    if binding in ("ttft_slo", "e2e_slo"):
        local = _local_ttft_resource(ctx, cluster, rate * (1 + 4 * sizing.RATE_TOL), slo) if slo else None
        if local is not None:
            return local
        bound = prefill.profile(ctx, 0).full_step.bound
    else:
        op = evaluate(ctx, cluster, rate)
        bound = decode.step(ctx, max(1, round(1 + op.decode_batch))).bound
    return "bandwidth" if bound == "memory" else bound


def _local_ttft_resource(ctx: context.Context, cluster: Cluster, rate: float, slo: Slo) -> str | None:
    """Where TTFT fails on the decode workers (conditional disaggregation: the local share alone
    misses it): "batch slots" when its wait for a sequence slot is the longer part of its p99,
    else the roofline bound of the mixed steps that prefill it. None when the prefill pool fails it."""
    if ctx.mode != "disaggregated" or "ttft_slo" not in evaluate(ctx, cluster, rate, slo).decode_side:
        return None
    at = operating.at_rate(ctx, cluster, rate)
    split = conditional.split(at)
    if split is None:
        return None
    dw = conditional.decode_worker(at, split, rate, cluster.decode)
    if dw.slot_wait is None or dw.slot_wait.quantile(0.99) > dw.point.queue.ttft_quantile(0.99):
        return "batch slots"
    bound = prefill.profile(split.local_ctx, int(round(dw.point.batch))).full_step.bound
    return "bandwidth" if bound == "memory" else bound


def check_feasible(ctx: context.Context, slo: Slo) -> None:
    """SLOs below what a worker with nothing else to do achieves have no answer: say so."""
    idle = evaluate(ctx, _idle_cluster(ctx), 1e-9)
    prompt_p99 = ctx.prompts.quantile(0.99)
    if idle.ttft_p99 > slo.ttft_p99:
        raise PlannerError(
            f"TTFT SLO {slo.ttft_p99:.3g} s is below the minimum possible p99 TTFT of {idle.ttft_p99:.3g} s: "
            f"with no queue at all, the p99 prompt (~{prompt_p99:.0f} tokens, {ctx.workload.prefix_reuse:.0%} "
            f"cached) takes that long to prefill on {ctx.dep.tp} x {ctx.dep.gpu.name}; raise tp, use faster "
            "GPUs, or relax the SLO")
    if idle.itl_p99 > slo.itl_p99:
        one = decode.step(ctx, 1)
        raise PlannerError(
            f"ITL SLO {slo.itl_p99 * 1e3:.3g} ms is below the minimum possible p99 ITL of {idle.itl_p99 * 1e3:.3g} ms: "
            f"a decode step of a single sequence takes {one.seconds * 1e3:.3g} ms ({one.bound}-bound) on "
            f"{ctx.dep.tp} x {ctx.dep.gpu.name}")
    if slo.e2e_p99 is not None and idle.e2e_p99 > slo.e2e_p99:
        raise PlannerError(f"e2e SLO {slo.e2e_p99:.3g} s is below the minimum possible p99 of "
                           f"{idle.e2e_p99:.3g} s (prefill plus one decode step per output token, unloaded)")


def _idle_cluster(ctx: context.Context) -> Cluster:
    return Cluster(workers=1) if ctx.mode == "colocated" else Cluster(prefill=1, decode=1)


def _check_cluster(req: PlanRequest, cluster: Cluster) -> None:
    if req.mode == "colocated" and cluster.workers < 1:
        raise PlannerError("a colocated cluster needs workers >= 1")
    if req.mode == "disaggregated" and (cluster.prefill < 1 or cluster.decode < 1):
        raise PlannerError("a disaggregated cluster needs prefill >= 1 and decode >= 1 workers")


def _availability_note(req: PlanRequest) -> list[str]:
    if req.availability is None:
        return []
    from emulator.planner import spares
    failures = spares.GPU_FAILURES_PER_HOUR if req.gpu_failures_per_hour is None else req.gpu_failures_per_hour
    repair = spares.REPAIR_HOURS if req.repair_hours is None else req.repair_hours
    source = " (Llama 3 paper: 419 unexpected interruptions, 54 days, 16,384 H100s)" \
        if req.gpu_failures_per_hour is None else ""
    return [f"spares per pool for availability {req.availability:g}: {failures:.3g} failures per GPU-hour{source}, "
            f"{repair:g} h repairs, a worker down {spares.worker_unavailability(req.tp, failures, repair):.2%} "
            "of the time"]


def _notes(ctx: context.Context) -> list[str]:
    req = ctx.req
    notes = [f"sized for {ctx.workload.rate:g} x headroom {req.headroom:g} requests/s"
             + (f", plus {req.redundancy} spare worker(s) per pool (N+{req.redundancy})" if req.redundancy else ""),
             *_availability_note(req),
             f"KV pool per worker: {ctx.pool_tokens:,} tokens "
             f"({roofline.kv_bytes_per_token(ctx.dep.model, ctx.dep.kv_dtype):,} B/token over {ctx.dep.tp} GPU(s))",
             f"dispatch model: {req.dispatch}"]
    if ctx.cached.any() and ctx.workload.kv_sharing >= 1.0:
        notes.append("KV memory counts every cached prefix block once for all the requests running with it "
                     "(kv_sharing = 1: shared system prompts and RAG documents); where the hits are each "
                     "session's own history (multi-turn chat, agents), each request holds its own copy: "
                     "lower kv_sharing, or the decode pool's KV memory is understated")
    if req.mode == "disaggregated":
        notes.append("first token from the prefill worker; the KV handoff is in the first inter-token gap"
                     if not req.first_token_after_transfer else "first token after the KV handoff (decode worker)")
    return notes + conditional.note(ctx)
