"""`kvlab plan`: the analytical planner from the command line (argument parsing and printing only)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

import msgspec

from emulator import planner
from emulator.engine_config import DEFAULTS, EngineConfig
from emulator.planner import Cluster, LengthDist, PlannerError, PlanRequest, Slo, Workload
from kvlab.wire.user_errors import number, positive

_WORKLOAD_FLAGS = ("prompt_mean", "prompt_p50", "prompt_p99", "prompt_sigma", "output_mean", "output_p50",
                   "output_p99", "output_sigma", "reuse", "burstiness")


def _spec_module():
    try:
        from emulator import spec  # written alongside the planner; optional
    except ImportError:
        return None
    return spec if hasattr(spec, "load_spec") else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if _spec_module() is not None:
        parser.add_argument("--spec", help="cluster spec (file or example name): model, GPU, pools, SLOs, workload")
    hw = parser.add_argument_group("deployment")
    hw.add_argument("--model", help="model name from the catalog (default Llama-3.1-8B)")
    hw.add_argument("--gpu", help="GPU name from the catalog (default H100-SXM)")
    hw.add_argument("--tp", type=int, help="tensor-parallel degree (default 1)")
    hw.add_argument("--mode", choices=("colocated", "disaggregated"), help="default colocated")
    hw.add_argument("--kv-link", help="prefill->decode link (default InfiniBand-NDR)")
    hw.add_argument("--weight-dtype", choices=("bf16", "fp16", "fp8"))
    hw.add_argument("--kv-dtype", choices=("bf16", "fp16", "fp8"))
    hw.add_argument("--catalog", help="user catalog TOML (default: the spec's catalog, if any)")
    hw.add_argument("--max-num-batched-tokens", type=int,
                    help=f"per-step token budget (default {DEFAULTS.max_num_batched_tokens})")
    hw.add_argument("--max-num-seqs", type=int, help=f"running-sequence cap (default {DEFAULTS.max_num_seqs})")
    wl = parser.add_argument_group("workload")
    wl.add_argument("--rate", type=positive, help="target requests/s to size for")
    for kind, default in (("prompt", 1000), ("output", 250)):
        wl.add_argument(f"--{kind}-mean", type=float, help=f"mean {kind} tokens (default {default})")
        wl.add_argument(f"--{kind}-p50", type=float)
        wl.add_argument(f"--{kind}-p99", type=float)
        wl.add_argument(f"--{kind}-sigma", type=float, help="lognormal sigma (with the mean or p50)")
    wl.add_argument("--reuse", type=float, help="prefix-cache hit share of prompt tokens, 0..1 (default 0)")
    wl.add_argument("--burstiness", type=float, help="CV of interarrival gaps (default 1: Poisson)")
    slo = parser.add_argument_group("SLOs (seconds)")
    slo.add_argument("--ttft-p99", type=float, help="default 1.0")
    slo.add_argument("--itl-p99", type=float, help="default 0.1")
    slo.add_argument("--e2e-p99", type=float)
    plan = parser.add_argument_group("plan")
    plan.add_argument("--price", type=positive, default=None, help="USD per GPU-hour (for the cost lines)")
    plan.add_argument("--headroom", type=number(minimum=1.0, inclusive=True), default=1.0,
                      help="size for rate x this (>= 1)")
    plan.add_argument("--redundancy", type=number(int, inclusive=True), default=0, help="spare workers per pool (N+k)")
    plan.add_argument("--availability", type=number(minimum=0.0), default=None,
                      help="target availability per pool, e.g. 0.999: spares from GPU failures (at least --redundancy)")
    plan.add_argument("--gpu-failures-per-hour", type=number(minimum=0.0, inclusive=True), default=None,
                      help="per-GPU failure rate (default: the Llama 3 paper's, 1.97e-5)")
    plan.add_argument("--repair-hours", type=number(minimum=0.0, inclusive=True), default=None,
                      help="mean time to repair a failed GPU (default 24)")
    plan.add_argument("--dispatch", choices=("random", "round_robin", "jsq"),
                      help="how the router spreads load (queueing model; default from the spec's router, else random)")
    plan.add_argument("--curve", action="store_true", help="also print the predicted latency-throughput curve")
    plan.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    try:
        req, workload, slo, cluster = _inputs(args)
        out = _compute(req, workload, slo, cluster, args)
    except PlannerError as exc:
        print(f"kvlab plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(out)).decode() + "\n")
    else:
        print(_render(out))
    return 0


def _compute(req, workload, slo, cluster, args) -> dict:
    out: dict = {"request": req, "workload": workload, "slo": slo}
    catalog = _catalog(args)
    out["step_model"] = _step_model_note(catalog, req.gpu)
    if cluster is not None:
        out["capacity"] = planner.capacity(req, workload, slo, cluster, catalog)
    if args.rate is not None or cluster is None:
        out["plan"] = planner.plan(req, workload, slo, catalog)
    if args.curve:
        target = cluster if cluster is not None else _serving(out["plan"])
        out["curve"] = planner.curve(req, workload, slo, target, catalog=catalog)
    return out


def _step_model_note(catalog, gpu: str) -> str:
    from emulator.physics.catalog import CatalogError, builtin_catalog
    try:
        return (catalog or builtin_catalog()).gpu(gpu).calibration_note
    except CatalogError as exc:
        raise PlannerError(str(exc)) from None


def _catalog(args):
    """--catalog, else the spec's own catalog: a calibrated catalog must reach the plan as it reaches
    the spec's workers and the simulator."""
    from emulator.physics.catalog import CatalogError, load_catalog

    try:
        if getattr(args, "catalog", None):
            return load_catalog(args.catalog)
        spec = _load_spec(args)
        return spec.catalog_data() if spec is not None else None
    except (OSError, CatalogError, msgspec.DecodeError, ValueError) as exc:
        raise PlannerError(f"catalog: {exc}") from None


