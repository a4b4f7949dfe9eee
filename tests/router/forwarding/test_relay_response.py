"""A relayed stream's last chunk goes out with the end of the body, one ASGI message (one write) for
both, where the stream says it has ended (router.forwarding.streaming.RelayResponse)."""
from __future__ import annotations

import asyncio

from router.forwarding.streaming import RelayResponse


class Stream:
    """Chunks as a stream session yields them, with `done` set as the last one is yielded."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks
        self.done = False
        self.closed = False

    async def events(self):
        for i, chunk in enumerate(self.chunks):
            self.done = i == len(self.chunks) - 1
            yield chunk

    async def close(self) -> None:
        self.closed = True


async def _relay(stream: Stream, ended) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()   # the client never leaves
        return {}

    gone = asyncio.get_running_loop().create_future()
    response = RelayResponse(stream.events(), on_close=stream.close, **({"ended": ended} if ended else {}))
    await response({"kvlab.client_gone": gone}, receive, send)
    return sent


def _bodies(sent: list[dict]) -> list[tuple[bytes, bool]]:
    assert sent[0]["type"] == "http.response.start"
    return [(m["body"], m["more_body"]) for m in sent[1:]]


async def test_the_last_chunk_ends_the_body_in_the_same_message():
    stream = Stream([b"data: a\n\n", b"data: b\n\ndata: [DONE]\n\n"])
    sent = await _relay(stream, lambda: stream.done)
    assert _bodies(sent) == [(b"data: a\n\n", True), (b"data: b\n\ndata: [DONE]\n\n", False)]
    assert stream.closed


async def test_without_an_end_signal_the_body_ends_with_an_empty_message():
    stream = Stream([b"data: a\n\n", b"data: [DONE]\n\n"])
    sent = await _relay(stream, None)
    assert _bodies(sent) == [(b"data: a\n\n", True), (b"data: [DONE]\n\n", True), (b"", False)]
    assert stream.closed
