"""Where a stream's events come from during one attempt: one worker, or a P/D pair (router.forwarding.pd)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from router.forwarding.upstream import UpstreamStream
from router.pool.worker_pool import Worker


class Source(Protocol):
    """Where a stream's events come from during one attempt."""
    worker_id: str
    rewrite: bool

    @property
    def buffered(self) -> bool: ...    # next_event would return without waiting
    async def next_event(self) -> bytes | None: ...
    async def aclose(self) -> None: ...


class ColocatedSource:
    """One worker's SSE stream; its in-flight charge is released when the stream is closed."""

    def __init__(self, stream: UpstreamStream, worker: Worker, rewrite: bool, release: Callable[[Worker], None]):
        self.stream = stream
        self.worker = worker
        self.worker_id = worker.id
        self.rewrite = rewrite
        self._release = release
        self._closed = False

    @property
    def buffered(self) -> bool:
        return self.stream.buffered

    async def next_event(self) -> bytes | None:
        return await self.stream.next_event()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.stream.aclose()
            self._release(self.worker)
