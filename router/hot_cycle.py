"""The two proxied endpoints served straight from uvicorn's request cycle, without ASGI messages.

A router process serves on uvicorn's httptools protocol (router.server._RouterProtocol). For every
other path the request goes to the FastAPI app as usual; a POST to /v1/completions or
/v1/chat/completions instead runs ``serve`` on uvicorn's own task and cycle, which saves what the
ASGI layer costs per request and does nothing here:
- the request: a header dict (the few headers the router reads) instead of a Starlette Request, and
  the body taken from the cycle's buffer (whole, when it came with the headers, as it nearly always
  does) instead of one ``http.request`` message after another;
- a non-streaming answer (the worker's body, an error, a 499): head and body built and written in one
  go, instead of two ASGI messages that each get their header checks and bookkeeping.
Streams still leave through the cycle's ASGI ``send`` (chunked framing and backpressure are uvicorn's).

Behaviour is uvicorn's: the same limits (413 past the body limit, 408 past its deadline), Expect:
100-continue answered before the body is read, flow control on large bodies, the response's
``connection: close`` ending keep-alive, uvicorn's default headers (date, server), header values
checked as uvicorn checks them, and its error handling (``run_asgi`` wraps ``serve``). It reads
uvicorn 0.55's cycle attributes, so router.server uses it only where the cycle has them (``fits``).
"""
from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE, STATUS_LINE, RequestResponseCycle

from kvlab.wire.http_body import too_large
from kvlab.wire.http_errors import error_response
from kvlab.wire.openai_api import ApiError
from router.forwarding.deadlines import Expiry
from router.forwarding.streaming import RelayResponse

if TYPE_CHECKING:
    from router.frontdoor.job import Endpoint
    from router.server import Router

log = logging.getLogger("kvlab.router")

# What ``serve`` reads and writes on uvicorn's cycle (constructor arguments it keeps as attributes).
_CYCLE_ARGS = {"scope", "transport", "flow", "default_headers", "message_event", "expect_100_continue",
               "keep_alive", "on_response"}


def fits() -> bool:
    """Whether this uvicorn's request cycle is the one ``serve`` was written against (0.55's)."""
    try:
        params = set(inspect.signature(RequestResponseCycle.__init__).parameters)
    except (TypeError, ValueError):
        return False
    return _CYCLE_ARGS <= params and all(callable(getattr(RequestResponseCycle, m, None))
                                         for m in ("run_asgi", "send", "receive"))


class HotRequest:
    """What Router.handle reads of a request: its headers (lower-case names, the first of repeated
    ones, as Starlette's Headers.get), the body, the scope and ``receive`` (client-leaving signals)."""
    __slots__ = ("scope", "receive", "cycle", "headers")

    def __init__(self, scope, receive, cycle: RequestResponseCycle):
        self.scope = scope
        self.receive = receive
        self.cycle = cycle
        # reversed: the first of a repeated header is the one kept
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}

    async def body(self, limit: int, timeout_s: float) -> bytes:
        """The whole body; 413 once past `limit` bytes, 408 past `timeout_s` (the caller words both)."""
        cycle = self.cycle
        if cycle.more_body and not cycle.disconnected:
            with Expiry(timeout_s):
                await self._rest(cycle, limit)
        if cycle.disconnected:
            raise ClientDisconnect()
        if len(cycle.body) > limit:
            raise too_large(limit)
        body = bytes(cycle.body)
        cycle.body = bytearray()
        return body

    @staticmethod
    async def _rest(cycle, limit: int) -> None:
        """Wait for the rest of the body, as uvicorn's ``receive`` does (100 Continue first, reads
        resumed while waiting), keeping what arrives in the cycle's buffer."""
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        while cycle.more_body and not cycle.disconnected:
            if len(cycle.body) > limit:
                raise too_large(limit)
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()


async def serve(router: Router, endpoint: Endpoint, cycle: RequestResponseCycle, scope, receive, send) -> None:
    """One request to a proxied endpoint, as an ASGI app bound to its cycle (run by ``run_asgi``)."""
    response: Response | RelayResponse
    try:
        response = await router.handle(HotRequest(scope, receive, cycle), endpoint)
    except Exception:  # a bug, not a client error: still an OpenAI body, and the router keeps serving
        log.exception("unhandled error on POST %s", scope["path"])
        response = error_response(ApiError(500, "internal error in the router", type_="server_error"))
    if type(response) is Response:
        await write_whole(cycle, response)
    else:
        await response(scope, receive, send)


async def write_whole(cycle: RequestResponseCycle, response: Response) -> None:
    """What uvicorn's ``send`` does for a start message and one final body, in one write."""
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    out = [STATUS_LINE[response.status_code]]
    keep_alive = cycle.keep_alive
    has_close = False
    for name, value in (*cycle.default_headers, *response.raw_headers):
        if HEADER_VALUE_RE.search(value):
            raise RuntimeError("Invalid HTTP header value.")
        if name == b"connection" and b"close" in [t.lower().strip() for t in value.split(b",")]:
            keep_alive, has_close = False, True
        out += (name, b": ", value, b"\r\n")
    if not keep_alive and not has_close:
        out.append(b"connection: close\r\n")
    out += (b"\r\n", bytes(response.body))
    cycle.keep_alive = keep_alive
    cycle.transport.write(b"".join(out))
    cycle.response_complete = True
    cycle.message_event.set()
    if not keep_alive:
        cycle.transport.close()
    cycle.on_response()


def hot_endpoint(app, scope) -> tuple[Router, Endpoint] | None:
    """The router and endpoint a request goes to directly, or None (everything else: the app)."""
    hot_paths = getattr(app, "hot_paths", None)
    if not hot_paths or scope["method"] != "POST":
        return None
    endpoint = hot_paths.get(scope["path"])
    return None if endpoint is None else (app.state.router, endpoint)


