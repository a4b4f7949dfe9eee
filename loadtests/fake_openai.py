"""A stand-in OpenAI streaming server with exact, configurable timing (stdlib only).

For trying locustfiles without a cluster and for testing the measurement itself: the first token
leaves `ttft_s` after the request arrives, then one token every `gap_s`; `max_tokens` tokens in all
(or `tokens`, when set: short answers whatever the workload asks for).

    python -m loadtests.fake_openai --port 9000 --ttft 0.05 --gap 0.01
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-model"


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024   # bursts of hundreds of connections must not be refused at accept()

    def __init__(self, port: int = 0, ttft_s: float = 0.05, gap_s: float = 0.01, status: int = 200,
                 tokens: int | None = None, cluster_time_scale: float | None = None):
        super().__init__(("127.0.0.1", port), _Handler)
        self.ttft_s, self.gap_s, self.status, self.tokens = ttft_s, gap_s, status, tokens
        self.cluster_time_scale = cluster_time_scale   # set: answer GET /cluster as a kvlab router would
        self.received: list[dict] = []    # request bodies, for assertions

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        pass   # clients hang up mid-stream when a load test ends: expected, not worth a traceback

    def start(self) -> FakeOpenAI:
        threading.Thread(target=self.serve_forever, name="fake-openai", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOpenAI

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/cluster" and self.server.cluster_time_scale is not None:
            self._json(200, {"cluster": {"time_scale": self.server.cluster_time_scale}})
            return
        self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.received.append({**body, "_auth": self.headers.get("Authorization")})
        if self.server.status != 200:
            self._json(self.server.status, {"error": {"message": "refused by the fake", "type": "test"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._stream(body)

    def _stream(self, body: dict) -> None:
        n, chat = self.server.tokens or int(body.get("max_tokens") or 16), "messages" in body
        start = time.perf_counter()
        for i in range(n):
            # sleep to an absolute schedule so scheduling jitter does not accumulate across tokens
            time.sleep(max(0.0, start + self.server.ttft_s + i * self.server.gap_s - time.perf_counter()))
            choice = {"index": 0, "delta": {"content": " tok"}} if chat else {"index": 0, "text": " tok"}
            self._event({"choices": [choice]})
        self._event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n,
                                              "prompt_tokens_details": {"cached_tokens": 0}}})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, payload: dict) -> None:
        self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--ttft", type=float, default=0.05)
    parser.add_argument("--gap", type=float, default=0.01)
    args = parser.parse_args()
    server = FakeOpenAI(args.port, args.ttft, args.gap)
    print(f"fake OpenAI server on {server.url}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
