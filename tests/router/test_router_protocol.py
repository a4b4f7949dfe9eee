"""The protocol a router process serves with (router.server.uvicorn_options): one write per answer,
header deadlines."""
from router.server import _OneWrite


class Recorder:
    def __init__(self):
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_an_answer_with_a_length_leaves_in_one_write_and_a_stream_head_at_once():
    transport = Recorder()
    out = _OneWrite(transport)
    out.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n")
    assert transport.writes == []   # held for its body
    out.write(b"{}")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"]
    out.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    assert len(transport.writes) == 2   # a stream's head is not held until its first event
    out.write(b"5\r\nhello\r\n")
    assert transport.writes[-1] == b"5\r\nhello\r\n"


def test_the_router_protocol_is_used_where_uvicorn_has_what_it_builds_on_and_uvicorns_own_elsewhere(monkeypatch):
    import router.server as server
    from kvlab.wire.http_server import ServerLimits
    options = server.uvicorn_options(ServerLimits())
    assert issubclass(options["http"], server._RouterProtocol) and options["proxy_headers"] is False
    # A uvicorn whose protocol lacks on_response_complete & co. serves through that protocol itself.
    older = type("OlderProtocol", (), {})
    monkeypatch.setattr(server, "uvicorn_settings", lambda limits: {"http": older, "timeout_keep_alive": 5})
    assert server.uvicorn_options(ServerLimits())["http"] is older


def test_a_keep_alive_requests_half_sent_headers_are_closed_at_the_header_deadline(start_worker, serve):
    import socket
    import time

    import msgspec

    from router.server import uvicorn_options
    from tests.router_fixtures import MODEL, RunningRouter, router_app

    app = router_app([start_worker()])
    limits = app.state.router.config.server
    limits.header_timeout_s = 0.3
    router = RunningRouter(serve(app, **uvicorn_options(limits)), app)
    host, port = router.url.removeprefix("http://").split(":")
    body = msgspec.json.encode({"model": MODEL, "prompt": "hi", "max_tokens": 1})
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        time.sleep(0.6)   # past the header deadline: the idle connection is still open (keep-alive's longer)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")   # and never the blank line
        sock.settimeout(10)
        started = time.perf_counter()
        assert sock.recv(65536) == b""   # closed by the router
        assert time.perf_counter() - started < 9
