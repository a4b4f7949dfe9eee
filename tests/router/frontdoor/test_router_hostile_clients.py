"""No client can stall the router: huge prompts, slow senders and connection floods are bounded.

Timing assertions compare two measurements of the same run (a /health gap against the request's own
duration), never a wall-clock bound: the test host is shared.
"""
from __future__ import annotations

import itertools
import random
import socket
import threading
import time

import httpx
import pytest

from kvlab.wire.http_server import ServerLimits, uvicorn_settings
from router.config import Limits
from router.frontdoor.tenants import TenantConfig
from tests.router_fixtures import MODEL, RunningRouter, router_app


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection or `timeout` passes."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b'"error"' in out:
                break
    except TimeoutError:
        out += b"<timeout>"
    return out


def _start(serve, workers, server_limits: ServerLimits | None = None, **fields) -> RunningRouter:
    app = router_app(workers, **fields)
    settings = uvicorn_settings(server_limits) if server_limits else {}
    return RunningRouter(serve(app, **settings), app)


def test_a_prompt_longer_than_the_workers_context_is_refused_by_the_router(start_worker, serve):
    worker = start_worker(max_model_len=512)
    router = _start(serve, [worker])
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": list(range(1000, 1600)),
                                                         "max_tokens": 4}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert router.metric("kvlab_router_rejections_total", status="400", reason="context_length_exceeded",
                         tenant="-") == 1
    assert router.metric("kvlab_router_rejections_total", status="400", reason="worker_refused", tenant="-") == 0


def test_a_huge_text_prompt_is_refused_from_a_bound_without_tokenizing_it(start_worker, serve):
    worker = start_worker(max_model_len=2048)
    router = _start(serve, [worker])
    text = " ".join(f"a{j}y{j % 997}" for j in range(200_000))   # ~1.4 MB, ~1M tokens by the bound
    r = httpx.post(router.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prompt" and "at least" in error["message"]
    assert len(router.router.tokenizer.memo._ids) == 0   # the text was never encoded (nor remembered)


@pytest.mark.solo
def test_health_keeps_answering_while_a_huge_prompt_is_tokenized(start_worker, serve):
    worker = start_worker()
    # ~2.5M tokens (5 a word) against a 2M-token input limit that the lower bound (~1.3M: 5.2M non-space
    # characters / 4) cannot settle: tokenized whole, then refused, so the worker never sees it and the
    # request's duration is the router's own work on it (~0.4 s on a quiet host).
    router = _start(serve, [worker], limits=Limits(max_model_len=10**9, max_input_tokens=2_000_000))
    rng = random.Random(7)
    text = " ".join(f"a{j}y{rng.randrange(1000)}" for j in range(500_000))
    answered: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                assert client.get(router.url + "/health").status_code == 200
                answered.append(time.perf_counter())

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    started = time.perf_counter()
    r = httpx.post(router.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1})
    ended = time.perf_counter()
    done.set()
    poller.join()
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    # Tokenized on the event loop, /health went unanswered for most of the request (seen: 0.35 s of 0.40);
    # off it, its longest wait is a few percent of it (0.03 of 0.45). Only the request's own span is read:
    # a pause of the test process before it (building the body) is not the router's.
    during = [started] + [t for t in answered if started < t < ended] + [ended]
    longest = max(b - a for a, b in itertools.pairwise(during))
    assert longest < 0.5 * (ended - started), (longest, ended - started)


def test_a_tenant_over_its_rate_is_refused_before_its_body_is_read(start_worker, serve):
    worker = start_worker()
    tenants = [TenantConfig("t", ["sk-t"], requests_per_s=0.01, requests_burst=1.0)]
    router = _start(serve, [worker], tenants=tenants)
    ok = httpx.post(router.url + "/v1/completions", headers={"Authorization": "Bearer sk-t"},
                    json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=10)
    assert ok.status_code == 200
    with _raw(router.url) as sock:   # headers announce a body that never comes
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        reply = _reply(sock, timeout=10)
    assert reply.startswith(b"HTTP/1.1 429") and b"retry-after" in reply.lower(), reply[:200]


def test_a_body_that_trickles_in_is_cut_off_at_the_body_deadline(start_worker, serve):
    router = _start(serve, [start_worker()], limits=Limits(body_timeout_s=0.5))
    with _raw(router.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        reply = _reply(sock, timeout=10)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_half_sent_headers_are_closed_at_the_header_deadline(start_worker, serve):
    router = _start(serve, [start_worker()], ServerLimits(header_timeout_s=0.5))
    with _raw(router.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")   # and never the blank line
        started = time.perf_counter()
        reply = _reply(sock, timeout=10)
        closed_after = time.perf_counter() - started
    assert reply == b"" and closed_after < 10   # closed by the server, not by our own timeout
    # The router still serves everyone else.
    assert httpx.get(router.url + "/health", timeout=10).status_code == 200


def test_connections_past_the_cap_are_answered_503(start_worker, serve):
    router = _start(serve, [start_worker()], ServerLimits(max_connections=4))
    idle = [_raw(router.url) for _ in range(4)]
    try:
        time.sleep(0.2)
        r = httpx.get(router.url + "/health", timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "too_many_connections"
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(router.url + "/health", timeout=10).status_code == 200
