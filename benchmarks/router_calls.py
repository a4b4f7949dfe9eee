"""Python calls per request in one router process: a timing-free measure of what the router does.

A stub OpenAI server (benchmarks/openai_stub.py, a process of its own) sits behind a router run in
this process on uvloop, as `kvlab router` runs it (httptools, the router's protocol, prefix_bounded,
no KV events); a client thread sends requests one at a time over one keep-alive connection. cProfile
watches only the router's event-loop thread, and only after a warm-up, so the counts are the router's
own steady-state work: they do not move with host load, unlike CPU time.

Prints, per request, every call cProfile sees (Python functions and C builtins alike) and the Python
functions alone, for a non-streaming request (max_tokens 1) and streaming ones at two lengths (usage
requested, as benchmarks/router_peers.py asks); the difference between the two lengths over their token
difference is the relay's cost per SSE event. The stub writes a stream in one go (the router reads its
events together) unless --event-gap-ms paces it, an event per write, as workers stream: then the cost per
event includes a read, a relay step and a write to the client. With --top N, the N functions called most
per request.

Run: PYTHONPATH=. .venv/bin/python benchmarks/router_calls.py [--requests 200] [--top 25] [--event-gap-ms 1]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import uvicorn
import uvloop

from router.config import RouterConfig, WorkerConfig
from router.server import create_app, uvicorn_options

HERE = Path(__file__).resolve().parent
MODEL = "Llama-3.1-8B"
WARM_UP = 50
SHORT, LONG = 16, 64   # streamed tokens: the per-event cost is the difference over LONG - SHORT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def body(i: int, stream: bool, max_tokens: int) -> bytes:
    """A ~64-token prompt, distinct per request (as benchmarks/router_peers.py sends)."""
    payload: dict = {"model": MODEL, "prompt": f"request {i}: " + " ".join(f"w{(i * 7 + k) % 997}" for k in range(60)),
                     "max_tokens": max_tokens, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return msgspec.json.encode(payload)


class Client:
    """Blocking HTTP/1.1 over one keep-alive connection: whole answers, Content-Length or chunked."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, payload: bytes) -> bytes:
        self.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        head = self._until(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode("latin-1"))
        if b"transfer-encoding: chunked" in head.lower():
            return self._until(b"\r\n0\r\n\r\n")
        size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(self.buf) < size:
            self._fill()
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def _until(self, end: bytes) -> bytes:
        while (at := self.buf.find(end)) < 0:
            self._fill()
        out, self.buf = self.buf[:at + len(end)], self.buf[at + len(end):]
        return out

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("router closed the connection")
        self.buf += chunk


class RouterThread:
    """The router app served by uvicorn on uvloop in a thread of its own, profiled on demand."""

    def __init__(self, stub_urls: str | list[str]):
        self.port = free_port()
        urls = [stub_urls] if isinstance(stub_urls, str) else stub_urls
        workers = [WorkerConfig(url=url, id="stub" if len(urls) == 1 else f"stub{i}") for i, url in enumerate(urls)]
        app = create_app(RouterConfig(workers=workers, policy="prefix_bounded", kv_events="off"))
        self.router = app.state.router
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, loop="none", log_level="warning",
                                access_log=False, **uvicorn_options(app.state.router.config.server))
        self.server = uvicorn.Server(config)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.profile: cProfile.Profile | None = None

    def _in_loop(self, fn) -> None:
        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (fn(), done.set()))
        done.wait(5)

    def start_profile(self) -> None:
        self.profile = cProfile.Profile()
        self._in_loop(self.profile.enable)

    def stop_profile(self) -> pstats.Stats:
        assert self.profile is not None
        self._in_loop(self.profile.disable)
        return pstats.Stats(self.profile)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def calls(stats: pstats.Stats) -> tuple[int, int]:
    """(every call, Python functions only) in a profile."""
    python = sum(nc for (file, _, _), (_, nc, *_r) in stats.stats.items() if file != "~")  # type: ignore[attr-defined]
    return stats.total_calls, python  # type: ignore[attr-defined]


def measure(router: RouterThread, client: Client, n: int, stream: bool, tokens: int, top: int) -> tuple[float, float]:
    for i in range(WARM_UP):
        client.post(body(i, stream, tokens))
    router.start_profile()
    for i in range(WARM_UP, WARM_UP + n):
        client.post(body(i, stream, tokens))
    stats = router.stop_profile()
    total, python = calls(stats)
    if top:
        print(f"  top {top} by calls per request ({'stream ' + str(tokens) if stream else 'non-streaming'}):")
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][1])[:top]  # type: ignore[attr-defined]
        for (file, line, name), (_, nc, *_r) in rows:
            print(f"    {nc / n:8.2f}  {Path(file).name}:{line}({name})")
    return total / n, python / n


def wait_healthy(port: int, seconds: float = 60.0, workers: int = 1) -> None:
    """Until the router's health probe has found the stubs up (a busy host starts them slowly)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if b'"workers_up":%d' % workers in sock.recv(4096):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the router found its stubs not all healthy within a minute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--top", type=int, default=0, help="list the N most-called functions per request")
    parser.add_argument("--event-gap-ms", type=float, default=0.0, help="the stub's pace: an event per write")
    args = parser.parse_args()
    stub_port = free_port()
    stub = subprocess.Popen([sys.executable, str(HERE / "openai_stub.py"), "--port", str(stub_port),
                             "--event-gap-ms", str(args.event_gap_ms)])
    try:
        router = RouterThread(f"http://127.0.0.1:{stub_port}")
        wait_healthy(router.port)
        client = Client(router.port)
        plain = measure(router, client, args.requests, False, 1, args.top)
        short = measure(router, client, args.requests, True, SHORT, args.top)
        long = measure(router, client, args.requests, True, LONG, args.top)
        router.stop()
    finally:
        stub.terminate()
    per_event = [(b - a) / (LONG - SHORT) for a, b in zip(short, long, strict=True)]
    paced = f", events {args.event_gap_ms:g} ms apart" if args.event_gap_ms else ", events in one write"
    print(f"calls per request (all / Python functions), {args.requests} requests each{paced}:")
    print(f"  non-streaming:              {plain[0]:8.1f} / {plain[1]:8.1f}")
    print(f"  streaming, {SHORT} tokens:       {short[0]:8.1f} / {short[1]:8.1f}")
    print(f"  streaming, {LONG} tokens:       {long[0]:8.1f} / {long[1]:8.1f}")
    print(f"  per SSE event:              {per_event[0]:8.2f} / {per_event[1]:8.2f}")


if __name__ == "__main__":
    main()
