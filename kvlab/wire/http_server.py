"""uvicorn settings both servers run with: deadlines on slow clients and a cap on connections.

uvicorn bounds the idle time between keep-alive requests (``timeout_keep_alive``), but it has no
deadline for a request's headers: a client that sends half a request line holds its connection
forever (slowloris). ``HeaderDeadline`` adds one to uvicorn's httptools protocol: the headers of
each request must be complete within ``header_timeout_s`` of its first byte (of the connection, for
the first request), or the connection is closed. It also caps open connections: one past
``max_connections`` is answered 503 with Retry-After (the cluster-overload answer, see SECURITY.md)
and closed. (uvicorn's own ``limit_concurrency`` answers a plain-text 503 without Retry-After.)
Request bodies have their own deadline in kvlab.wire.http_body.
"""
from __future__ import annotations

import asyncio
import gc

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvlab.wire.openai_api import ApiError


class ServerLimits(msgspec.Struct, kw_only=True):
    header_timeout_s: float = 10.0      # request line + headers, from connect (or the request's first byte)
    keep_alive_s: float = 5.0           # idle keep-alive connection (uvicorn's default)
    max_connections: int = 4096         # open connections; one more is answered 503 + Retry-After


_BUSY_BODY = ApiError(503, "too many open connections; retry shortly", type_="server_error",
                      code="too_many_connections").body()
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                        b"connection: close\r\ncontent-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n"
                        + _BUSY_BODY)


# Full (generation-2) collections are considered after this many generation-1 ones (CPython's default: 10).
FULL_GC_EVERY = 1000


def steady_gc() -> None:
    """Keep the cyclic garbage collector's full passes off the serving path. A server's live objects
    (the KV index, each worker's block tables and its running requests, which live for seconds and so
    reach the oldest generation) grow to ~200 MB, and with CPython's default thresholds a full pass ran
    every ~7 s, pausing the event loop 90-210 ms (default spec, 57.3 req/s: gc.callbacks timings in a
    worker), which the workers report as step lag. Objects from start-up are frozen out of every pass
    (gc.freeze) and full passes come 100x less often; young generations are collected as before, and
    reference counting frees everything acyclic at once, so only cyclic garbage waits longer."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_GC_EVERY)


class HeaderDeadline(HttpToolsProtocol):
    header_timeout_s = ServerLimits().header_timeout_s
    max_connections = ServerLimits().max_connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_headers = False   # a request's first bytes came, its headers are not complete yet
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A keep-alive connection's next request: its headers get the same deadline from its first
        # byte, armed only if they did not all come with it (nearly every request's do, and then a
        # deadline set and cancelled within the same call would cost for nothing).
        if self._in_headers and self._header_timer is None and not self.transport.is_closing():
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_settings(limits: ServerLimits) -> dict:
    """Keyword arguments for uvicorn.run / uvicorn.Config that apply `limits`."""
    protocol = type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": limits.header_timeout_s,
                                                          "max_connections": limits.max_connections})
    return {"http": protocol, "timeout_keep_alive": limits.keep_alive_s}
