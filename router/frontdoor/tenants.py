"""Tenants: API keys to tenants, and each tenant's limits (requests/s, tokens/s, concurrency, salt).

A request reserves prompt + max_tokens from its tenant's token bucket on admission and settles with
the tokens it really used on release, so tokens/s limits count tokens, not requests. Checks run
cheapest and most final first, and a rejection leaves every bucket as it was.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

import msgspec

from kvlab.wire.openai_api import PRIORITY_CLASSES
from router.frontdoor.admission import Admission, reject
from router.frontdoor.token_bucket import TokenBucket

TOKENS_BURST_S = 10.0  # default token burst: 10 s of the rate, so one large request still fits
CONCURRENCY_RETRY_S = 1.0  # Retry-After for a full concurrency cap: no way to know when a slot frees


class TenantConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    api_keys: list[str] = []
    requests_per_s: float | None = None     # None: unlimited
    requests_burst: float | None = None     # default: one second of requests_per_s (at least 1)
    tokens_per_s: float | None = None       # prompt + max_tokens reserved, settled with actual usage
    tokens_burst: float | None = None       # default: TOKENS_BURST_S seconds of tokens_per_s
    max_concurrency: int | None = None
    cache_salt: bool | str = False          # True: salt with the tenant's name; a string: that salt
    choose_policy: bool = False             # may pick the routing policy per request (x-kvlab-policy)
    priority: Literal["interactive", "batch"] = "interactive"   # forced into upstream bodies (README: Routing)


class _TenantState:
    __slots__ = ("config", "requests", "tokens", "in_flight")

    def __init__(self, config: TenantConfig, now: float) -> None:
        self.config = config
        self.requests = _bucket(config.requests_per_s, config.requests_burst, 1.0, now)
        self.tokens = _bucket(config.tokens_per_s, config.tokens_burst, TOKENS_BURST_S, now)
        self.in_flight = 0


def _bucket(rate: float | None, burst: float | None, burst_s: float, now: float) -> TokenBucket | None:
    if rate is None:
        return None
    return TokenBucket(rate, burst_of(rate, burst, burst_s), now)


def burst_of(rate: float, burst: float | None, burst_s: float) -> float:
    """A bucket's burst: the one configured, else `burst_s` seconds of its rate (at least 1)."""
    return burst if burst is not None else max(1.0, rate * burst_s)


def bursts(config: TenantConfig) -> tuple[float | None, float | None]:
    """The request and token buckets' bursts (None where the tenant has no such limit)."""
    requests = burst_of(config.requests_per_s, config.requests_burst, 1.0) if config.requests_per_s else None
    tokens = burst_of(config.tokens_per_s, config.tokens_burst, TOKENS_BURST_S) if config.tokens_per_s else None
    return requests, tokens


def _key_digest(api_key: str) -> bytes:
    # Look keys up by digest: a dict probe on the raw key could leak timing about stored keys.
    return hashlib.sha256(api_key.encode()).digest()


