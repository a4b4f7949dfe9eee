"""Shared fixtures: real HTTP servers on loopback, for worker and router tests alike.

- ``serve(app) -> RunningServer``: runs any ASGI app under uvicorn (uvloop) in a background thread on
  a free 127.0.0.1 port; stopped at teardown.
- ``start_worker(**config) -> RunningWorker``: builds a worker app from ``WorkerConfig`` and ``EngineConfig`` fields
  (small defaults: Llama-3.1-8B on H100-SXM, 256 KV blocks) and serves it. ``RunningWorker`` has
  ``url``, ``config``, ``runtime`` (the in-process WorkerRuntime), ``http`` (a persistent
  ``httpx.Client`` on ``url``: a new client costs tens of ms of TLS setup, so time with this one),
  ``load()``, ``metrics()`` and ``metric(name)``.
- ``free_tcp_port()`` (fixture returning ``free_port``): a currently free loopback TCP port, for ZMQ
  endpoints or subprocesses.
- ``free_port_block(count) -> int``: the first of `count` consecutive bindable loopback ports below the
  ephemeral range, for a cluster spec's router and workers (base_port, base_port + 1, ...).
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families

from workers.config import WorkerConfig, worker_config
from workers.server import create_app

# A suite started in the background by a non-interactive shell (`... &`) inherits SIGINT ignored, and
# the processes it starts would too: the Ctrl-C tests' `kvlab up` could not be interrupted. A handler
# here is reset to the default in every child, so they all take Ctrl-C as a terminal would deliver it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# Hypothesis' per-example deadline is a wall-clock bound, which a busy host can break: no test asserts one.
settings.register_profile("kvlab", deadline=None)
settings.load_profile("kvlab")


# scripts/test.sh runs the suite in three phases, each test in one (`phase_of`):
# - parallel: tests that mostly wait (on servers, subprocesses, timeouts), four at a time (pytest-xdist),
#   which overlaps their waiting (on a 2-core host: 120 s, where two at a time took 160 s);
# - pure: the tests that keep a core busy (the simulator, the planner, the static checks: PURE_PATHS),
#   two at a time, one a core (those that spread runs over the cores themselves only share them: the
#   work is the same, and a single-process test no longer leaves a core idle);
# - serial: alone, the tests whose assertions read the wall clock closely (marked `solo`).
# KVLAB_TEST_PHASE=parallel|pure|serial selects one phase; unset, pytest runs every test in one process.
PURE_PATHS = ("tests/emulator/", "tests/workers/core/", "tests/router/policies/", "tests/kvlab/wire/",
              "tests/loadtests/test_steady.py", "tests/loadtests/test_planner_draws_bracket.py",
              "tests/loadtests/test_parallel_runs.py", "tests/loadtests/test_cache_bounds.py",
              "tests/repo/test_layering.py", "tests/repo/test_docs.py", "tests/repo/test_static_gate.py",
              "tests/repo/test_phases.py")
PHASES = ("parallel", "pure", "serial")


def phase_of(item: pytest.Item) -> str:
    """The phase a test runs in: serial if marked `solo`, pure if in a file or folder of PURE_PATHS,
    else parallel."""
    if item.get_closest_marker("solo") is not None:
        return "serial"
    path = item.path.relative_to(item.config.rootpath).as_posix()
    return "pure" if path.startswith(PURE_PATHS) else "parallel"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    phase = os.environ.get("KVLAB_TEST_PHASE")
    if not phase:
        return
    if phase not in PHASES:
        raise pytest.UsageError(f"KVLAB_TEST_PHASE={phase!r}: use one of {', '.join(PHASES)} (or unset it for all)")
    dropped = [item for item in items if phase_of(item) != phase]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if phase_of(item) == phase]
    if phase == "pure":   # the long simulations first: none is left to run alone at the end
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def interruptible() -> None:
    """preexec_fn for a child a test will Ctrl-C: SIGINT at its default whatever this process holds."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


try:
    import uvloop
    _new_loop = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
    _new_loop = asyncio.new_event_loop

WORKER_TEST_DEFAULTS = {"num_blocks": 256}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(count: int) -> int:
    """The first of `count` consecutive ports that bind now, drawn from 20000-32000: below the
    ephemeral range (32768 and up on Linux), where client connections take their local ports, so a
    child process that binds a few seconds later does not find one taken by a connection."""
    for _ in range(100):
        base = random.randrange(20000, 32000)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports in 20000-32000")


def tiny_test_on_free_ports(time_scale: float = 1.0, engine_extra: str = "",
                            eps: float = 0.25) -> tuple[str, list[int]]:
    """tiny-test's spec text on free ports (`free_port_block`), so runs side by side cannot collide,
    at `time_scale`, with `engine_extra` lines added to [engine] and the router's load bound `eps`:
    (text, [router port, worker ports])."""
    from emulator.spec import example_spec_path
    base = free_port_block(3)
    text = example_spec_path("tiny-test").read_text()
    edits = (("base_port = 18100", f"base_port = {base + 1}"), ("port = 18000", f"port = {base}"),
             ("time_scale = 1.0", f"time_scale = {time_scale}\n{engine_extra}"), ("eps = 0.25", f"eps = {eps}"))
    for line, value in edits:
        assert line in text, line
        text = text.replace(line, value, 1)
    return text, [base, base + 1, base + 2]


class RunningServer:
    """An ASGI app served by uvicorn on its own event loop in a daemon thread."""

    def __init__(self, app, startup_timeout_s: float = 10.0, **uvicorn_settings):
        self.app = app
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="on",
                                **uvicorn_settings)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        self._wait_started(startup_timeout_s)

    def _run(self) -> None:
        loop = _new_loop()
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        finally:
            loop.close()

    def _wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.005)

    def request_stop(self) -> None:
        self._server.should_exit = True

    def stop(self) -> None:
        self.request_stop()
        self._thread.join(timeout=10)
        self._sock.close()


class RunningWorker(RunningServer):
    def __init__(self, config: WorkerConfig):
        self.config = config
        app = create_app(config)
        self.runtime = app.state.runtime
        super().__init__(app)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def request_stop(self) -> None:
        self.http.close()
        super().request_stop()

    def load(self) -> dict:
        return self.http.get("/load").json()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics keyed by name (labels dropped; first sample of each name wins)."""
        text = self.http.get("/metrics").text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, sample.value)
        return out

    def metric(self, name: str) -> float:
        return self.metrics()[name]


@pytest.fixture
def serve():
    servers: list[RunningServer] = []

    def _serve(app, **uvicorn_settings) -> RunningServer:
        server = RunningServer(app, **uvicorn_settings)
        servers.append(server)
        return server

    yield _serve
    _stop_all(servers)


@pytest.fixture
def start_worker():
    workers: list[RunningWorker] = []

    def _start(**fields) -> RunningWorker:
        worker = RunningWorker(worker_config(**{**WORKER_TEST_DEFAULTS, **fields}))
        workers.append(worker)
        return worker

    yield _start
    _stop_all(workers)


def _stop_all(servers: list[RunningServer]) -> None:
    for server in servers:   # all at once: each takes up to a uvicorn tick (0.1 s) to notice
        server.request_stop()
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def free_tcp_port():
    return free_port


@pytest.fixture
def worker(start_worker) -> RunningWorker:
    """One colocated (role "both") worker with the test defaults."""
    return start_worker()
