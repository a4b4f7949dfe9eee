"""OpenAI completions and chat completions on top of a WorkerRuntime.

A decoded request becomes a ``Job`` (prompt token ids, sampling parameters, handoff); ``respond``
submits it and answers with an SSE stream or one JSON body. A client that goes away aborts its
request so its KV blocks are freed: for streams, Starlette cancels the generator on disconnect and
its ``finally`` aborts; for plain responses a watcher awaits the ASGI disconnect message.
"""
from __future__ import annotations

import asyncio
import time
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kvlab.wire import openai_api as api
from kvlab.wire.openai_api import ApiError, ChatCompletionRequest, CompletionRequest
from kvlab.wire.tokenizer import EOS_TOKEN_ID, apply_chat_template
from workers.config import MAX_STREAM_INTERVAL
from workers.core.engine import EngineError, Finished, QueueFull
from workers.core.request import SamplingParams
from workers.driver import RequestStream
from workers.handoff import Handoff, parse_handoff, prefill_params
from workers.runtime import WorkerRuntime

RETRY_AFTER_S = "1"                       # a full queue drains in about a batch's decode time
_FINISH_REASON = {"held": "length"}       # a prefill worker stops after its one token, as with max_tokens=1


class Job(msgspec.Struct, kw_only=True):
    kind: Literal["completion", "chat"]
    request_id: str
    model: str
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    handoff: Handoff
    priority: int = 0
    salt: str | None = None
    stream_interval: int = 1


def json_response(payload, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(payload), status_code=status, headers=headers,
                    media_type="application/json")


# -- requests to jobs ------------------------------------------------------------------------
def completion_job(body: CompletionRequest, rt: WorkerRuntime) -> Job:
    _check_model_and_n(body, rt)
    prompt = api.prompt_input(body.prompt)
    ids = rt.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return _job("completion", "cmpl", body, ids, body.max_tokens, rt.cfg.completion_max_tokens, rt)


def chat_job(body: ChatCompletionRequest, rt: WorkerRuntime) -> Job:
    _check_model_and_n(body, rt)
    if not body.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    text = apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
    ids = rt.tokenizer.encode(text)
    return _job("chat", "chatcmpl", body, ids, body.output_limit(), rt.cfg.chat_max_tokens, rt)


