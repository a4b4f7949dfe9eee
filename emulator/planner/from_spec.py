"""A cluster spec in the planner's terms: how its router spreads requests, and its workload as samples.

`kvlab plan --spec` and the sweeps' planned columns (loadtests.planner_bridge) both read a spec
through here, so they plan from the same inputs and print the same numbers.
"""
from __future__ import annotations

import xxhash

from emulator import workload as wl
from emulator.planner import PlanRequest, Workload
from emulator.planner.inputs import Dispatch
from emulator.planner.tenant_limits import TenantLimit
from emulator.spec import ClusterSpec
from kvlab.wire.block_hash import token_bytes
from router.config import tenant_configs
from router.frontdoor.tenants import bursts
from router.policies.pd_pair import DEFAULT_LOCAL_PREFILL_TOKENS

SAMPLE_REQUESTS = 4000   # generated requests whose lengths and prefixes the planner's laws come from

# Router policy -> the planner's dispatch model: load-aware policies pool the queue (join the
# shortest), prefix hashing is load-blind (random split), round robin smooths each worker's arrivals.
DISPATCH: dict[str, Dispatch] = {"round_robin": "round_robin", "least_loaded": "jsq", "kv_aware": "jsq",
            "prefix_ring": "random", "prefix_bounded": "random"}
# Policies that send a prefix's requests to one worker (so each worker caches its share of prefixes).
CACHE_AFFINE = {"prefix_ring", "prefix_bounded", "kv_aware", "pd_pair"}


def dispatch(spec: ClusterSpec) -> Dispatch:
    return DISPATCH.get(spec.router.policy, "random")


def cache_affinity(spec: ClusterSpec) -> bool:
    return spec.router.policy in CACHE_AFFINE


def sampled_workload(spec: ClusterSpec, rate: float, samples: int = SAMPLE_REQUESTS) -> Workload:
    """The spec's workload as the planner takes it: lengths, each prompt's shared prefix and which one."""
    w = spec.workload
    requests = wl.from_spec(spec, 1.0, num_requests=samples)
    shared = [min(r.shared_tokens or 0, r.prompt_len) for r in requests]
    return Workload.from_samples(rate, [r.prompt_len for r in requests], [r.max_tokens for r in requests],
                                 shared=shared, burstiness=w.cv if w.arrival == "gamma" else 1.0,
                                 groups=_prefix_groups(spec, requests, shared))


def _prefix_groups(spec: ClusterSpec, requests, shared: list[int]) -> list[int]:
    """An id per request for the blocks its shared prefix fills: the prefix's tokens, and the cache
    salt of its tenant (a salted tenant's copy is a different prefix to the cache)."""
    salted = {t.name for t in spec.tenants if t.cache_salt}
    return [xxhash.xxh3_64_intdigest(token_bytes(r.tokens, 0, n),
                                     xxhash.xxh3_64_intdigest(r.tenant.encode()) if r.tenant in salted else 0)
            for r, n in zip(requests, shared, strict=True)]


def plan_request(spec: ClusterSpec) -> PlanRequest:
    """The spec's deployment, engine limits and routing in the planner's terms."""
    return PlanRequest(
        model=spec.model, gpu=spec.gpu, tp=spec.tp, tp_link=spec.links.tp, kv_link=spec.links.kv_transfer,
        weight_dtype=spec.weight_dtype, kv_dtype=spec.kv_dtype,
        mode="disaggregated" if spec.disaggregated else "colocated",
        dispatch=dispatch(spec), cache_affinity=cache_affinity(spec),
        engine=spec.engine_config(), tenants=tenant_limits(spec), local_prefill_tokens=local_prefill_tokens(spec))


def local_prefill_tokens(spec: ClusterSpec) -> int:
    """pd_pair's conditional-disaggregation threshold for a disaggregated spec (0: none)."""
    if not spec.disaggregated:
        return 0
    return int(spec.router.settings.get("local_prefill_tokens", DEFAULT_LOCAL_PREFILL_TOKENS))


def tenant_limits(spec: ClusterSpec) -> list[TenantLimit]:
    """The spec's tenants with their share of the workload's arrivals and the router's limits (its
    defaults for the bursts); tenants with no limit are left out."""
    mix = spec.workload.tenants or ({spec.tenants[0].name: 1.0} if spec.tenants else {})   # as emulator.workload
    total = sum(mix.values()) or 1.0
    out = []
    for t in tenant_configs(spec):
        requests_burst, tokens_burst = bursts(t)
        limit = TenantLimit(name=t.name, share=mix.get(t.name, 0.0) / total, requests_per_s=t.requests_per_s,
                            requests_burst=requests_burst, tokens_per_s=t.tokens_per_s, tokens_burst=tokens_burst,
                            max_concurrency=t.max_concurrency)
        if limit.share > 0 and (t.requests_per_s or t.tokens_per_s or t.max_concurrency):
            out.append(limit)
    return out

