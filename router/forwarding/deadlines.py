"""Many timeouts on one timer: the deadlines of every request a router process holds, checked each tick.

Why: on uvloop each ``asyncio.timeout`` block costs ~9 us (a libuv timer started and stopped, a
Timeout object, two running-loop look-ups) and a proxied request passes four to six of them (body
read, whole call, each wait for the worker's bytes), nearly all of which end long before they expire.
Here a deadline is one heap entry; one timer per loop ticks every ``TICK_S`` while any deadline is
pending and fires those that are due. A deadline therefore fires up to ``TICK_S`` late (never early),
which is nothing against the router's timeouts (seconds; see router.config.Timeouts).

``Deadlines.of(loop)`` is the loop's instance. ``at(when, callback)`` schedules; ``Deadline.cancel``
drops it (cancelled entries leave the heap when they reach its top, or all at once when they
outnumber the live ones, so a long timeout that is cancelled at once costs no memory for long).
A new deadline waits in a plain list until the next tick and enters the heap only if it is still
pending then: most are cancelled within a tick (a worker's answer, a request's next bytes), and those
never cost a heap push and pop.
``Expiry`` is ``asyncio.timeout``'s behaviour on top: the task is cancelled when the deadline passes
and the block raises TimeoutError.
``Watchdog`` is the same for one task's successive waits (a stream's reads), each with its own bound,
on one heap entry that is moved only when it fires early.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import Callable

TICK_S = 0.005   # how late a deadline may fire
_COMPACT_AT = 1024   # cancelled entries tolerated in the heap before it is rebuilt without them


class Deadline:
    __slots__ = ("when", "_callback", "_owner")

    def __init__(self, when: float, callback: Callable[[], None], owner: Deadlines):
        self.when = when
        self._callback: Callable[[], None] | None = callback
        self._owner = owner

    @property
    def pending(self) -> bool:
        return self._callback is not None

    def cancel(self) -> None:
        if self._callback is not None:
            self._callback = None   # drops what the callback holds (a task, a connection) at once
            self._owner.live -= 1

    def _fire(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            self._owner.live -= 1
            callback()


class Deadlines:
    # Per loop, holding it weakly (a closed loop goes with its deadlines); the last one looked up is
    # answered without a weak-reference look-up (a router process has one loop).
    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = weakref.WeakKeyDictionary()
    _last: Deadlines | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Deadlines:
        last = cls._last
        if last is not None and last._loop() is loop:
            return last
        own = cls._by_loop.get(loop)
        if own is None:
            own = cls._by_loop[loop] = cls(loop)
        cls._last = own
        return own

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)
        self.live = 0   # deadlines neither fired nor cancelled
        self._heap: list[tuple[float, int, Deadline]] = []
        self._fresh: list[Deadline] = []   # scheduled since the last tick, not yet in the heap
        self._order = itertools.count()   # ties: first scheduled, first fired (and no Deadline comparisons)
        self._ticking = False

    def at(self, when: float, callback: Callable[[], None]) -> Deadline:
        """Call `callback` at loop time `when` (up to TICK_S later) unless cancelled first."""
        deadline = Deadline(when, callback, self)
        self._fresh.append(deadline)
        self.live += 1
        if not self._ticking:
            self._ticking = True
            self.loop.call_later(TICK_S, self._tick)
        return deadline

    def after(self, seconds: float, callback: Callable[[], None]) -> Deadline:
        return self.at(self.loop.time() + seconds, callback)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        assert loop is not None, "deadlines of a loop that is gone"
        return loop

    def _tick(self) -> None:
        heap = self._heap
        fresh = self._fresh
        if fresh:   # in the order scheduled, so equal times still fire first scheduled, first fired
            order = self._order
            for deadline in fresh:
                if deadline._callback is not None:
                    heapq.heappush(heap, (deadline.when, next(order), deadline))
            fresh.clear()
        if len(heap) - self.live > max(_COMPACT_AT, 2 * self.live):
            heap[:] = [entry for entry in heap if entry[2].pending]
            heapq.heapify(heap)
        loop = self.loop   # a property: read once a tick (a stream's watchdog keeps the tick running)
        now = loop.time()
        while heap and (heap[0][0] <= now or not heap[0][2].pending):
            heapq.heappop(heap)[2]._fire()
        if self.live:
            loop.call_later(TICK_S, self._tick)
        else:
            heap.clear()   # only cancelled entries are left
            self._ticking = False


class Expiry:
    """``async with asyncio.timeout(seconds)`` on a Deadlines tick: past the deadline the current task is
    cancelled and the block raises TimeoutError; ``expire_now`` cuts it short the same way (from any
    task); ``when`` is the deadline's loop time. A sync context manager: entering awaits nothing."""
    __slots__ = ("_seconds", "_task", "_deadline", "_cancelling", "_expired", "when")

    def __init__(self, seconds: float | None):
        self._seconds = seconds
        self._deadline: Deadline | None = None
        self._expired = False
        self.when: float | None = None

    def __enter__(self) -> Expiry:
        task = asyncio.current_task()
        assert task is not None, "Expiry is used inside a task"
        self._task = task
        self._cancelling = task.cancelling()
        if self._seconds is not None:
            loop = task.get_loop()
            self.when = loop.time() + self._seconds
            self._deadline = Deadlines.of(loop).at(self.when, self._expire)
        return self

    def expire_now(self) -> None:
        if self._deadline is not None and self._deadline.pending:
            self._deadline.cancel()
            self._expire()

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


class Watchdog:
    """``Expiry`` for one task's successive waits (a stream's reads), each bounded by ``seconds``.

    An Expiry per wait puts a heap entry in and takes it out again, ten Python calls a read. A watchdog
    keeps one entry: armed at a wait's start when none is pending (or when it would come too late for
    this wait's bound), and when it fires during a later wait it is moved to that wait's own deadline.
    A wait therefore costs a clock read, and a stream one entry per ``seconds`` or so. As with Expiry,
    an overdue wait's task is cancelled and the wait raises TimeoutError; ``expire_now`` does that at
    once (from any task); ``since`` is the current wait's start (None between waits).
    Use: set ``seconds``, then ``with watchdog: await ...``; always from the same task.
    """
    __slots__ = ("seconds", "since", "_task", "_loop", "_deadlines", "_deadline", "_cancelling", "_expired")

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.since: float | None = None
        self._task: asyncio.Task | None = None
        self._deadline: Deadline | None = None
        self._expired = False

    def __enter__(self) -> Watchdog:
        task = self._task
        if task is None:
            task = self._task = asyncio.current_task()
            assert task is not None, "Watchdog is used inside a task"
            self._loop = task.get_loop()
            self._deadlines = Deadlines.of(self._loop)
        self._cancelling = task.cancelling()
        self.since = now = self._loop.time()
        due = now + self.seconds
        deadline = self._deadline
        if deadline is None or deadline.when > due:   # none pending, or too late for this wait's bound
            if deadline is not None:
                deadline.cancel()
            self._deadline = self._deadlines.at(due, self._check)
        return self

    def _check(self) -> None:
        self._deadline = None
        if self.since is None:
            return   # between waits: the next one arms it again
        due = self.since + self.seconds
        if self._loop.time() >= due:
            self._expire()
        else:
            self._deadline = self._deadlines.at(due, self._check)

    def expire_now(self) -> None:
        if self.since is not None and not self._expired:
            self._expire()

    def _expire(self) -> None:
        assert self._task is not None   # set by the first wait; expiring happens only during one
        self._expired = True
        self._task.cancel()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.since = None
        if self._expired:
            self._expired = False
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def close(self) -> None:
        """No more waits: drop the pending entry."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
