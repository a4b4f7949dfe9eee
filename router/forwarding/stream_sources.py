"""Where a stream's events come from during one attempt: one worker, or a P/D pair (router.forwarding.pd)."""
from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from router.forwarding.upstream import UpstreamStream
from router.pool.worker_pool import Worker


class Source(Protocol):
    """Where a stream's events come from during one attempt."""
    worker_id: str
    rewrite: bool

    async def next_events(self) -> list[bytes]: ...   # those that arrived, after waiting; []: ended cleanly
    async def aclose(self) -> None: ...


class ColocatedSource:
    """One worker's SSE stream; its in-flight charge is released when the stream is closed."""
    next_events: Callable[[], Coroutine[Any, Any, list[bytes]]]

    def __init__(self, stream: UpstreamStream, worker: Worker, rewrite: bool, release: Callable[[Worker], None]):
        self.stream = stream
        self.next_events = stream.next_events   # the stream's own, not a call around it: awaited per read
        self.worker = worker
        self.worker_id = worker.id
        self.rewrite = rewrite
        self._release = release
        self._closed = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.stream.aclose()
            self._release(self.worker)
