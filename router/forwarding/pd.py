"""Disaggregated serving: a prefill worker computes the prompt and the first token, a decode worker
the rest, in vLLM's ``kv_transfer_params`` protocol.

1. POST the request to the prefill worker, non-streaming, with ``{"do_remote_decode": true}``.
   It answers with the first token and the params a decode worker needs to pull the KV.
2. Send the client the first token at once: that is the request's time to first token.
3. POST the request to the decode worker with those params; it streams tokens 2..N, which the
   router relays under the same response id.

If the first token ends the request (EOS, or max_tokens = 1) no decode worker is called and the
router releases the KV the prefill worker is holding. Whether to disaggregate at all is the policy's
call (``Decision.prefill_worker``; None means the decode worker prefills locally).
"""
from __future__ import annotations

import logging

import httpx
import msgspec

from kvlab.wire.openai_api import SSE_DONE, sse
from router.forwarding.sse import Usage
from router.forwarding.upstream import Upstream, UpstreamFailure, UpstreamStream
from router.frontdoor.body import with_fields
from router.frontdoor.tokenize import PromptTokenizer
from router.pool.worker_pool import Worker

log = logging.getLogger("kvlab.router.pd")


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    message: _Message | None = None
    finish_reason: str | None = None


class PrefillAnswer(msgspec.Struct):
    id: str = ""
    created: int = 0
    choices: list[_Choice] = []
    usage: Usage | None = None
    kv_transfer_params: dict | None = None

    @property
    def text(self) -> str:
        if not self.choices:
            return ""
        choice = self.choices[0]
        if choice.text is not None:
            return choice.text
        return (choice.message.content or "") if choice.message else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


_answer = msgspec.json.Decoder(PrefillAnswer)


async def prefill(upstream: Upstream, worker: Worker, path: str, body: bytes) -> tuple[PrefillAnswer, bytes]:
    """Step 1: the decoded answer and its raw body; an unreadable answer counts as a failed worker."""
    fields = {"stream": False, "stream_options": None, "kv_transfer_params": {"do_remote_decode": True}}
    content = await upstream.post(worker.id, worker.endpoint(path), with_fields(body, fields))
    try:
        return _answer.decode(content), content
    except msgspec.MsgspecError as exc:
        raise UpstreamFailure(worker.id, f"unreadable prefill answer: {exc}", dead=False) from None


def decode_body(body: bytes, answer: PrefillAnswer) -> bytes:
    return with_fields(body, {"kv_transfer_params": answer.kv_transfer_params})


def needs_decode(answer: PrefillAnswer, max_tokens: int) -> bool:
    return answer.kv_transfer_params is not None and max_tokens > 1 and answer.finish_reason != "stop"


async def release_held(client: httpx.AsyncClient, answer: PrefillAnswer, timeout_s: float) -> None:
    """Free the KV a prefill worker holds for a decode that will not come (best effort)."""
    params = answer.kv_transfer_params or {}
    url, rid = params.get("remote_url"), params.get("remote_request_id")
    if not url or not rid:
        return
    try:
        await client.post(f"{url}/v1/kv/release", json={"request_id": rid}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        log.info("release of %s at %s failed (the worker's hold timeout frees it): %r", rid, url, exc)


def first_token_events(answer: PrefillAnswer, tokenizer: PromptTokenizer, last: bool) -> list[bytes]:
    """The prefill answer as upstream-format SSE events for the relay (it rewrites them for the client)."""
    params = answer.kv_transfer_params or {}
    first = params.get("first_token")
    ids = [first] if isinstance(first, int) else tokenizer.output_ids(answer.text) if answer.text else []
    choice = {"index": 0, "text": answer.text, "token_ids": ids,
              "finish_reason": answer.finish_reason if last else None}
    events = [sse({"id": answer.id, "created": answer.created, "choices": [choice]})]
    if last:
        if answer.usage is not None:
            events.append(sse({"id": answer.id, "choices": [], "usage": msgspec.to_builtins(answer.usage)}))
        events.append(SSE_DONE)
    return events


class DisaggregatedSource:
    """A P/D attempt as one event source for the stream relay: the first token, then the decode stream.

    The prefill worker's charge was released when its answer came; ``on_release(decode)`` releases
    the decode worker's when this source closes.
    """
    rewrite = True   # the client sees one response id: the decode worker's events are rebuilt

    def __init__(self, upstream: Upstream, decode: Worker, path: str, body: bytes,
                 answer: PrefillAnswer, tokenizer: PromptTokenizer, on_release, max_tokens: int):
        self.upstream = upstream
        self.decode = decode
        self.worker_id = decode.id
        self._path = path
        self._body = body
        self._answer = answer
        self._on_release = on_release
        self._decode_needed = needs_decode(answer, max_tokens)
        self._pending = first_token_events(answer, tokenizer, last=not self._decode_needed)
        self._stream: UpstreamStream | None = None
        self._closed = False

    @property
    def prefill_only(self) -> bool:
        return not self._decode_needed

    async def next_events(self) -> list[bytes]:
        if self._pending:
            pending, self._pending = self._pending, []
            return pending
        if not self._decode_needed:
            return []
        if self._stream is None:
            body = decode_body(self._body, self._answer)
            self._stream = await self.upstream.open_stream(self.decode.id, self.decode.endpoint(self._path), body)
        return await self._stream.next_events()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            await self._stream.aclose()
        self._on_release(self.decode)


def merged_body(answer: PrefillAnswer, prefilled: bytes, decoded: bytes | None) -> bytes:
    """Non-streaming P/D: the decode worker's JSON answer with the first token's text put in front
    (or the prefill answer alone when the first token ended the request)."""
    if decoded is None:
        body = msgspec.json.decode(prefilled)
        body.pop("kv_transfer_params", None)
        return msgspec.json.encode(body)
    body = msgspec.json.decode(decoded)
    choice = body["choices"][0]
    if "message" in choice:
        choice["message"]["content"] = answer.text + (choice["message"].get("content") or "")
    else:
        choice["text"] = answer.text + (choice.get("text") or "")
    usage = body.get("usage")
    if answer.usage is not None and isinstance(usage, dict):
        usage["prompt_tokens_details"] = {"cached_tokens": answer.usage.cached_tokens}
    return msgspec.json.encode(body)
