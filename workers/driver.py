"""Runs the pure engine against the wall clock (asyncio), stretched by a time-scale factor.

The engine keeps its own intended schedule: while busy, each step starts when the previous one
ends in emulated time. The driver sleeps until each step's end on the wall clock, then delivers
its tokens. If the host cannot keep up, tokens go out late; that lateness is the lag, measured per
step and exposed so that results from an overloaded host are flagged rather than trusted.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

import msgspec

from kvlab.wire.background import Background
from workers.core.engine import Engine, Finished, StepResult
from workers.core.request import RemotePrefill, SamplingParams


class TokenOut(msgspec.Struct):
    token: int
    time: float   # emulated time the token was produced


class RequestStream:
    """Tokens of one request as they are produced, then its Finished record."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: asyncio.Queue[TokenOut | Finished] = asyncio.Queue()
        self.finished: Finished | None = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenOut:
        if self.finished is not None:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, Finished):
            self.finished = item
            raise StopAsyncIteration
        return item


class LagStats:
    """Lag of step deliveries behind the intended schedule, in wall seconds."""

    def __init__(self, window: int = 512):
        self.recent: deque[float] = deque(maxlen=window)
        self.max = 0.0
        self.last = 0.0

    def record(self, lag: float) -> None:
        self.last = lag
        self.recent.append(lag)
        self.max = max(self.max, lag)

    def p99(self) -> float:
        if not self.recent:
            return 0.0
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class EngineDriver:
    def __init__(self, engine: Engine, time_scale: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.engine = engine
        self.time_scale = time_scale
        self.clock = clock
        self._t0 = clock()
        self._virtual = 0.0                 # end of the last step, emulated seconds
        self._streams: dict[str, RequestStream] = {}
        self._wake = asyncio.Event()
        self.lag = LagStats()
        self.step_hooks: list[Callable[[StepResult], None]] = []
        self._background = Background(self.run)

    # -- clocks ------------------------------------------------------------------------------
    def emulated_now(self) -> float:
        return (self.clock() - self._t0) / self.time_scale

    def _wall_at(self, emulated: float) -> float:
        return self._t0 + emulated * self.time_scale

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, priority: int = 0,
               salt: str | None = None, remote: RemotePrefill | None = None) -> RequestStream:
        """Queue a request; raises EngineError or QueueFull synchronously for the server to map."""
        now = max(self.emulated_now(), self._virtual)
        self.engine.add_request(request_id, prompt, params, now, priority, salt, remote)
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self._wake.set()
        return stream

    def wake(self) -> None:
        """Something outside a step changed the engine (blocks freed, KV released): look again now."""
        self._wake.set()

    def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        self.engine.abort(request_id)
        self.wake()
        if stream is not None and stream.finished is None:
            stream.queue.put_nowait(Finished(request_id=request_id, reason="abort", prompt_tokens=0,
                                             output_tokens=0, cached_tokens=0))

    # -- the loop ----------------------------------------------------------------------------
    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def run(self) -> None:
        busy = False
        while True:
            # Back-to-back steps follow the intended schedule; after idling, resume at "now".
            now = self._virtual if busy else max(self._virtual, self.emulated_now())
            result = self.engine.step(now)
            busy = result.duration > 0.0
            if not busy:
                self._deliver(result)
                await self._idle(result.next_wakeup)
                continue
            await self._sleep_until(self._wall_at(result.end))
            self.lag.record(self.clock() - self._wall_at(result.end))
            self._virtual = result.end
            self._deliver(result)

    async def _sleep_until(self, wall: float) -> None:
        """Sleep to a wall time; loop timers may fire early (libuv: 1 ms resolution), so top up.
        Always yields once, so a driver behind schedule never starves the server."""
        await asyncio.sleep(max(0.0, wall - self.clock()))
        while (left := wall - self.clock()) > 0:
            await asyncio.sleep(left)

    async def _idle(self, next_wakeup: float | None) -> None:
        self._wake.clear()
        if self.engine.has_work() and next_wakeup is None:
            await asyncio.sleep(0)   # work became runnable during delivery
            return
        timeout = None if next_wakeup is None else max(0.0, self._wall_at(next_wakeup) - self.clock())
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _deliver(self, result: StepResult) -> None:
        for request_id, token in result.tokens:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(TokenOut(token, result.end))
        for fin in result.finished:
            stream = self._streams.pop(fin.request_id, None)
            if stream is not None:
                stream.queue.put_nowait(fin)
        for hook in self.step_hooks:
            hook(result)
