"""One HTTP call to one worker, with a timeout on every wait, and failures sorted by what they mean.

``UpstreamFailure.dead`` separates a worker that is gone (refused, reset, cut mid-stream, silent past
a timeout: take it out of routing) from one that answered with an error status (5xx: try another
worker but keep this one; 4xx: the request is at fault, so the client gets the worker's answer).
"""
from __future__ import annotations

import asyncio
from typing import cast

import httpx

from kvlab.wire.openai_api import ApiError
from router.config import Timeouts
from router.forwarding.deadlines import Expiry, Watchdog
from router.forwarding.sse import DONE, EventSplitter, data_of
from router.forwarding.transport import LeanResponse, LeanTransport

JSON_HEADERS = {"content-type": "application/json"}
# After [DONE] only the body's end (chunked terminator) is left, sent at once by the worker: waiting
# this long for it lets the connection go back to the pool rather than be closed and reopened by
# the next request (a loopback connect costs both processes ~0.1 ms; over a network, a round trip).
DRAIN_S = 0.5


class UpstreamFailure(Exception):
    def __init__(self, worker_id: str, reason: str, *, dead: bool, status: int | None = None,
                 body: bytes = b""):
        super().__init__(f"worker {worker_id}: {reason}")
        self.worker_id = worker_id
        self.reason = reason
        self.dead = dead
        self.status = status
        self.body = body

    def refusal(self) -> WorkerRefused | None:
        """The worker's own refusal of the request (4xx other than 408/429, where retrying cannot help),
        or None for a failure another attempt may get past."""
        status = self.status
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            return WorkerRefused(status, self.body)
        return None


class WorkerRefused(Exception):
    """A worker rejected the request itself (4xx): the client gets the worker's answer unchanged."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"worker answered {status}")
        self.status = status
        self.body = body


def exhausted(last: UpstreamFailure | None) -> ApiError:
    """The answer when every attempt failed: 503, try again shortly."""
    detail = f" (last: {last})" if last else ""
    return ApiError(503, f"no worker could complete the request{detail}", type_="server_error",
                    code="upstream_unavailable", headers={"Retry-After": "1"})


def _failure(worker_id: str, exc: BaseException) -> UpstreamFailure:
    reason = "timeout" if isinstance(exc, (httpx.TimeoutException, TimeoutError)) else type(exc).__name__
    return UpstreamFailure(worker_id, reason, dead=True)


class Upstream:
    """The router's HTTP client side, shared by every request.

    Control-plane calls (probes, KV events, releases) use the httpx.AsyncClient. Proxied requests go
    straight to that client's transport with the same timeouts: the client layer (URL merging, cookie
    jar, auth and redirect hooks) costs ~70 us a request and does nothing for a proxy, whose URLs are
    absolute and whose worker sets no cookies; the router's LeanTransport also skips httpx's request
    and response models (``LeanTransport.post``; a non-streaming call, ``LeanTransport.fetch``, which
    also bounds the whole call by its own waits), any other transport gets httpx Requests.
    """

    def __init__(self, client: httpx.AsyncClient, transport: httpx.AsyncBaseTransport, timeouts: Timeouts):
        self.client = client
        self.transport = transport
        self.timeouts = timeouts
        self.open: dict[str, set[UpstreamStream]] = {}   # open streams by worker, to abandon when it goes down
        # The read timeout bounds each wait for bytes; before the first one that includes the
        # worker's queueing and prefill, so it gets the longer first-byte bound. Between stream
        # chunks UpstreamStream applies the shorter idle bound itself.
        self._timeout = httpx.Timeout(connect=timeouts.connect_s, read=timeouts.first_byte_s,
                                      write=timeouts.idle_s, pool=timeouts.connect_s).as_dict()
        lean = transport if isinstance(transport, LeanTransport) else None
        self._lean = lean.post if lean is not None else None
        self._fetch = lean.fetch if lean is not None else None

    async def _send(self, url: httpx.URL, body: bytes) -> httpx.Response | LeanResponse:
        if self._lean is not None:   # the router's own transport: no httpx models on the hot path
            return await self._lean(url, body, self._timeout)
        request = httpx.Request("POST", url, content=body, headers=JSON_HEADERS, extensions={"timeout": self._timeout})
        return await self.transport.handle_async_request(request)

    async def post(self, worker_id: str, url: httpx.URL, body: bytes) -> bytes:
        """A non-streaming call; the worker's 200 body, or UpstreamFailure."""
        try:
            if self._fetch is not None:   # the whole call bounded inside the transport's own waits
                status, content = await self._fetch(url, body, self._timeout, self.timeouts.total_s)
            else:
                with Expiry(self.timeouts.total_s):
                    response = await self._send(url, body)
                    try:
                        content = await response.aread()
                    finally:
                        await response.aclose()
                status = response.status_code
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            raise _failure(worker_id, exc) from exc
        if status != 200:
            raise UpstreamFailure(worker_id, f"status {status}", dead=False, status=status, body=content)
        return content

    async def open_stream(self, worker_id: str, url: httpx.URL, body: bytes) -> UpstreamStream:
        """Send a streaming request and wait for the response headers."""
        try:
            response = await self._send(url, body)
        except (httpx.HTTPError, OSError) as exc:
            raise _failure(worker_id, exc) from exc
        if response.status_code != 200:
            try:
                content = await response.aread()
            except (httpx.HTTPError, OSError):
                content = b""
            finally:
                await response.aclose()
            raise UpstreamFailure(worker_id, f"status {response.status_code}", dead=False,
                                  status=response.status_code, body=content)
        stream = UpstreamStream(worker_id, response, self.timeouts, self.open.setdefault(worker_id, set()))
        return stream

    # A pool listener (router.pool.worker_pool): a worker the health probe (or live traffic) takes down
    # fails its open streams at once, so they migrate now rather than after the idle timeout.
    def worker_down(self, worker) -> None:
        for stream in list(self.open.get(worker.id, ())):
            stream.abandon("worker marked down")

    def worker_suspect(self, worker) -> None:
        """A probe of the worker just failed: its streams that have also been silent for a whole probe
        timeout are stalled with it (a hung process), so they move now, a probe round before the worker
        leaves routing. Streams still waiting for a first token may just be queued: they stay."""
        for stream in list(self.open.get(worker.id, ())):
            if stream.silent_for() >= self.timeouts.health_s:
                stream.abandon("worker stalled")

    def worker_up(self, worker) -> None:
        pass

    def worker_removed(self, worker) -> None:
        self.worker_down(worker)
        self.open.pop(worker.id, None)


