"""A classic token bucket: `rate` tokens a second refill it up to `burst`; taking needs enough tokens.

Over any window of length t it admits at most rate * t + burst: the bucket can start the window full
(burst) and refills by rate * t during it. Time is an argument (seconds, any monotonic origin), so
the HTTP router passes its clock and the simulator its virtual one.

Reservations: a request is charged up front for what it may use (prompt + max_tokens) and settled
when it ends. ``reconcile`` refunds what it did not use, or charges what it used beyond the
reservation; that charge may drive the level below zero, a debt that delays later requests, because
the tokens were really consumed.
"""
from __future__ import annotations

import math


class TokenBucket:
    __slots__ = ("rate", "burst", "_level", "_last")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"token bucket needs rate > 0 and burst > 0 (got rate={rate}, burst={burst})")
        self.rate = float(rate)
        self.burst = float(burst)
        self._level = self.burst  # start full: a new tenant may burst at once
        self._last = now

    def level(self, now: float) -> float:
        self._refill(now)
        return self._level

    def try_take(self, amount: float, now: float) -> tuple[bool, float]:
        """Take `amount` if the bucket holds it: (True, 0.0); else (False, seconds until it would).

        An amount above `burst` can never fit: (False, inf), so the caller can reject it outright.
        """
        self._refill(now)
        if amount <= self._level:
            self._level -= amount
            return True, 0.0
        if amount > self.burst:
            return False, math.inf
        return False, (amount - self._level) / self.rate

    def refund(self, amount: float, now: float) -> None:
        """Give back tokens taken but not used (never above burst)."""
        self._refill(now)
        self._level = min(self.burst, self._level + amount)

    def reconcile(self, reserved: float, used: float, now: float) -> None:
        """Settle a reservation: refund the unused part, or charge the overrun (debt allowed)."""
        if used <= reserved:
            self.refund(reserved - used, now)
        else:
            self._refill(now)
            self._level -= used - reserved

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        if elapsed > 0:  # a clock that steps back must not mint tokens later
            self._level = min(self.burst, self._level + elapsed * self.rate)
            self._last = now