def _serving(plan) -> Cluster:
    counts = {p.role: p.workers - p.spares for p in plan.pools}
    return Cluster(workers=counts.get("colocated", 0), prefill=counts.get("prefill", 0), decode=counts.get("decode", 0))


# -- inputs --------------------------------------------------------------------------------------

def _inputs(args) -> tuple[PlanRequest, Workload, Slo, Cluster | None]:
    spec = _load_spec(args)
    base = _from_spec(spec, args) if spec is not None else {}
    def pick(name: str, default: Any) -> Any:   # the flag if given, else the spec's value
        return getattr(args, name) if getattr(args, name, None) is not None else base.get(name, default)

    flags = {k: getattr(args, k) for k in ("max_num_batched_tokens", "max_num_seqs") if getattr(args, k, None)}
    engine = dataclasses.replace(base.get("engine", EngineConfig()), **flags)   # the flags given win over the spec
    req = PlanRequest(model=pick("model", "Llama-3.1-8B"), gpu=pick("gpu", "H100-SXM"), tp=pick("tp", 1),
                      mode=pick("mode", "colocated"), kv_link=pick("kv_link", "InfiniBand-NDR"),
                      tp_link=base.get("tp_link"), weight_dtype=pick("weight_dtype", "bf16"),
                      kv_dtype=pick("kv_dtype", "bf16"), price_per_gpu_hour=args.price or 0.0, headroom=args.headroom,
                      redundancy=args.redundancy, availability=args.availability,
                      gpu_failures_per_hour=args.gpu_failures_per_hour, repair_hours=args.repair_hours,
                      dispatch=pick("dispatch", "random"),
                      cache_affinity=base.get("cache_affinity", True), engine=engine,
                      tenants=base.get("tenants", []), local_prefill_tokens=base.get("local_prefill_tokens", 0))
    rate = args.rate or base.get("rate", 1.0)
    if "workload" in base and not any(getattr(args, f, None) is not None for f in _WORKLOAD_FLAGS):
        workload = msgspec.structs.replace(base["workload"], rate=rate)   # the spec's samples, prefixes and all
    else:
        workload = Workload(rate=rate, prompt=_lengths(args, "prompt", base, 1000),
                            output=_lengths(args, "output", base, 250), prefix_reuse=pick("reuse", 0.0),
                            burstiness=pick("burstiness", 1.0))
    slo = Slo(ttft_p99=pick("ttft_p99", 1.0), itl_p99=pick("itl_p99", 0.1), e2e_p99=pick("e2e_p99", None))
    return req, workload, slo, base.get("cluster")