class Tenants:
    def __init__(self, configs: Iterable[TenantConfig], now: float = 0.0) -> None:
        self._state: dict[str, _TenantState] = {}
        self._by_key: dict[bytes, str] = {}
        for config in configs:
            if config.name in self._state:
                raise ValueError(f"duplicate tenant {config.name!r}")
            self._state[config.name] = self._new_state(config, now)
            for key in config.api_keys:
                digest = _key_digest(key)
                if digest in self._by_key:
                    raise ValueError(f"an API key of tenant {config.name!r} already belongs to "
                                     f"{self._by_key[digest]!r}")
                self._by_key[digest] = config.name

    def _new_state(self, config: TenantConfig, now: float) -> _TenantState:
        return _TenantState(config, now)   # router.shared_state keeps it in shared memory instead

    def tenant_for_key(self, api_key: str) -> str | None:
        """The tenant owning `api_key`, or None (the HTTP layer answers 401)."""
        return self._by_key.get(_key_digest(api_key))

    def salt(self, tenant: str) -> str | None:
        """The tenant's cache salt for block hashing, or None when it shares the cache."""
        salt = self._get(tenant).config.cache_salt
        if salt is True:
            return tenant
        return salt or None

    def priority_of(self, tenant: str | None) -> int:
        """The `priority` value of the tenant's class (PRIORITY_CLASSES; no tenant: interactive)."""
        return PRIORITY_CLASSES[self._get(tenant).config.priority if tenant is not None else "interactive"]

    def may_choose_policy(self, tenant: str | None) -> bool:
        return tenant is not None and self._get(tenant).config.choose_policy

    def peek(self, tenant: str, now: float) -> Admission | None:
        """The refusal ``admit`` would give whatever the request's size (concurrency cap full, request
        or token bucket empty), without taking anything: lets the router refuse before it spends
        CPU on the prompt. None when the request might be admitted."""
        state = self._get(tenant)
        name, cap = state.config.name, state.config.max_concurrency
        if cap is not None and state.in_flight >= cap:
            return reject("concurrency", f"tenant {name!r} has {cap} requests in flight, its limit",
                          CONCURRENCY_RETRY_S, name)
        for bucket, reason, rate in ((state.requests, "requests_per_s", state.config.requests_per_s),
                                     (state.tokens, "tokens_per_s", state.config.tokens_per_s)):
            if bucket is not None and bucket.level(now) < 1:
                return reject(reason, f"tenant {name!r} is over {rate:g} {reason.replace('_per_s', '')}/s",
                              (1 - bucket.level(now)) / bucket.rate, name)
        return None

    def in_flight(self, tenant: str) -> int:
        return self._get(tenant).in_flight

    def admit(self, tenant: str, tokens: int, now: float) -> Admission:
        """Admit one request reserving `tokens` (prompt + max_tokens); on success the caller must
        ``release`` the returned admission exactly once when the request ends, however it ends."""
        state = self._get(tenant)
        rejected = self._check(state, tokens, now)
        if rejected is not None:
            return rejected
        state.in_flight += 1
        return Admission(ok=True, tenant=tenant, reserved_tokens=tokens if state.tokens else 0)

    def release(self, admission: Admission, used_tokens: int, now: float) -> None:
        """Free the concurrency slot and settle the reservation against `used_tokens`."""
        if not admission.ok or admission.tenant is None:
            return
        state = self._get(admission.tenant)
        state.in_flight = max(0, state.in_flight - 1)
        if state.tokens is not None:
            state.tokens.reconcile(admission.reserved_tokens, used_tokens, now)

    def _check(self, state: _TenantState, tokens: int, now: float) -> Admission | None:
        name, cap = state.config.name, state.config.max_concurrency
        if cap is not None and state.in_flight >= cap:
            return reject("concurrency", f"tenant {name!r} has {cap} requests in flight, its limit",
                          CONCURRENCY_RETRY_S, name)
        if state.tokens is not None and tokens > state.tokens.burst:
            return reject("tokens_exceed_burst", f"the request reserves {tokens} tokens; tenant {name!r} "
                                                 f"may burst at most {state.tokens.burst:.0f}", None, name)
        if state.requests is not None:
            ok, wait = state.requests.try_take(1, now)
            if not ok:
                return reject("requests_per_s", f"tenant {name!r} is over {state.config.requests_per_s:g} requests/s",
                              wait, name)
        if state.tokens is not None:
            ok, wait = state.tokens.try_take(tokens, now)
            if not ok:
                if state.requests is not None:
                    state.requests.refund(1, now)  # all or nothing
                return reject("tokens_per_s", f"tenant {name!r} is over {state.config.tokens_per_s:g} tokens/s",
                              wait, name)
        return None

    def _get(self, tenant: str) -> _TenantState:
        state = self._state.get(tenant)
        if state is None:
            raise KeyError(f"unknown tenant {tenant!r}")
        return state


__all__ = ["Admission", "TenantConfig", "Tenants"]
