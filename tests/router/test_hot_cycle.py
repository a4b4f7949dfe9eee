"""The proxied endpoints served from uvicorn's cycle (router.hot_cycle) answer byte for byte as through
the ASGI app: the same exchanges over raw sockets, with and without it, get the same answers."""
from __future__ import annotations

import socket

import msgspec
import pytest

from router.config import Limits
from router.hot_cycle import fits
from router.server import uvicorn_options
from tests.router_fixtures import MODEL, RunningRouter, router_app

BODY = msgspec.json.encode({"model": MODEL, "prompt": "hello there", "max_tokens": 2})


def _post(body: bytes, *extra: bytes, path: bytes = b"/v1/completions") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + b"".join(extra)
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class Reader:
    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """One answer with a Content-Length (or an interim 100 with none)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed mid-head: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
        size = int(headers.get("content-length", "0"))
        while len(self.buf) < size:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        body, self.buf = self.buf[:size], self.buf[size:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        return not self.buf and not self._fill()


def _router(start_worker, serve, hot: bool, **fields) -> RunningRouter:
    app = router_app([start_worker()], **fields)
    options = uvicorn_options(app.state.router.config.server)
    options["http"] = type("Protocol", (options["http"],), {"hot_cycle": hot})
    return RunningRouter(serve(app, **options), app)


def _exchanges(url: str) -> list[tuple[int, list[str], str]]:
    """Keep-alive, an ops path between proxied calls, a refusal, Expect: 100-continue with the body
    sent once asked for, repeated headers, and Connection: close; (status, header names, error code)."""
    host, port = url.removeprefix("http://").split(":")
    out = []
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        read = Reader(sock)

        def record(answer):
            status, headers, body = answer
            code = msgspec.json.decode(body)["error"]["code"] if status >= 400 else None
            out.append((status, sorted(set(headers) - {"x-kvlab-worker"}), code))
            return headers

        sock.sendall(_post(BODY))
        record(read.response())
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        record(read.response())
        sock.sendall(_post(b'{"model": "' + MODEL.encode() + b'", "max_tokens": 1}', path=b"/v1/chat/completions"))
        record(read.response())   # no messages: 400
        sock.sendall(_post(BODY, b"Expect: 100-continue\r\n")[:-len(BODY)])
        assert read.response()[0] == 100   # asked for the body before it is sent
        sock.sendall(BODY)
        record(read.response())
        # Two policy headers: the first counts (a bad one would be a 400), as Starlette's Headers.get.
        sock.sendall(_post(BODY, b"x-kvlab-policy: round_robin\r\nx-kvlab-policy: no-such\r\n"))
        record(read.response())
        sock.sendall(_post(BODY, b"Connection: close\r\n"))
        headers = record(read.response())
        assert headers["connection"] == "close" and read.closed()
    return out


@pytest.mark.skipif(not fits(), reason="this uvicorn's cycle is not the one router.hot_cycle reads")
def test_raw_exchanges_get_the_same_answers_with_and_without_the_hot_cycle(start_worker, serve):
    with_hot = _exchanges(_router(start_worker, serve, True, policy_header=True).url)
    without = _exchanges(_router(start_worker, serve, False, policy_header=True).url)
    assert with_hot == without
    assert [status for status, _, _ in with_hot] == [200, 200, 400, 200, 200, 200]
    assert "content-length" in with_hot[0][1] and "date" in with_hot[0][1] and "server" in with_hot[0][1]


@pytest.mark.parametrize("hot", [True, False])
def test_a_trickling_body_gets_408_and_an_oversized_one_413_and_the_router_keeps_serving(start_worker, serve, hot):
    router = _router(start_worker, serve, hot, limits=Limits(body_timeout_s=0.3, max_body_bytes=4096))
    host, port = router.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_post(BODY)[:-4])   # the body's last bytes never come
        status, headers, body = Reader(sock).response()
        assert status == 408 and headers["connection"] == "close"
        assert msgspec.json.decode(body)["error"]["code"] == "request_timeout"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Chunked: no Content-Length to refuse it by; the body is cut off once past the limit.
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(8)))
        status, _, body = Reader(sock).response()
        assert status == 413 and msgspec.json.decode(body)["error"]["code"] == "request_too_large"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_post(BODY)[:-4])   # and leaves before sending the rest
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_post(BODY))
        assert Reader(sock).response()[0] == 200
