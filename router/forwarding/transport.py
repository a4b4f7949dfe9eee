"""A lean HTTP/1.1 transport for httpx.AsyncClient: keep-alive connections, O(1) per request.

Why: httpcore's pool (httpx's default transport) scans every pooled connection on each request and
polls each idle socket, so its per-request cost grows with the number of connections; measured on
loopback it added ~1.2 ms a request against ~0.55 ms for a plain keep-alive client, more than the
router's whole latency budget. This transport keeps, per origin, a stack of idle connections (the most
recently used first, so few stay warm), parses responses with httptools (the C parser uvicorn uses),
and streams bodies with flow control: when a consumer stops reading, the socket stops reading too
(so a slow client's backpressure reaches the worker).

Timeouts come from httpx's per-request extensions (connect and read; writes are buffered by asyncio).
A request on a *reused* connection that is closed before any response byte arrives is sent once more on
a fresh connection: the server may have closed the idle connection just as it was reused, which says
nothing about the worker. (Connections are not capped: the router's own admission bounds concurrency.)

Two ways in: ``handle_async_request`` (httpx's transport interface, for the control plane's
AsyncClient) and ``post`` (the proxied requests): a JSON POST whose request head is cached per URL and
whose answer is a ``LeanResponse``, with none of httpx's Request, Headers and Response models (building
and reading them cost ~40 us a request, a sixth of the router's whole CPU per proxied request).
``fetch`` is ``post`` for a non-streaming request: the answer comes back whole, as (status, body),
and the call's total time bound is kept by the waits for bytes themselves.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque

import httptools
import httpx

from router.forwarding.deadlines import Deadlines

HIGH_WATER = 256 * 1024   # buffered body bytes at which the socket stops reading
IDLE_EXPIRY_S = 4.0       # below uvicorn's 5 s keep-alive timeout: never reuse what the server drops


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self._deadlines = Deadlines.of(self.loop)
        self.closed = False
        self.idle_since = 0.0
        # One parser and buffer for the connection's life: a response read to its end leaves the parser
        # at a message boundary, and only such connections are reused (``reusable``).
        self._parser: httptools.HttpResponseParser = httptools.HttpResponseParser(self)
        self.chunks: deque[bytes] = deque()
        self._wake = self.loop.create_future()
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []   # a new list: the last response keeps its own
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False           # any byte of this response
        self.chunks.clear()
        self.buffered = 0
        self.error: Exception | None = None
        if self._wake.done():           # woken after its last wait: a fresh one for this response
            self._wake = self.loop.create_future()
        self._paused = False

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.complete:   # bytes after a whole response (none was asked for): never reuse the connection
            self.close()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}"))
            return
        # Bytes came (a head, body or end, or part of one): the waiter looks at what it has now, once
        # for everything this feed parsed rather than once per parser event.
        wake = self._wake
        if not wake.done():
            wake.set_result(None)
        if self.buffered > HIGH_WATER and not self._paused:
            assert self.transport is not None   # set by connection_made, before any data
            self._paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.complete:
            self._fail(httpx.RemoteProtocolError("peer closed connection without sending a complete response"))

    def eof_received(self):
        self.closed = True
        return None

    # -- httptools callbacks -----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    # (each runs inside data_received's feed_data, which wakes the waiter once they have all run)
    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()   # only meaningful inside the callbacks

    # -- used by the transport ---------------------------------------------------------------------
    def _notify(self) -> None:
        if not self._wake.done():
            self._wake.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._notify()

    async def wait(self, timeout: float | None, until: float | None = None) -> None:
        """Until more bytes come (parsed: look at head_done, chunks, complete) or the connection fails;
        ReadTimeout past `timeout` seconds, or past loop time `until` if that comes first."""
        if self.error is not None:
            raise self.error
        if timeout is None and until is None:
            await self._wake
        else:   # one heap entry, not a libuv timer per wait (router.forwarding.deadlines)
            when = self.loop.time() + timeout if timeout is not None else math.inf
            if until is not None and until < when:
                when = until
            deadline = self._deadlines.at(when, self._read_overdue)
            try:
                await self._wake
            finally:
                deadline.cancel()
        self._wake = self.loop.create_future()
        if self.error is not None and not (self.chunks or self.complete):
            raise self.error

    def _read_overdue(self) -> None:
        if not self._wake.done():
            self._wake.set_exception(httpx.ReadTimeout("timed out waiting for the worker"))

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self._paused and not self.closed:
            assert self.transport is not None   # paused by data_received, so connected
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def status(self) -> int:
        return self._parser.get_status_code()

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def start_request(self, head: bytes, body: bytes) -> None:
        self._reset()
        transport = self.transport
        assert transport is not None   # the pool hands out connected connections only
        transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            transport.write(body)   # large bodies: no copy into one buffer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class LeanResponse:
    """A worker's answer to ``LeanTransport.post``: status, raw headers and the body (read it whole with
    ``aread`` or in parts by iterating ``stream``; ``aclose`` returns the connection to the pool when the
    body was read to its end)."""
    __slots__ = ("status_code", "headers", "stream")

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], stream: _Body):
        self.status_code = status_code
        self.headers = headers
        self.stream = stream

    async def aread(self) -> bytes:
        return await self.stream.read()

    def untimed_reads(self) -> None:
        """From now on the body's reads wait without the read timeout: for a reader that bounds each
        read itself (router.forwarding.upstream.UpstreamStream), whose deadline would be a second one."""
        self.stream.read_timeout = None

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection, returned to the pool when fully read."""

    def __init__(self, pool: LeanTransport, origin, conn: _Connection, read_timeout: float | None):
        self._pool, self._origin, self.read_timeout = pool, origin, read_timeout
        self._conn: _Connection | None = conn   # None once closed
        self._done = False

    async def __aiter__(self):
        conn = self._conn
        if conn is None:
            raise httpx.StreamClosed()
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                self._done = True
                return
            await conn.wait(self.read_timeout)

    async def read(self) -> bytes:
        """The whole body (the same bytes as iterating, in one piece)."""
        conn = self._conn
        if conn is None:
            raise httpx.StreamClosed()
        parts: list[bytes] = []
        while True:
            if conn.chunks:
                parts.append(conn.take())
            if conn.complete:
                self._done = True
                return b"".join(parts)   # one part: that part itself, not a copy
            await conn.wait(self.read_timeout)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and conn.reusable:
            self._pool.checkin(self._origin, conn)
        else:
            conn.close()   # unread or broken: the server sees the request abandoned


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_idle_per_origin: int = 1024):
        self._idle: dict[tuple, list[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        self._targets: dict[int, tuple[httpx.URL, tuple, bytes]] = {}   # post's URLs: origin, head to the length

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        origin = (request.url.host, request.url.port or 80)
        head, body = _encode(request), await request.aread()
        answer = await self._send(origin, head, body, timeouts)
        return httpx.Response(answer.status_code, headers=answer.headers, stream=answer.stream,
                              extensions={"http_version": b"HTTP/1.1"})

    async def post(self, url: httpx.URL, body: bytes, timeouts: dict) -> LeanResponse:
        """POST `body` (JSON) to `url`, with httpx's timeout keys (connect, read) in `timeouts`: the
        same bytes on the wire as ``handle_async_request`` sends for such a request."""
        _, origin, head = self._target(url)
        return await self._send(origin, head + b"%d\r\n\r\n" % len(body), body, timeouts)

    async def fetch(self, url: httpx.URL, body: bytes, timeouts: dict, total: float) -> tuple[int, bytes]:
        """``post``, answered whole: (status, body). `total` seconds bound the whole exchange (connect
        and every wait for the worker's bytes end by then, with ConnectTimeout or ReadTimeout), so the
        call needs no deadline of its own, and no response objects are made."""
        known = self._targets.get(id(url))
        _, origin, head = known if known is not None and known[0] is url else self._target(url)
        head += b"%d\r\n\r\n" % len(body)
        conn = self._checkout(origin)
        loop = conn.loop if conn is not None else asyncio.get_running_loop()
        until = loop.time() + total
        if conn is not None:
            try:
                return await self._whole(conn, origin, head, body, timeouts.get("read"), until)
            except (httpx.RemoteProtocolError, httpx.WriteError):
                if conn.received:
                    raise
                # Closed under us before any answer: a stale idle connection, not a dead worker.
        connect = timeouts.get("connect")
        left = max(0.0, until - loop.time())
        conn = await self._connect(origin, left if connect is None else min(connect, left))
        return await self._whole(conn, origin, head, body, timeouts.get("read"), until)

    async def _whole(self, conn: _Connection, origin, head: bytes, body: bytes, read: float | None,
                     until: float) -> tuple[int, bytes]:
        """Send the request on `conn` and read its whole answer (as ``_Body.read``); the connection goes
        back to the pool when it can be reused, and is closed otherwise."""
        parts: list[bytes] = []
        try:
            conn.start_request(head, body)
            while True:
                if conn.chunks:
                    parts.append(conn.take())
                if conn.complete:
                    break
                await conn.wait(read, until)
        except BaseException:
            conn.close()
            raise
        status = conn._parser.get_status_code()
        if conn.reusable:
            self.checkin(origin, conn)
        else:
            conn.close()
        return status, b"".join(parts)   # one part: that part itself, not a copy

    def _target(self, url: httpx.URL) -> tuple[httpx.URL, tuple, bytes]:
        """`url`'s origin and request head up to the content length's value (made once per URL object)."""
        known = self._targets.get(id(url))
        if known is None or known[0] is not url:   # an id is reused only after its URL is gone
            if len(self._targets) >= 4096:
                self._targets.clear()   # the pool's workers re-add theirs at once
            request = httpx.Request("POST", url, headers={"content-type": "application/json",
                                                          "content-length": "0"})
            known = self._targets[id(url)] = (url, (url.host, url.port or 80),
                                               _encode(request).removesuffix(b"0\r\n\r\n"))
        return known

    async def _send(self, origin, head: bytes, body: bytes, timeouts) -> LeanResponse:
        conn = self._checkout(origin)
        if conn is not None:
            try:
                return await self._exchange(conn, origin, head, body, timeouts)
            except (httpx.RemoteProtocolError, httpx.WriteError):
                if conn.received:
                    raise
                # Closed under us before any answer: a stale idle connection, not a dead worker.
        conn = await self._connect(origin, timeouts.get("connect"))
        return await self._exchange(conn, origin, head, body, timeouts)

    async def _exchange(self, conn: _Connection, origin, head: bytes, body: bytes, timeouts) -> LeanResponse:
        try:
            conn.start_request(head, body)
            while not conn.head_done:
                await conn.wait(timeouts.get("read"))
        except BaseException:
            conn.close()
            raise
        return LeanResponse(conn.status, conn.headers, _Body(self, origin, conn, timeouts.get("read")))

    async def _connect(self, origin, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(_Connection, *origin)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {origin[0]}:{origin[1]} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {origin[0]}:{origin[1]}: {exc}") from None
        return conn

    def _checkout(self, origin) -> _Connection | None:
        stack = self._idle.get(origin)
        now = time.monotonic()
        while stack:
            conn = stack.pop()
            if not conn.closed and now - conn.idle_since < IDLE_EXPIRY_S:
                return conn
            conn.close()
        return None

    def checkin(self, origin, conn: _Connection) -> None:
        stack = self._idle.setdefault(origin, [])
        if len(stack) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        stack.append(conn)

    async def aclose(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()


def _encode(request: httpx.Request) -> bytes:
    target = request.url.raw_path
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n"
