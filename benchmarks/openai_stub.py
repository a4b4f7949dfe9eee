"""A stub OpenAI server for router benchmarks: answers at once, so what a router adds is all that is timed.

POST /v1/completions and /v1/chat/completions answer `max_tokens` tokens (" tok" each): one JSON body, or
an SSE stream (chunked) with a usage chunk when ``stream_options.include_usage`` asks for one; it sends
no token ids, as a stock OpenAI server. GET /v1/models lists one model; any other GET (/health, the
server-info paths some routers poll) answers {}. HTTP/1.1 keep-alive on uvloop with httptools.
A stream goes out in one write, unless --event-gap-ms paces it: then each event is a write of its own,
that long after the one before (as a worker streams a token per engine step).

Run: python benchmarks/openai_stub.py --port 9001 [--model NAME] [--event-gap-ms 1]
"""
from __future__ import annotations

import argparse
import asyncio
import time

import httptools
import msgspec

MODEL = "Llama-3.1-8B"


class StubProtocol(asyncio.Protocol):
    model = MODEL
    event_gap_s = 0.0   # > 0: a stream's events are written one at a time, this far apart

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method, path = self.parser.get_method(), self.url.split(b"?", 1)[0]
        body, self.url, self.body = b"".join(self.body), b"", []
        if method == b"POST" and path in (b"/v1/completions", b"/v1/chat/completions"):
            parts = answer_parts(path == b"/v1/chat/completions", msgspec.json.decode(body), self.model)
            if self.event_gap_s and len(parts) > 1:
                self._paced(parts, 0)
            else:
                self.transport.write(b"".join(parts))
        elif method == b"GET" and path == b"/v1/models":
            self.transport.write(_plain(200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}))
        elif method == b"GET":
            self.transport.write(_plain(200, {}))
        else:
            self.transport.write(_plain(404, {"error": {"message": "not found"}}))
        if not self.parser.should_keep_alive():
            self.transport.close()


    def _paced(self, parts: list[bytes], i: int) -> None:
        """Write part i now and the next one event_gap_s later (chained: timers alone may reorder)."""
        if self.transport.is_closing():
            return
        self.transport.write(parts[i])
        if i + 1 < len(parts):
            asyncio.get_running_loop().call_later(self.event_gap_s, self._paced, parts, i + 1)


def _plain(status: int, payload: dict) -> bytes:
    body = msgspec.json.encode(payload)
    return (b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (status, len(body))
            + body)


def answer(chat: bool, request: dict, model: str) -> bytes:
    return b"".join(answer_parts(chat, request, model))


def answer_parts(chat: bool, request: dict, model: str) -> list[bytes]:
    """The answer's bytes: one part, or for a stream a part per event (the head goes with the first,
    the chunked terminator with [DONE])."""
    n = max(1, min(int(request.get("max_tokens") or 16), 4096))
    rid, created = "cmpl-stub", int(time.time())
    usage = {"prompt_tokens": 64, "completion_tokens": n, "total_tokens": 64 + n}
    if not request.get("stream"):
        text = " tok" * n
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                  if chat else {"index": 0, "text": text, "finish_reason": "length"})
        obj = "chat.completion" if chat else "text_completion"
        return [_plain(200, {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                             "usage": usage})]
    obj = "chat.completion.chunk" if chat else "text_completion"
    events = []
    for i in range(n):
        finish = "length" if i == n - 1 else None
        choice = ({"index": 0, "delta": {"content": " tok"}, "finish_reason": finish} if chat
                  else {"index": 0, "text": " tok", "finish_reason": finish})
        events.append({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})
    if (request.get("stream_options") or {}).get("include_usage"):
        events.append({"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
    out = [b"%x\r\n%s\r\n" % (len(payload), payload)
           for payload in [*(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events), b"data: [DONE]\n\n"]]
    out[0] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + out[0]
    out[-1] += b"0\r\n\r\n"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--event-gap-ms", type=float, default=0.0, help="pace a stream's events this far apart")
    args = parser.parse_args()
    StubProtocol.model = args.model
    StubProtocol.event_gap_s = args.event_gap_ms / 1e3
    import uvloop

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(StubProtocol, args.host, args.port, backlog=2048)
        await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
