"""The stream relay counts output tokens from what the upstream says (token_ids, usage) and encodes
output text to ids only where nothing says how many tokens it held (router.forwarding.relay)."""
from __future__ import annotations

import msgspec

from kvlab.wire.openai_api import CompletionRequest
from router.forwarding.relay import StreamRelay
from router.frontdoor.job import Job
from router.policies.base import RouteRequest


class CountingTokenizer:
    """Two ids per text piece, and a record of every encode."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def output_ids(self, text: str) -> list[int]:
        self.encoded.append(text)
        return [len(text), 0]


def _relay(include_usage: bool) -> tuple[StreamRelay, CountingTokenizer]:
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 8, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    raw = msgspec.json.encode(body)
    job = Job("completions", raw, msgspec.json.decode(raw, type=CompletionRequest), max_tokens=8)
    job.set_prompt([1, 2, 3])
    job.route = RouteRequest(blocks=[], prompt_tokens=3)
    tokenizer = CountingTokenizer()
    return StreamRelay(job, tokenizer), tokenizer   # type: ignore[arg-type]


def _event(text: str | None = None, finish: str | None = None, ids: list[int] | None = None,
           completion_tokens: int | None = None) -> bytes:
    chunk: dict = {"id": "c1", "created": 1, "model": "m", "choices": []}
    if text is not None:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        if ids is not None:
            choice["token_ids"] = ids
        chunk["choices"] = [choice]
    if completion_tokens is not None:
        chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": completion_tokens,
                          "total_tokens": 3 + completion_tokens}
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


def test_with_usage_coming_no_chunk_is_encoded_and_usage_gives_the_count():
    relay, tokenizer = _relay(include_usage=True)
    for piece in ("a", "b", "c"):
        assert relay.accept(_event(piece), rewrite=False) is not None   # relayed as it came
        assert relay.streamed == "abc".index(piece) + 1                  # one token a chunk for TTFT/ITL
    relay.accept(_event("", finish="length"), rewrite=False)
    relay.accept(_event(completion_tokens=3), rewrite=False)
    assert relay.completion_tokens == 3
    assert tokenizer.encoded == []


def test_without_usage_text_is_encoded_as_before():
    relay, tokenizer = _relay(include_usage=False)
    for piece in ("a", "bb"):
        relay.accept(_event(piece), rewrite=False)
    assert tokenizer.encoded == ["a", "bb"]
    assert relay.generated == [1, 0, 2, 0] and relay.completion_tokens == 4


def test_usage_that_never_comes_falls_back_to_encoding_each_piece_once():
    relay, tokenizer = _relay(include_usage=True)
    for piece in ("a", "bb"):
        relay.accept(_event(piece), rewrite=False)
    assert relay.completion_tokens == 4 and relay.generated == [1, 0, 2, 0]   # same ids as piece by piece
    assert tokenizer.encoded == ["a", "bb"]
    assert relay.completion_tokens == 4 and tokenizer.encoded == ["a", "bb"]   # encoded once


def test_a_migration_gets_the_ids_of_pending_text_in_order():
    relay, tokenizer = _relay(include_usage=True)
    relay.accept(_event("a", ids=[11]), rewrite=False)
    relay.accept(_event("bb"), rewrite=False)
    relay.accept(_event("c", ids=[13]), rewrite=False)   # ids after pending text: the text is encoded first
    assert relay.generated == [11, 2, 0, 13]
    assert relay.remaining == 8 - 4


def test_token_ids_are_taken_as_sent():
    relay, tokenizer = _relay(include_usage=False)
    relay.accept(_event("ab", ids=[5, 6]), rewrite=False)
    assert relay.generated == [5, 6] and relay.streamed == 2 and tokenizer.encoded == []


def test_a_rewritten_source_reports_every_token_the_client_received():
    relay, _ = _relay(include_usage=True)
    relay.accept(_event("a"), rewrite=False)
    assert relay.generated == [1, 0]   # a migration reads the ids (encodes "a")
    relay.accept(_event("b", ids=[9]), rewrite=True)
    out = relay.accept(_event(completion_tokens=1), rewrite=True)   # the continuation's own count
    assert out is not None and b'"completion_tokens":3' in out