class UpstreamStream:
    """A worker's SSE response, read as whole events (a read's together) with first-event and idle timeouts."""

    def __init__(self, worker_id: str, response: httpx.Response | LeanResponse, timeouts: Timeouts,
                 registry: set | None = None):
        self.worker_id = worker_id
        self.response = response
        self._registry = registry if registry is not None else set()
        self._registry.add(self)
        self._watch = Watchdog(timeouts.first_byte_s)   # each read's deadline (abandon() moves it to now)
        self._abandoned: str | None = None
        # The transport's byte stream itself: httpx's aiter_raw adds three generator layers per chunk.
        # An AsyncClient's response (or a test's async iterator): its stream is asynchronous.
        self._parts = aiter(cast(httpx.AsyncByteStream, response.stream))
        if isinstance(response, LeanResponse):
            response.untimed_reads()   # each read is bounded by the watchdog (_receive): one deadline, not two
        self._splitter = EventSplitter()
        self._ready: list[bytes] = []   # whole events not yet taken
        self._first_s = timeouts.first_byte_s
        self._idle_s = timeouts.idle_s
        self._started = False
        self._done = False          # the worker sent [DONE]: the stream ended as it should

    async def next_events(self) -> list[bytes]:
        """Every whole SSE event received and not yet taken, after waiting for one; [] when the worker
        closed the stream cleanly. A read's events come together: a call per read, not per event."""
        if not self._ready and not await self._receive():
            return []
        events, self._ready = self._ready, []
        self._started = True
        last = events[-1]
        if len(last) < 32 and data_of(last) == DONE:   # last: events after [DONE] leave it unfinished
            self._done = True
        return events

    async def _receive(self) -> bool:
        """Wait for whole events (into _ready); False when the worker closed the stream cleanly."""
        while not self._ready:
            if self._abandoned is not None:
                raise UpstreamFailure(self.worker_id, self._abandoned, dead=True)
            watch = self._watch
            watch.seconds = self._idle_s if self._started else self._first_s
            try:
                with watch:
                    part = await anext(self._parts)
            except StopAsyncIteration:
                if self._splitter.pending:
                    raise UpstreamFailure(self.worker_id, "stream cut mid-event", dead=True) from None
                return False
            except (httpx.HTTPError, TimeoutError, OSError) as exc:
                if self._abandoned is not None:
                    raise UpstreamFailure(self.worker_id, self._abandoned, dead=True) from exc
                raise _failure(self.worker_id, exc) from exc
            self._ready = self._splitter.feed(part)
        return True

    def silent_for(self) -> float:
        """Seconds the pending read has waited since the stream's last bytes (0: no read pending, or
        no token yet)."""
        since = self._watch.since
        if since is None or not self._started:
            return 0.0
        return asyncio.get_running_loop().time() - since

    def abandon(self, reason: str) -> None:
        """Fail the stream now: the pending read (if any) ends at once, later reads raise. Events
        already received are still delivered first."""
        if self._abandoned is not None:
            return   # already failing (suspected, then marked down)
        self._abandoned = reason
        self._watch.expire_now()   # a no-op between reads, or where the read is already failing

    async def aclose(self) -> None:
        """Close. A stream that ended with [DONE] is read to its end first, so its connection is
        reused; an unfinished one's connection is dropped, so the worker aborts the request."""
        self._registry.discard(self)
        self._watch.close()
        try:
            if self._done and not self._ready:
                with Expiry(DRAIN_S):
                    async for _ in self._parts:
                        pass
        except (httpx.HTTPError, TimeoutError, OSError):
            pass   # not read to its end: closing drops the connection
        finally:
            try:
                await self.response.aclose()
            except (httpx.HTTPError, OSError):
                pass
