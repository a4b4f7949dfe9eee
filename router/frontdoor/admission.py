"""Admission before routing: request-size limits and load shedding against the TTFT SLO.

Shedding threshold, from Little's law (L = lambda * W) applied to the cluster-wide wait queue:
requests leave the queue (start prefill) at rate lambda, so a request that joins behind Q waiting
requests waits about W_q = Q / lambda before its prefill starts, and its first token comes about
W_q + t_prefill after arrival. Keeping TTFT within the SLO therefore needs

    Q / lambda + t_prefill <= ttft_slo   <=>   Q <= lambda * (ttft_slo - t_prefill)

so a request is shed (answered early, 503/429 with Retry-After) when the queue already exceeds
Q_max = headroom * lambda * (ttft_slo - t_prefill): queueing it would only turn into an SLO miss.
The rate to pass is the rate requests leave the queue; below saturation that equals the arrival
rate (measure either with ``RateMeter``); in overload the arrival rate overstates it, so pass the
dequeue rate when the caller has it. Retry-After is the time the excess takes to drain,
(Q - Q_max) / lambda. ``min_queue`` keeps a cold or idle cluster (lambda ~ 0) from shedding a burst:
below saturation the queue drains at the cluster's capacity, which the arrival rate understates.
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


class LoadShedder:
    """Sheds when the cluster-wide queue exceeds what the TTFT SLO allows (see module docstring)."""

    def __init__(self, ttft_slo_s: float, prefill_s: float = 0.0, headroom: float = 1.0,
                 min_queue: float = 8.0) -> None:
        if ttft_slo_s <= prefill_s:
            raise ValueError(f"the TTFT SLO ({ttft_slo_s} s) must exceed the prefill time ({prefill_s} s)")
        self.ttft_slo_s = ttft_slo_s
        self.prefill_s = prefill_s
        self.headroom = headroom
        self.min_queue = min_queue

    def max_queue(self, rate: float) -> float:
        """Q_max = headroom * rate * (ttft_slo - t_prefill), floored at min_queue."""
        return max(self.min_queue, self.headroom * rate * (self.ttft_slo_s - self.prefill_s))

    def check(self, queue_depth: float, rate: float) -> Admission:
        limit = self.max_queue(rate)
        if queue_depth <= limit:
            return ADMITTED
        drain = (queue_depth - limit) / rate if rate > 0 else self.ttft_slo_s
        return reject("overloaded", f"{queue_depth:g} requests are queued; beyond {limit:.0f} the first token "
                                    f"would miss the {self.ttft_slo_s:g} s TTFT target", retry_after=drain)


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
