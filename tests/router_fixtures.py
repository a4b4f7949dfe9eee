"""Router test helpers on top of conftest's loopback servers (``serve``, ``start_worker``).

- ``start_router(workers, **config) -> RunningRouter``: a router app over real worker URLs, served by
  uvicorn on a free port with a router process's protocol (router.server.uvicorn_options); ``.router``
  is the in-process Router (pool, policies, metrics) to inspect.
- ``module_cluster(worker_fields, **config)``: the same, workers included, as a context manager for
  module-scoped fixtures (tests that do not change the cluster share one).
- ``freeze(server, seconds)``: hang a server as SIGSTOP would.
- ``kill(server)``: crash a running server the hard way: listening sockets closed and every open
  connection reset, as when a worker process dies (no graceful shutdown, no final bytes).
- ``stream_completion(url, body)``: POST a streaming request and collect its SSE events.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import msgspec
import pytest

from router.config import HealthConfig, RouterConfig, WorkerConfig
from router.server import create_app, uvicorn_options
from tests.conftest import WORKER_TEST_DEFAULTS, RunningServer, RunningWorker
from workers.config import worker_config

MODEL = "Llama-3.1-8B"


class RunningRouter:
    def __init__(self, server, app):
        self.server = server
        self.url = server.url
        self.router = app.state.router

    def in_flight(self) -> dict[str, int]:
        return {v.id: v.in_flight for v in self.router.pool.views()}

    def workers(self) -> dict[str, bool]:
        return {v.id: v.healthy for v in self.router.pool.views()}

    def metric(self, name: str, **labels) -> float:
        value = self.router.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


def router_app(workers, **fields):
    declared = [WorkerConfig(url=w.url, id=w.config.worker_id, role=w.config.role,
                             kv_events=w.config.kv_events_endpoint) for w in workers]
    fields.setdefault("health", HealthConfig(interval_s=0.2, failures_to_remove=1))
    return create_app(RouterConfig(workers=declared, **fields))


@pytest.fixture
def start_router(serve):
    def _start(workers, **fields) -> RunningRouter:
        app = router_app(workers, **fields)
        return RunningRouter(serve(app, **uvicorn_options(app.state.router.config.server)), app)

    return _start


@contextlib.contextmanager
def module_cluster(worker_fields: list[dict], **router_fields):
    """Workers and a router that live for a whole test module (for read-only tests: faster)."""
    workers = [RunningWorker(worker_config(**{**WORKER_TEST_DEFAULTS, **f})) for f in worker_fields]
    app = router_app(workers, **router_fields)
    server = RunningServer(app, **uvicorn_options(app.state.router.config.server))
    try:
        yield RunningRouter(server, app), workers
    finally:
        server.stop()
        for worker in workers:
            worker.stop()


def kill(server) -> None:
    """Crash `server` (a conftest RunningServer): no new connections, open ones reset mid-response."""
    uv = server._server
    loop = uv.servers[0].get_loop() if uv.servers else None
    if loop is None:
        return
    done = threading.Event()

    def crash() -> None:
        for listener in uv.servers:
            listener.close()
        for connection in list(uv.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()   # RST: the peer sees a reset, not a clean end of stream
        runtime = getattr(server, "runtime", None)
        if runtime is not None and runtime._task is not None:
            runtime._task.cancel()   # the engine stops with the process
        done.set()

    loop.call_soon_threadsafe(crash)
    done.wait(5)


def freeze(server, seconds: float) -> None:
    """Hang `server` (a conftest RunningServer) for `seconds`, as SIGSTOP would: its event loop blocks,
    so it accepts nothing and answers nothing, and open connections stay open."""
    uv = server._server
    loop = uv.servers[0].get_loop() if uv.servers else None
    if loop is not None:
        loop.call_soon_threadsafe(time.sleep, seconds)


def stream_completion(url: str, body: dict, path: str = "/v1/completions", headers: dict | None = None,
                      timeout: float = 30.0) -> tuple[httpx.Response, list]:
    """(response, events): each event is the decoded JSON payload, or the string "[DONE]"."""
    events = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, headers=headers, timeout=timeout) as r:
        for event in sse_frames(r):
            data = event.removeprefix(b"data: ")
            events.append("[DONE]" if data == b"[DONE]" else msgspec.json.decode(data))
    return r, events


def sse_frames(response: httpx.Response):
    """The raw SSE events of a streaming response, each as soon as its blank line arrives."""
    buffer = b""
    for part in response.iter_bytes():
        buffer += part
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield event


def stream_text(events: list) -> str:
    out = []
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            choice = e["choices"][0]
            out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


async def gather_limited(coros, limit: int):
    semaphore = asyncio.Semaphore(limit)

    async def one(coro):
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))
