"""A slow client slows its worker's stream down instead of growing router memory; a client that leaves
closes the upstream stream (so the worker can abort and free its KV)."""
import asyncio
import socket
import time

import msgspec
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from router.config import RouterConfig, WorkerConfig
from router.server import create_app, uvicorn_options
from tests.router_fixtures import MODEL

EVENT = b"data: " + msgspec.json.encode({"id": "x", "created": 1, "choices": [
    {"index": 0, "text": " the" * 250, "finish_reason": None}]}) + b"\n\n"   # ~1 KB a token event


class EndlessWorker:
    """Streams events as fast as its transport accepts them, forever; counts what it produced."""

    def __init__(self):
        self.produced = 0
        self.closed = False
        self.app = Starlette(routes=[Route("/load", self.load), Route("/v1/models", self.models),
                                     Route("/v1/completions", self.completions, methods=["POST"])])

    async def load(self, request):
        return JSONResponse({"worker_id": "endless", "running": 0, "waiting": 0, "kv_usage": 0.0})

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [{"id": MODEL}]})

    async def completions(self, request):
        if not (await request.json()).get("stream"):
            await asyncio.Event().wait()   # a non-streaming call that never gets its answer
        async def events():
            try:
                while True:
                    self.produced += len(EVENT)
                    yield EVENT
                    await asyncio.sleep(0)
            finally:
                self.closed = True
        return StreamingResponse(events(), media_type="text/event-stream")


def open_stream(url: str, stream: bool = True) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    body = msgspec.json.encode({"model": MODEL, "prompt": "endless", "max_tokens": 10**9, "stream": stream})
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    if stream:
        assert b"200 OK" in sock.recv(4096)
    return sock


def wait_for_stall(worker, quiet_s=1.0, timeout=20.0):
    """The produced byte count once it has not moved for `quiet_s` (None if it never stops)."""
    deadline = time.monotonic() + timeout
    last, since = worker.produced, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if worker.produced != last:
            last, since = worker.produced, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return last
    return None


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


@pytest.mark.slow
def test_a_client_that_stops_reading_stalls_the_worker_stream(serve):
    worker = EndlessWorker()
    upstream = serve(worker.app)
    router = serve(create_app(RouterConfig(workers=[WorkerConfig(url=upstream.url, id="endless")])))
    sock = open_stream(router.url)         # the client reads nothing more: buffers fill, then everything stops
    stalled_at = wait_for_stall(worker)
    assert stalled_at is not None          # production stops while nobody reads...
    assert stalled_at < 64 << 20           # ...with what is in flight bounded by socket and transport buffers
    time.sleep(1.5)
    # Still stopped. (The kernel may later coalesce a full receive queue of small segments, reopening
    # the TCP window by a megabyte or two once: bounded slack, not router buffering.)
    assert worker.produced - stalled_at < 4 << 20
    sock.settimeout(5)
    deadline = time.monotonic() + 10
    while worker.produced == stalled_at and time.monotonic() < deadline:
        sock.recv(1 << 20)                 # the client reads again: the stream resumes
    assert worker.produced > stalled_at, stalled_at
    sock.close()                           # the client leaves: the router closes the upstream stream
    assert wait_until(lambda: worker.closed)


@pytest.mark.parametrize("protocol", ["uvicorn's", "a router process's"])
def test_a_client_that_leaves_ends_its_stream_and_its_call_upstream(serve, protocol):
    """Either way the server tells the router (a watcher task on ``receive``, or the router protocol's
    future in the scope), the upstream side ends when the client goes."""
    worker = EndlessWorker()
    upstream = serve(worker.app)
    app = create_app(RouterConfig(workers=[WorkerConfig(url=upstream.url, id="endless")]))
    router = serve(app, **(uvicorn_options(app.state.router.config.server) if protocol != "uvicorn's" else {}))
    pool = app.state.router.pool
    in_flight = lambda: sum(v.in_flight for v in pool.views())   # noqa: E731
    sock = open_stream(router.url)
    sock.close()                           # mid-stream
    assert wait_until(lambda: worker.closed) and wait_until(lambda: in_flight() == 0)
    sock = open_stream(router.url, stream=False)
    assert wait_until(lambda: in_flight() == 1)   # the call is with the worker, which never answers
    sock.close()
    assert wait_until(lambda: in_flight() == 0)   # cancelled: its worker's slot is free again
