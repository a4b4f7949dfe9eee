"""Tenants' limits in the plan: the share of requests the router's front door refuses at a rate.

The router (router.frontdoor.tenants) refuses a tenant's request when its concurrency cap is full or
its request or token bucket is empty, and the simulator admits through the same code. A refused
request misses its SLO, so once more than 1% are refused the p99 TTFT counting failures is infinite:
the planner names that bound `tenant_limit`. Per tenant t with a share s_t of the arrivals:
  concurrency  requests in flight form an M/G/c/c loss system (each holds a slot for its lifetime,
               Poisson arrivals): Erlang's B formula with offered load lambda_t x mean lifetime, exact
               whatever the lifetime's distribution (insensitivity);
  buckets      a token bucket of rate r and burst b admits while its deficit, which each admitted
               request raises by its size and which drains at r, leaves room: the deficit is the
               workload of an M/D/1 queue whose arrivals are refused past w = (b - size) / r seconds
               of drain. With G the unbounded queue's tail at w, the refused share of such a
               bounded-workload queue is (1 - rho) G / (1 - rho G); G ~ rho exp(-theta w), theta the
               positive root of lambda (exp(theta size / r) - 1) = theta (Cramer-Lundberg). Past the
               bucket's rate the excess, 1 - 1/rho, is refused whatever the burst. Checked against the
               router's TokenBucket under Poisson arrivals in the tests: within 15% where about 1% or more is
               refused (what decides C_max); ~20% high where far less is.
The token bucket takes every request at the mean of prompt + output tokens (it reserves prompt +
max_tokens and refunds the unused part when the request ends).
"""
from __future__ import annotations

import math

import msgspec

REFUSED_LIMIT = 0.01   # more refused than this and the p99 counting failures is infinite
NEAR_ONE = 0.999       # bucket loads from here on take the loss at this load as a floor


class TenantLimit(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    share: float                          # of the cluster's arrivals
    requests_per_s: float | None = None
    requests_burst: float | None = None
    tokens_per_s: float | None = None
    tokens_burst: float | None = None
    max_concurrency: int | None = None


def refused_share(tenants: list[TenantLimit], rate: float, lifetime_s: float, tokens_per_request: float) -> float:
    """The share of all arrivals refused at `rate` (requests/s), each request living `lifetime_s`."""
    return sum(t.share * _refused(t, rate * t.share, lifetime_s, tokens_per_request) for t in tenants)


def worst(tenants: list[TenantLimit], rate: float, lifetime_s: float, tokens_per_request: float) -> str:
    """The tenant and limit refusing the most at `rate`, e.g. "team-a max_concurrency"."""
    found = [(share, f"{t.name} {limit}") for t in tenants
             for limit, share in _by_limit(t, rate * t.share, lifetime_s, tokens_per_request).items()]
    return max(found)[1] if found else ""


def _by_limit(t: TenantLimit, arrivals: float, lifetime_s: float, tokens: float) -> dict[str, float]:
    out = {}
    if t.max_concurrency is not None:
        out["max_concurrency"] = erlang_b(t.max_concurrency, arrivals * lifetime_s)
    if t.requests_per_s is not None:
        out["requests_per_s"] = bucket_refusal(arrivals, 1.0, t.requests_per_s, t.requests_burst or t.requests_per_s)
    if t.tokens_per_s is not None:
        out["tokens_per_s"] = bucket_refusal(arrivals, tokens, t.tokens_per_s, t.tokens_burst or t.tokens_per_s)
    return out


def _refused(t: TenantLimit, arrivals: float, lifetime_s: float, tokens: float) -> float:
    return 1.0 - math.prod(1.0 - share for share in _by_limit(t, arrivals, lifetime_s, tokens).values())


def erlang_b(servers: int, load: float) -> float:
    """Blocking probability of an M/G/c/c system (the stable recursion, no factorials)."""
    blocked = 1.0
    for k in range(1, servers + 1):
        blocked = load * blocked / (k + load * blocked)
    return blocked


def bucket_refusal(arrivals: float, size: float, rate: float, burst: float) -> float:
    """Share of Poisson `arrivals` (each taking `size`) that a bucket of `rate` and `burst` refuses."""
    if arrivals <= 0:
        return 0.0
    if size > burst:
        return 1.0
    rho = arrivals * size / rate
    near = min(rho, NEAR_ONE)   # from NEAR_ONE on, its loss is the floor (the formula is 0/0 at 1)
    tail = near * math.exp(-_decay(near * rate / size, size / rate) * (burst - size) / rate)
    loss = (1.0 - near) * tail / (1.0 - near * tail)
    return max(loss, 1.0 - 1.0 / rho) if rho > 1.0 else loss


def _decay(arrivals: float, service_s: float) -> float:
    """The positive root of arrivals (exp(theta service) - 1) = theta (bisection; the function is convex)."""
    excess = lambda theta: arrivals * math.expm1(theta * service_s) - theta  # noqa: E731
    low, high = 0.0, 1.0 / service_s
    while excess(high) <= 0:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        if excess(mid) > 0:
            high = mid
        else:
            low = mid
    return (low + high) / 2
