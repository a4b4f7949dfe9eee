"""Sliding windows over timestamped data, the building blocks of the cluster view (router.cluster_view).

- ``SnapshotWindow``: cumulative snapshots (counters such as busy seconds); a window's figure is the
  newest snapshot minus the one at the window's start.
- ``SampleWindow``: individual observations (TTFT, ITL); a window's figure is a percentile of them.

Both forget what no window up to ``retain_s`` can need, so memory is bounded by the sampling rate;
``SampleWindow`` also caps its sample count, so a burst of tokens cannot grow it without bound.
Time is whatever monotonic clock the caller uses; nothing here reads a clock.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Generic, TypeVar

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
    def __init__(self, retain_s: float, max_samples: int = 20_000):
        self.retain_s = retain_s
        self._items: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, t: float, value: float) -> None:
        self._items.append((t, value))

    def values(self, now: float, window_s: float) -> list[float]:
        while self._items and self._items[0][0] < now - self.retain_s:
            self._items.popleft()
        start = now - window_s
        return [v for t, v in self._items if t >= start]


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of an ascending list; None when it is empty."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]
