"""A request's latency law: a prefill queue's wait and own steps plus an independent shift (slot
wait, KV handoff, decode time), and mixtures of request classes that reach their first token by
different paths (conditional disaggregation: prefilled on the decode worker, or on the prefill pool).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from emulator.planner import dist
from emulator.planner.prefill_queue import PrefillQueue


@dataclass(frozen=True)
class QueueLaw:
    """Wait + own prefill steps in `queue`, plus `shift` (None: nothing after the first token)."""
    queue: PrefillQueue
    shift: dist.Points | None = None

    @property
    def stable(self) -> bool:
        return self.queue.stable

    def quantile(self, q: float) -> float:
        return self.queue.ttft_quantile(q, self.shift)

    def mean(self) -> float:
        return self.queue.ttft_mean(self.shift)

    def cdf(self, t: float) -> float:
        return self.queue.ttft_cdf(t, self.shift)

    def cumulative(self) -> tuple[np.ndarray, float]:
        """(CDF at each cell edge k x h, h): the law as `dist.grid_quantile` reads it."""
        pmf, h = self.queue.grid(self.shift)
        return np.cumsum(pmf), h


@dataclass(frozen=True)
class Mixture:
    """Request classes in proportion: (share of requests, their law)."""
    parts: tuple[tuple[float, QueueLaw], ...]

    @property
    def stable(self) -> bool:
        return all(law.stable for w, law in self.parts if w > 0)

    def mean(self) -> float:
        return sum(w * law.mean() for w, law in self.parts if w > 0)

    def cdf(self, t: float) -> float:
        return sum(w * law.cdf(t) for w, law in self.parts if w > 0)

    def quantile(self, q: float) -> float:
        """Where the mixed CDF (each part's, linear within its cells) reaches q: bisection between the
        parts' own q-quantiles, which bracket it."""
        if not self.stable:
            return math.inf
        grids = [(w, *law.cumulative()) for w, law in self.parts if w > 0]

        def cdf(t: float) -> float:
            return sum(w * float(np.interp(t / h, np.arange(len(c)), c)) for w, c, h in grids)

        if cdf(math.inf) < q:
            return math.inf
        own = [law.quantile(q) for w, law in self.parts if w > 0]
        lo, hi = min(own), max(own)
        if not math.isfinite(hi):
            hi = max(len(c) * h for _, c, h in grids)
        for _ in range(60):
            if hi - lo <= 1e-9 * max(hi, 1e-12):
                break
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
        return hi
