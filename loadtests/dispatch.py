"""Open-loop dispatch: each request leaves at its scheduled time in a greenlet of its own.

Locust's users are closed loops: a user waits for its response before sending again, so a slow server
slows its own load down and queueing never shows (coordinated omission). Capacity is measured with
arrivals that do not wait: here the schedule alone decides when a request is sent, however many are
still streaming. A cap on requests in flight protects the load generator; requests dropped at the cap
are counted, never silently skipped.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Group

Send = Callable[[Any, dict[str, Any]], None]   # (item, extra record fields) -> None; runs in its own greenlet


@dataclass
class DispatchStats:
    sent: int = 0
    dropped: int = 0
    in_flight: int = 0
    measured_in_flight: int = 0   # in flight and scheduled before measured_until
    max_lag_s: float = 0.0        # worst lateness of a send behind its schedule (a slow load generator)


class OpenLoop:
    def __init__(self, send: Send, max_in_flight: int = 4096, on_drop: Send | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.send = send
        self.on_drop = on_drop
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.stats = DispatchStats()
        self._measured_done = Event()
        self._group = Group()

    def run(self, schedule: Iterable[tuple[float, Any]], measured_until: float | None = None,
            on_start: Callable[[float], None] | None = None) -> DispatchStats:
        """Send every (wall offset s, item) on time, then wait for all of them to finish.

        With `measured_until`: arrivals after it only keep the load on; the run stops as soon as every
        request scheduled before it has finished, or when the schedule runs out, whichever is first,
        and requests still streaming then are interrupted (their senders record what they have).
        """
        t0 = self.clock()
        if on_start is not None:
            on_start(time.time())
        for at, item in schedule:
            measured = measured_until is None or at < measured_until
            if not measured and self._measured_done.is_set():
                break
            delay = t0 + at - self.clock()
            if delay > 0 and self._wait(delay, measured):
                break
            self._launch(item, at, self.clock() - t0, measured)
        if measured_until is None:
            self._group.join()
        else:
            gevent.sleep(0)   # let the last-spawned senders start: a greenlet killed unstarted records nothing
            self._group.kill(block=True, timeout=10)
        return self.stats

    def _wait(self, delay: float, measured: bool) -> bool:
        """Sleep until the next send; True if the measured requests all finished meanwhile (stop)."""
        if measured:
            gevent.sleep(delay)
            return False
        return self._measured_done.wait(delay)

    def _launch(self, item: Any, at: float, now: float, measured: bool) -> None:
        s = self.stats
        s.max_lag_s = max(s.max_lag_s, now - at)
        if s.in_flight >= self.max_in_flight:
            s.dropped += 1
            if self.on_drop is not None:
                self.on_drop(item, {"sched": at, "lag": now - at, "measured": measured})
            return
        s.sent += 1
        s.in_flight += 1
        if measured:
            s.measured_in_flight += 1
            self._measured_done.clear()
        self._group.spawn(self._send_one, item, at, now, measured)

    def _send_one(self, item: Any, at: float, now: float, measured: bool) -> None:
        try:
            self.send(item, {"sched": at, "lag": now - at, "measured": measured})
        finally:
            self.stats.in_flight -= 1
            if measured:
                self.stats.measured_in_flight -= 1
                if self.stats.measured_in_flight == 0:
                    self._measured_done.set()
