"""Admission before routing: request-size limits, the refusal record, and a rate meter.

Load shedding against the TTFT SLO lives in ``router.frontdoor.gate.DrainLimit``: it limits the queue
from the rate requests leave it (the drain rate), never from the arrival rate, which counts the very
requests it refuses.
"""
from __future__ import annotations

import math

import msgspec

# Reason codes and the HTTP status each maps to (the HTTP layer owns the mapping; kept here so
# the router and the simulator report the same reasons).
STATUS = {
    "prompt_empty": 400,
    "prompt_too_long": 400,
    "max_tokens_invalid": 400,
    "max_tokens_too_large": 400,
    "context_length_exceeded": 400,
    "tokens_exceed_burst": 429,
    "concurrency": 429,
    "requests_per_s": 429,
    "tokens_per_s": 429,
    "overloaded": 503,
}


class Admission(msgspec.Struct, frozen=True):
    """Outcome of an admission check; `reason` is one of STATUS's keys when not ok."""
    ok: bool
    reason: str | None = None
    message: str = ""
    retry_after: float | None = None   # seconds; None when waiting will not help
    tenant: str | None = None
    reserved_tokens: int = 0           # tokens charged to the tenant's bucket, settled at release


ADMITTED = Admission(ok=True)


def reject(reason: str, message: str, retry_after: float | None = None, tenant: str | None = None) -> Admission:
    return Admission(ok=False, reason=reason, message=message, retry_after=retry_after, tenant=tenant)


class RequestLimits(msgspec.Struct, frozen=True):
    max_input_tokens: int | None = None   # None: no router-side cap
    max_tokens_limit: int | None = None
    max_model_len: int | None = None      # prompt + max_tokens must fit the context window


def check_request(prompt_tokens: int, max_tokens: int, limits: RequestLimits) -> Admission:
    """Size checks on one request, cheapest first."""
    if prompt_tokens <= 0:
        return reject("prompt_empty", "the prompt is empty")
    if limits.max_input_tokens is not None and prompt_tokens > limits.max_input_tokens:
        return reject("prompt_too_long",
                      f"the prompt has {prompt_tokens} tokens; the limit is {limits.max_input_tokens}")
    if max_tokens <= 0:
        return reject("max_tokens_invalid", f"max_tokens must be at least 1, got {max_tokens}")
    if limits.max_tokens_limit is not None and max_tokens > limits.max_tokens_limit:
        return reject("max_tokens_too_large", f"max_tokens is {max_tokens}; the limit is {limits.max_tokens_limit}")
    if limits.max_model_len is not None and prompt_tokens + max_tokens > limits.max_model_len:
        return reject("context_length_exceeded", f"{prompt_tokens} prompt tokens + {max_tokens} max_tokens exceed "
                                                 f"the model's context of {limits.max_model_len}")
    return ADMITTED


class RateMeter:
    """Events per second, exponentially weighted over a time constant `tau_s` (O(1) per event).

    Each event adds 1/tau to a value that decays as exp(-dt/tau); for a steady Poisson stream its
    expectation is the stream's rate.
    """

    def __init__(self, tau_s: float = 10.0, now: float = 0.0) -> None:
        if tau_s <= 0:
            raise ValueError(f"tau_s must be positive, got {tau_s}")
        self.tau_s = tau_s
        self._value = 0.0
        self._last = now

    def observe(self, now: float, count: float = 1.0) -> None:
        self._decay(now)
        self._value += count / self.tau_s

    def rate(self, now: float) -> float:
        self._decay(now)
        return self._value

    def _decay(self, now: float) -> None:
        if now > self._last:
            self._value *= math.exp(-(now - self._last) / self.tau_s)
            self._last = now
