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
from collections.abc import Callable

import msgspec

from kvlab.wire.background import Background
from workers.core.engine import Engine, Finished, StepResult
from workers.core.request import RemotePrefill, SamplingParams


class TokenOut(msgspec.Struct):
    token: int
    time: float   # emulated time the token was produced


class RequestStream:
    """Tokens of one request as they are produced, then its Finished record.

    A reader takes one token at a time (``async for``) or several at once (``take``). The driver
    wakes a waiting reader only once it has as many tokens as it asked for, or the request ended:
    a stream coalescing n tokens per chunk costs one task wake-up per chunk, not per token.
    """

    __slots__ = ("request_id", "finished", "_items", "_need", "_waiter")

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.finished: Finished | None = None
        self._items: deque[TokenOut | Finished] = deque()
        self._need = 1
        self._waiter: asyncio.Future | None = None

    def push(self, item: TokenOut | Finished) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (
                len(self._items) >= self._need or isinstance(item, Finished)):
            waiter.set_result(None)

    async def take(self, n: int = 1) -> list[TokenOut]:
        """At least `n` tokens (fewer only when the request ended; [] after the last), without waiting
        when they are already here; everything already delivered comes along."""
        items = self._items
        while not self._ready(n):
            self._need = n
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out: list[TokenOut] = []
        while items:
            item = items.popleft()
            if isinstance(item, Finished):
                self.finished = item
                items.clear()
                break
            out.append(item)
        return out

    def _ready(self, n: int) -> bool:
        items = self._items
        return self.finished is not None or len(items) >= n or (bool(items) and isinstance(items[-1], Finished))

    @property
    def outcome(self) -> Finished:
        """The Finished record, once reading has ended (it ends only on one)."""
        assert self.finished is not None, "the stream has not ended"
        return self.finished

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenOut:
        if self.finished is not None:
            raise StopAsyncIteration
        if not self._items:
            await self._wait_any()
        item = self._items.popleft()
        if isinstance(item, Finished):
            self.finished = item
            self._items.clear()
            raise StopAsyncIteration
        return item

    async def _wait_any(self) -> None:
        """Wait until at least one item is here."""
        while not self._items:
            self._need = 1
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


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
            stream.push(Finished(request_id=request_id, reason="abort", prompt_tokens=0,
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
        except TimeoutError:
            pass

    def _deliver(self, result: StepResult) -> None:
        for request_id, token in result.tokens:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.push(TokenOut(token, result.end))
        for fin in result.finished:
            stream = self._streams.pop(fin.request_id, None)
            if stream is not None:
                stream.push(fin)
        for hook in self.step_hooks:
            hook(result)
