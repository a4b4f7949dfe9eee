"""A client that leaves is a client's doing, not the router's failure: whether it goes mid-body,
mid-call or mid-stream, the router counts it as a client disconnect (499, never a 5xx), logs no error,
cancels what it had started upstream, and keeps serving."""
from __future__ import annotations

import logging
import socket

import msgspec
import pytest

from router.config import RouterConfig, WorkerConfig
from router.server import create_app, uvicorn_options
from tests.router.forwarding.test_router_backpressure import EndlessWorker, open_stream, wait_until
from tests.router_fixtures import MODEL

# The three ways a proxied request is served: plain uvicorn (disconnects seen through ``receive``), a
# router process's protocol through the ASGI app, and that protocol's hot cycle (router.hot_cycle).
SERVINGS = ["uvicorn's", "asgi app", "hot cycle"]


class Records(logging.Handler):
    """Every record at WARNING or above that the router's and uvicorn's loggers emit."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def warnings_logged():
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("kvlab.router", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def _router(serve, serving: str):
    worker = EndlessWorker()
    upstream = serve(worker.app)
    app = create_app(RouterConfig(workers=[WorkerConfig(url=upstream.url, id="endless")]))
    options = {}
    if serving != "uvicorn's":
        options = uvicorn_options(app.state.router.config.server)
        options["http"] = type("Protocol", (options["http"],), {"hot_cycle": serving == "hot cycle"})
    return worker, app.state.router, serve(app, **options)


def _answered(router) -> dict[str, float]:
    """kvlab_router_requests_total by status."""
    return {s.labels["status"]: s.value for metric in router.metrics.registry.collect()
            if metric.name == "kvlab_router_requests" for s in metric.samples if s.name.endswith("_total")}


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


@pytest.mark.parametrize("serving", SERVINGS)
def test_a_client_that_leaves_mid_body_is_counted_as_a_disconnect_not_an_error(serve, serving, warnings_logged):
    worker, router, server = _router(serve, serving)
    body = msgspec.json.encode({"model": MODEL, "prompt": "cut short", "max_tokens": 1})
    with socket.create_connection(_address(server.url)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
        assert wait_until(lambda: router.pool.views() and router.pool.views()[0].healthy)
    assert wait_until(lambda: _answered(router).get("499") == 1), _answered(router)
    assert not [status for status in _answered(router) if status.startswith("5")], _answered(router)
    assert not warnings_logged, [r.getMessage() for r in warnings_logged]
    internal = {"status": "500", "reason": "internal_error", "tenant": "-"}
    assert router.metrics.registry.get_sample_value("kvlab_router_rejections_total", internal) is None


@pytest.mark.parametrize("serving", SERVINGS)
def test_a_client_that_leaves_mid_stream_cancels_its_upstream_stream_and_logs_no_error(serve, serving,
                                                                                       warnings_logged):
    worker, router, server = _router(serve, serving)
    in_flight = lambda: sum(v.in_flight for v in router.pool.views())   # noqa: E731
    sock = open_stream(server.url)
    assert wait_until(lambda: worker.produced > 0)
    sock.close()                           # mid-stream
    assert wait_until(lambda: worker.closed) and wait_until(lambda: in_flight() == 0)
    sock = open_stream(server.url, stream=False)
    assert wait_until(lambda: in_flight() == 1)
    sock.close()                           # mid-call
    assert wait_until(lambda: in_flight() == 0)
    assert wait_until(lambda: _answered(router).get("499") == 1), _answered(router)
    assert _answered(router) == {"200": 1, "499": 1}   # the stream was answered (200) before it was cut
    assert not warnings_logged, [r.getMessage() for r in warnings_logged]
