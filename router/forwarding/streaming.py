"""The client side of a relayed stream: an ASGI response with backpressure and disconnect handling.

Backpressure: each chunk is handed to the server's ``send``, which (uvicorn) waits while the
connection's write buffer is above its high-water mark (64 KiB). While it waits the relay does not
read from the worker, so the worker's socket fills and its own sends block in turn. Per client the
router therefore holds at most the transport buffer plus one upstream read and one event: a slow
client slows its worker's stream down and never grows router memory.

Disconnect: a watcher task waits for ``http.disconnect`` and cancels the relay, whose cleanup closes
the upstream connection so the worker aborts the request and frees its KV blocks. (Starlette's
StreamingResponse does the same through an anyio task group; one plain task is cheaper.)
``unless_client_leaves`` does the same for a non-streaming call.

Shutdown: the server drains streams for its graceful period and then cancels those still running; such a
stream ends with an OpenAI error event "server shutting down" and [DONE], so a client reads why it ended
instead of a cut connection.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from kvlab.wire.openai_api import SSE_DONE, ApiError, sse_error

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
SHUTTING_DOWN = sse_error(ApiError(503, "server shutting down", type_="server_error",
                                   code="server_shutting_down")) + SSE_DONE


class RelayResponse:
    """`ended`, where given, tells whether the chunk just taken ends the stream: it then goes out with the
    body's end (one write for the last events and the chunked terminator, not two)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None = None,
                 status: int = 200, headers: list[tuple[bytes, bytes]] | None = None,
                 ended: Callable[[], bool] = lambda: False):
        self.chunks = chunks
        self.on_close = on_close
        self.status_code = status
        self.headers = headers or SSE_HEADERS
        self.ended = ended

    async def __call__(self, scope, receive, send) -> None:
        started = False
        try:
            with ClientWatch(receive, scope.get(CLIENT_GONE_KEY)):
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.headers})
                started = True
                async for chunk in self.chunks:
                    if self.ended():
                        await send({"type": "http.response.body", "body": chunk, "more_body": False})
                        return
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:   # not the client leaving (ClientWatch ends that quietly): a shutdown
            if started:
                await _say_shutting_down(send)
            raise
        finally:
            await _close(self.chunks)
            if self.on_close is not None:
                await self.on_close()


# A server may put a future in each request's scope under this key, done once the client's connection
# is lost (router.server's protocol does): waiting for it costs a callback, where watching ``receive``
# costs a task per request (~9 us on uvloop).
CLIENT_GONE_KEY = "kvlab.client_gone"


class ClientWatch:
    """Within the block, a client disconnect cancels the current task; the block then ends quietly
    (the client left: a normal end for us), while any other cancellation still propagates. The
    disconnect is `gone` done where the server gives that future (CLIENT_GONE_KEY), else an
    ``http.disconnect`` from `receive`, which a watcher task waits for."""

    def __init__(self, receive, gone: asyncio.Future | None = None):
        self.receive = receive
        self.gone = False
        self._signal = gone
        self._watcher: asyncio.Task | None = None
        task = asyncio.current_task()
        assert task is not None, "ClientWatch is used inside a task"
        self._task = task

    def _left(self, _: asyncio.Future | None = None) -> None:
        self.gone = True
        self._task.cancel()

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self._left()

    def __enter__(self) -> ClientWatch:
        if self._signal is None:
            self._watcher = asyncio.create_task(self._watch())
        elif self._signal.done():
            self._left()   # already gone: the block's first wait is cancelled
        else:
            self._signal.add_done_callback(self._left)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._watcher is not None:
            self._watcher.cancel()
        elif self._signal is not None:
            self._signal.remove_done_callback(self._left)
        if exc_type is asyncio.CancelledError and self.gone:
            self._task.uncancel()
            return True
        return False


async def _say_shutting_down(send) -> None:
    try:
        await send({"type": "http.response.body", "body": SHUTTING_DOWN, "more_body": False})
    except Exception:   # the connection is already gone: nobody to tell
        pass


async def _close(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


async def unless_client_leaves(receive, awaitable, gone: asyncio.Future | None = None):
    """Await `awaitable` (a non-streaming proxied call) unless the client disconnects first; then
    cancel it, which closes the upstream connection so the worker aborts too, and return None.
    `gone`: the server's signal of the client leaving, if it gives one (CLIENT_GONE_KEY)."""
    with ClientWatch(receive, gone):
        return await awaitable
    return None