def _lengths(args, kind: str, base: dict, default: float) -> LengthDist:
    given = {k: getattr(args, f"{kind}_{k}") for k in ("mean", "p50", "p99", "sigma")}
    given = {k: v for k, v in given.items() if v is not None}
    if given:
        return LengthDist(**given)
    return base.get(kind) or LengthDist(mean=default)


def _load_spec(args):
    path = getattr(args, "spec", None)
    if not path:
        return None
    module = _spec_module()
    try:
        return module.load_spec(path)
    except ValueError as exc:
        raise PlannerError(str(exc)) from None


def _from_spec(spec, args) -> dict:
    """Deployment, SLOs, cluster and workload laws from a cluster spec (flags still override)."""
    from emulator.planner import from_spec as planner_spec  # beside the spec module

    roles = {p.role for p in spec.pools}
    disagg = roles != {"both"}
    def count(role: str) -> int:
        return sum(p.count for p in spec.pools if p.role == role)

    cluster = Cluster(prefill=count("prefill"), decode=count("decode")) if disagg else Cluster(workers=count("both"))
    rate = args.rate or (spec.workload.rates[0] if spec.workload.rates else 1.0)
    sampled = planner_spec.sampled_workload(spec, rate)
    return {"model": spec.model, "gpu": spec.gpu, "tp": spec.tp, "mode": "disaggregated" if disagg else "colocated",
            "kv_link": spec.links.kv_transfer, "tp_link": spec.links.tp, "weight_dtype": spec.weight_dtype,
            "kv_dtype": spec.kv_dtype, "rate": rate, "workload": sampled, "prompt": sampled.prompt,
            "output": sampled.output, "reuse": sampled.prefix_reuse, "burstiness": sampled.burstiness,
            "ttft_p99": spec.slo.ttft_p99_s, "itl_p99": spec.slo.itl_p99_s, "e2e_p99": spec.slo.e2e_p99_s,
            "cluster": cluster, "dispatch": planner_spec.dispatch(spec),
            "cache_affinity": planner_spec.cache_affinity(spec),
            "engine": spec.engine_config(), "tenants": planner_spec.tenant_limits(spec),
            "local_prefill_tokens": planner_spec.local_prefill_tokens(spec)}


# -- output --------------------------------------------------------------------------------------

def _ms(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x * 1e3:,.1f} ms"


def _s(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:,.3f} s"


def _render(out: dict) -> str:
    req, w, slo = out["request"], out["workload"], out["slo"]
    lines = [f"{req.model} on {req.tp} x {req.gpu}, {req.mode}; SLO p99 TTFT {_s(slo.ttft_p99)}, "
             f"ITL {_ms(slo.itl_p99)}" + (f", e2e {_s(slo.e2e_p99)}" if slo.e2e_p99 else "")]
    if out.get("step_model"):
        lines.append(out["step_model"])
    if "capacity" in out:
        lines += ["", _render_capacity(out["capacity"])]
    if "plan" in out:
        lines += ["", _render_plan(out["plan"], w)]
    if "curve" in out:
        lines += ["", _render_curve(out["curve"])]
    return "\n".join(lines)


