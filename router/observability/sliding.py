"""Sliding windows over timestamped data, the building blocks of the cluster view (router.observability.cluster_view).

- ``SnapshotWindow``: cumulative snapshots (counters such as busy seconds); a window's figure is the
  newest snapshot minus the one at the window's start.
- ``SampleWindow``: individual observations (TTFT, ITL); a window's figure is a percentile of them.

``SnapshotWindow`` forgets what no window up to ``retain_s`` can need, so its memory is bounded by the
sampling rate. ``SampleWindow`` is a fixed numpy ring (every token of a busy cluster lands there, and
its percentiles are computed on the router's event loop, so both must stay cheap); when more samples
arrive within a window than it holds, the window's percentiles are those of the newest ones.
Time is whatever monotonic clock the caller uses; nothing here reads a clock.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


class SnapshotWindow(Generic[T]):
    def __init__(self, retain_s: float):
        self.retain_s = retain_s
        self._items: deque[tuple[float, T]] = deque()

    def add(self, t: float, item: T) -> None:
        self._items.append((t, item))
        # Keep one snapshot at or before the oldest window start: it is that window's baseline.
        while len(self._items) > 2 and self._items[1][0] <= t - self.retain_s:
            self._items.popleft()

    def clear(self) -> None:
        self._items.clear()

    def latest(self) -> tuple[float, T] | None:
        return self._items[-1] if self._items else None

    def span(self, now: float, window_s: float) -> tuple[tuple[float, T], tuple[float, T]] | None:
        """(baseline, newest) for the window ending at `now`; None with fewer than two snapshots.

        The baseline is the newest snapshot at or before the window's start, else the oldest one:
        a young series reports over what it has rather than nothing.
        """
        if len(self._items) < 2:
            return None
        start = now - window_s
        base = self._items[0]
        for item in self._items:
            if item[0] > start:
                break
            base = item
        newest = self._items[-1]
        return (base, newest) if base is not newest else None


class SampleWindow:
    def __init__(self, max_samples: int = 20_000):
        self._t = np.empty(max_samples)
        self._v = np.empty(max_samples)
        self._next = 0
        self._size = 0

    def add(self, t: float, value: float, n: int = 1) -> None:
        """`n` samples of `value` at `t` (the oldest drop out once the window is full)."""
        size = len(self._t)
        n = min(n, size)
        i = self._next
        first = min(n, size - i)
        self._t[i:i + first], self._v[i:i + first] = t, value
        if n > first:   # wrap around
            self._t[:n - first], self._v[:n - first] = t, value
        self._next = (i + n) % size
        self._size = min(self._size + n, size)

    def values(self, now: float, window_s: float) -> np.ndarray:
        """Samples taken in the window ending at `now`, in no particular order."""
        t, v = self._t[:self._size], self._v[:self._size]
        return v[t >= now - window_s]


def percentiles(values: Sequence[float] | np.ndarray, qs: Sequence[float]) -> list[float | None]:
    """Nearest-rank percentiles (each q in 0..1) of unordered values; None each when there are none."""
    n = len(values)
    if n == 0:
        return [None] * len(qs)
    ranks = [max(1, math.ceil(q * n)) - 1 for q in qs]
    part = np.partition(np.asarray(values, dtype=float), ranks)   # O(n): no full sort
    return [float(part[r]) for r in ranks]