def _check_model_and_n(body, rt: WorkerRuntime) -> None:
    if body.model not in rt.cfg.accepted_models:
        raise ApiError(404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found")
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")


def _job(kind, prefix: str, body, prompt: list[int], max_tokens: int | None, default: int,
         rt: WorkerRuntime) -> Job:
    _check_token_ids(prompt, rt.engine.dep.model.vocab)
    handoff = parse_handoff(body.kv_transfer_params, rt.cfg.role, rt.cfg.peers)
    if max_tokens is None:   # default, clipped to what the context leaves (at least 1: too long fails later)
        max_tokens = max(1, min(default, rt.engine.max_model_len - len(prompt)))
    params = _sampling(body, max_tokens, handoff)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Job(kind=kind, request_id=api.new_id(prefix), model=body.model, prompt=prompt, params=params,
               stream=body.stream, include_usage=include_usage, handoff=handoff, priority=body.priority,
               salt=body.cache_salt, stream_interval=_stream_interval(body, rt))


def _stream_interval(body, rt: WorkerRuntime) -> int:
    n = rt.cfg.stream_interval if body.stream_interval is None else body.stream_interval
    if not 1 <= n <= MAX_STREAM_INTERVAL:
        raise ApiError(400, f"stream_interval must be in 1..{MAX_STREAM_INTERVAL} (got {n})", param="stream_interval")
    return n


def _check_token_ids(prompt: list[int], vocab: int) -> None:
    if prompt and max(prompt) >= vocab:
        raise ApiError(400, f"token id {max(prompt)} is outside the vocabulary (size {vocab})", param="prompt")


def _sampling(body, max_tokens: int, handoff: Handoff) -> SamplingParams:
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1 (got {max_tokens})", param="max_tokens")
    if handoff.source is not None and max_tokens < 2:
        # The prefill worker produced token 1; a decode worker would still emit one more.
        raise ApiError(400, "a remote-prefill request needs max_tokens >= 2", param="max_tokens")
    if not 0 <= body.min_tokens <= max_tokens:
        raise ApiError(400, f"min_tokens must be in [0, max_tokens] (got {body.min_tokens})", param="min_tokens")
    if not 0.0 <= body.eos_probability <= 1.0:
        raise ApiError(400, "eos_probability must be in [0, 1]", param="eos_probability")
    return SamplingParams(max_tokens=max_tokens, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                          eos_probability=body.eos_probability)


# -- jobs to responses -----------------------------------------------------------------------
async def respond(job: Job, rt: WorkerRuntime, request: Request) -> Response:
    stream = _submit(job, rt)
    if job.stream and not job.handoff.remote_decode:   # a handoff answer is always one JSON body
        return StreamingResponse(_sse(job, stream, rt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    tokens = await _collect_unless_gone(job, stream, rt, request)
    if tokens is None:
        return Response(status_code=499)   # nobody is listening; nginx's "client closed request"
    return json_response(_full_body(job, tokens, stream.outcome, rt, request))


def _submit(job: Job, rt: WorkerRuntime) -> RequestStream:
    try:
        return rt.submit(job.request_id, job.prompt, job.params, job.handoff, job.priority, job.salt)
    except EngineError as exc:
        raise ApiError(400, str(exc)) from None
    except QueueFull as exc:
        raise ApiError(503, str(exc), type_="server_error", code="queue_full",
                       headers={"Retry-After": RETRY_AFTER_S}) from None


async def _collect_unless_gone(job: Job, stream: RequestStream, rt: WorkerRuntime,
                               request: Request) -> list[int] | None:
    collect = asyncio.ensure_future(_collect(stream))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():   # client gone (or this handler cancelled): free the blocks
            collect.cancel()
            rt.abort(job.request_id)
    return collect.result() if collect.done() and not collect.cancelled() else None


async def _collect(stream: RequestStream) -> list[int]:
    return [out.token async for out in stream]


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _text(rt: WorkerRuntime, tokens: list[int]) -> str:
    return rt.tokenizer.decode([t for t in tokens if t != EOS_TOKEN_ID])


def _usage(fin: Finished) -> dict:
    return api.usage(fin.prompt_tokens, fin.output_tokens, fin.cached_tokens)


def _full_body(job: Job, tokens: list[int], fin: Finished, rt: WorkerRuntime, request: Request) -> dict:
    if fin.reason == "abort":
        raise ApiError(503, "the request was aborted by the worker", type_="server_error", code="aborted")
    extra = None
    if job.handoff.remote_decode:
        extra = {"kv_transfer_params": _handoff_params(job, tokens, fin, rt, request)}
    build = api.chat_body if job.kind == "chat" else api.completion_body
    return build(job.request_id, job.model, _text(rt, tokens), _FINISH_REASON.get(fin.reason, fin.reason),
                 _usage(fin), extra)


def _handoff_params(job: Job, tokens: list[int], fin: Finished, rt: WorkerRuntime, request: Request) -> dict | None:
    if fin.reason != "held":
        return None   # the first token ended the request (EOS): nothing to decode, nothing held
    base_url = rt.cfg.advertise_url or str(request.base_url)
    return prefill_params(job.request_id, base_url.rstrip("/"), rt.cfg.worker_id, tokens[0],
                          fin.prompt_tokens, fin.cached_tokens)


async def _sse(job: Job, stream: RequestStream, rt: WorkerRuntime):
    """The first token alone (TTFT is not delayed), then chunks of `job.stream_interval` tokens. Every
    chunk after the first names its tokens' emulated gaps (`token_gaps`, one per token, from the
    previous token of this stream): coalescing saves the host per-chunk work without blurring ITL."""
    created, rid, model = int(time.time()), job.request_id, job.model
    chat = job.kind == "chat"
    last: float | None = None
    try:
        if chat:
            yield api.sse(api.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
        while outs := await stream.take(1 if last is None else job.stream_interval):
            outs = [o for o in outs if o.token != EOS_TOKEN_ID]
            if job.stream_interval == 1:   # one chunk per token, as vLLM streams
                for o in outs:
                    yield api.sse(_chunk(chat, rid, model, created, rt.tokenizer.decode([o.token]), None))
            elif outs:
                chunk = _chunk(chat, rid, model, created, rt.tokenizer.decode([o.token for o in outs]), None)
                gaps = _gaps(outs, last)
                if gaps:
                    chunk["token_gaps"] = gaps
                yield api.sse(chunk)
            if outs:
                last = outs[-1].time
        for part in _sse_tail(job, stream.outcome, created):
            yield part
    finally:
        if stream.finished is None:   # cancelled or closed early: the client went away
            rt.abort(rid)


def _gaps(outs, last: float | None) -> list[float]:
    """Emulated seconds between each token and the one before it in this stream (the stream's very
    first token has none)."""
    times = ([] if last is None else [last]) + [o.time for o in outs]
    return [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]


def _chunk(chat: bool, rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    if chat:
        return api.chat_chunk(rid, model, created, {"content": text} if text else {}, finish)
    return api.completion_chunk(rid, model, created, text, finish)


def _sse_tail(job: Job, fin: Finished, created: int) -> list[bytes]:
    if fin.reason == "abort":
        err = ApiError(503, "the request was aborted by the worker", type_="server_error", code="aborted")
        return [api.sse_error(err), api.SSE_DONE]
    chat = job.kind == "chat"
    parts = [api.sse(_chunk(chat, job.request_id, job.model, created, "", _FINISH_REASON.get(fin.reason, fin.reason)))]
    if job.include_usage:
        obj = "chat.completion.chunk" if chat else "text_completion"
        parts.append(api.sse(api.usage_chunk(job.request_id, job.model, created, obj, _usage(fin))))
    parts.append(api.SSE_DONE)
    return parts