def _render_capacity(c) -> str:
    cl = c.cluster
    who = f"{cl.workers} colocated" if cl.workers else f"{cl.prefill} prefill + {cl.decode} decode"
    rows = [f"Capacity of {who} worker(s), {c.gpus} GPUs",
            f"  C_max (max rate at SLO)   {c.max_rate:,.2f} req/s",
            f"  with the sizing rules     {c.planned_rate:,.2f} req/s   usable (/headroom) {c.usable_rate:,.2f} req/s",
            f"  concurrency at C_max      {c.concurrency:,.1f} requests in flight",
            f"  binding constraint        {c.binding} ({c.resource})",
            f"  at C_max                  TTFT p50/p99 {_s(c.at_max.ttft_p50)} / {_s(c.at_max.ttft_p99)}, "
            f"ITL p50/p99 {_ms(c.at_max.itl_p50)} / {_ms(c.at_max.itl_p99)}",
            "  each constraint alone allows:"]
    rows += [f"    {lim.constraint:<14} {lim.rate:,.2f} req/s" for lim in c.limits]
    rows += [f"  note: {n}" for n in c.notes]
    return "\n".join(rows)


def _render_plan(p, w) -> str:
    spares = sorted({pool.spares for pool in p.pools})
    rows = [f"Plan for {p.target_rate:g} req/s (sized for {p.sized_rate:g}: headroom {p.headroom:g}, "
            + (f"N+{spares[0]})" if len(spares) == 1 else
               "spares " + ", ".join(f"{pool.role} N+{pool.spares}" for pool in p.pools) + ")"),
            f"  {'pool':<10} {'workers':>7} {'GPUs':>5} {'C_max/worker':>13} {'usable/worker':>14}  binds"]
    rows += [f"  {pool.role:<10} {pool.workers:>7} {pool.gpus:>5} {pool.max_rate_per_worker:>13,.2f} "
             f"{pool.usable_rate_per_worker:>14,.2f}  {pool.binding}" for pool in p.pools]
    rows.append(f"  total GPUs {p.gpus}" + (f"; prefill:decode = {p.prefill_to_decode:.2f}"
                                             if p.prefill_to_decode is not None else ""))
    pr = p.predicted
    rows.append(f"  predicted at {pr.rate:g} req/s: TTFT p50/p99 {_s(pr.ttft_p50)} / {_s(pr.ttft_p99)}, "
                f"ITL p50/p99 {_ms(pr.itl_p50)} / {_ms(pr.itl_p99)}, decode batch {pr.decode_batch:.1f}, "
                f"KV use {pr.kv_usage:.0%}")
    c = p.cost
    if c.per_hour > 0:
        rows.append(f"  cost ${c.per_hour:,.2f}/h; ${c.per_million_output_tokens:,.3f} per 1M output tokens; "
                    f"${c.per_million_tokens:,.3f} per 1M tokens; ${c.per_thousand_requests:,.4f} per 1k requests")
    else:
        rows.append("  cost: pass --price USD_PER_GPU_HOUR to see it")
    rows += [f"  note: {n}" for n in p.notes]
    return "\n".join(rows)


def _render_curve(c) -> str:
    rows = [f"Predicted curve (ceiling {c.saturation_rate:,.2f} req/s, C_max {c.max_rate:,.2f} req/s)",
            f"  {'rate':>8} {'thru':>8} {'goodput':>8} {'TTFT p50':>10} {'TTFT p99':>10} {'ITL p50':>10} "
            f"{'ITL p99':>10}  fails"]
    for pt in c.points:
        rows.append(f"  {pt.rate:>8.2f} {pt.throughput:>8.2f} {pt.goodput:>8.2f} {_s(pt.ttft_p50):>10} "
                    f"{_s(pt.ttft_p99):>10} {_ms(pt.itl_p50):>10} {_ms(pt.itl_p99):>10}  {','.join(pt.violations)}")
    return "\n".join(rows)
