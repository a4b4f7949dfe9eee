"""Server-sent events from an upstream worker: split into events, read the few fields the router needs.

The router relays events byte for byte when it can; it only looks inside them to learn which tokens
were generated (for migration and usage) and whether the stream ended. Decoding only those fields with
msgspec costs about a microsecond per event.
"""
from __future__ import annotations

import msgspec

DONE = b"[DONE]"


class Delta(msgspec.Struct):
    content: str | None = None


class Choice(msgspec.Struct):
    text: str | None = None                 # completions
    delta: Delta | None = None              # chat completions
    finish_reason: str | None = None
    token_ids: list[int] | None = None      # vLLM >= 0.10.2 with return_token_ids


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: dict | None = None

    @property
    def cached_tokens(self) -> int:
        details = self.prompt_tokens_details or {}
        return int(details.get("cached_tokens") or 0)


class Chunk(msgspec.Struct):
    id: str = ""
    created: int = 0
    choices: list[Choice] = []
    usage: Usage | None = None
    error: dict | None = None
    token_gaps: list[float] | None = None   # kvlab workers coalescing tokens: each token's emulated gap


# decode_chunk(data) -> Chunk; raises msgspec.DecodeError on a malformed event (the caller treats the
# worker as failed). The decoder's own method, not a function around it: it runs for every event.
decode_chunk = msgspec.json.Decoder(Chunk).decode


def data_of(event: bytes) -> bytes | None:
    """The payload of a ``data:`` event (None for comments and keep-alives)."""
    if event.startswith(b"data:"):   # nearly every event: its first line is the one (no split)
        end = event.find(b"\n")
        return (event[5:end] if end >= 0 else event[5:]).strip()
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:].strip()
    return None


class EventSplitter:
    """Whole events (each ending in a blank line) from arbitrary byte chunks of a stream."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, part: bytes) -> list[bytes]:
        buffer = self._buffer + part if self._buffer else part
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            events.append(buffer[start:end + 2])
            start = end + 2
        self._buffer = buffer[start:]
        return events

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished event remain (a stream cut mid-event)."""
        return bool(self._buffer.strip())
