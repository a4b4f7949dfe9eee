"""TTFT and ITL of the streams the router relays, as its clients see them, in emulated seconds.

The proxy gives each stream a ``StreamClock`` and tells it how many tokens the client has received
after every write to the client (one event, or several that arrived together). TTFT runs from the
moment the router's handler started (``Job.received``) to the first token; ITL is the gap between
token-carrying writes, shared among the tokens a write carries, unless the worker named each token's
own gap (a coalescing worker's ``token_gaps``, already emulated seconds). Wall seconds become emulated
ones through the serving worker's time scale, so the figures
compare with the workers' own vLLM histograms and with SLOs written in emulated time.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class LatencySink(Protocol):
    def ttft(self, seconds: float) -> None: ...
    def itl(self, seconds: float) -> None: ...
    def itls(self, gaps: list[float]) -> None: ...


class StreamTimings:
    """Hands out one clock per stream; `scale_of(worker_id)` is that worker's time scale."""

    def __init__(self, sink: LatencySink, scale_of: Callable[[str], float],
                 clock: Callable[[], float] = time.perf_counter):
        self.sink = sink
        self.scale_of = scale_of
        self.clock = clock

    def start(self, received: float) -> StreamClock:
        return StreamClock(self, received)


class StreamClock:
    __slots__ = ("_timings", "_last", "_count")

    def __init__(self, timings: StreamTimings, received: float):
        self._timings = timings
        self._last = received   # same clock as Job.received (perf_counter)
        self._count = 0

    def seen(self, worker_id: str, count: int, gaps: list[float] | None = None) -> None:
        """The client has now received `count` tokens in all; `worker_id` produced the latest; `gaps`:
        the emulated gaps the worker stated for tokens of this write (the newest ones)."""
        new = count - self._count
        if new <= 0:
            return
        t = self._timings
        now = t.clock()
        gap = (now - self._last) / t.scale_of(worker_id)
        timed = new - 1 if self._count == 0 else new   # the stream's first token has no gap, only a TTFT
        if self._count == 0:
            t.sink.ttft(gap)
        if gaps and len(gaps) >= timed:
            if timed:
                t.sink.itls(gaps[len(gaps) - timed:])
        elif self._count > 0:
            for _ in range(new):
                t.sink.itl(gap / new)   # tokens arriving with the first one have no gap of their own
        self._last, self._count = now, count
