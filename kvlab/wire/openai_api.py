"""OpenAI HTTP API shapes shared by the worker and router servers, decoded and encoded with msgspec.

Requests accept the fields real clients send (unknown fields are ignored, as OpenAI-compatible
servers do) plus vLLM's extensions (ignore_eos, min_tokens, priority, cache_salt,
kv_transfer_params) and kvlab's own (eos_probability). Errors use OpenAI's body:
``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

Prompt = str | list[Any]   # text, [text], token ids, or [token ids]; see prompt_input()


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


# Tenant priority classes and the `priority` value the router forces into upstream bodies for them
# (vLLM's convention: with --scheduling-policy priority, a lower value is scheduled first).
PRIORITY_CLASSES = {"interactive": 0, "batch": 1}


class _Common(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    # vLLM extensions
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = 0
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    # kvlab extension: per-token chance of end-of-sequence (0 means exactly max_tokens)
    eos_probability: float = 0.0
    # kvlab extension: tokens per SSE chunk after the first (None: the worker's setting)
    stream_interval: int | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: Prompt


MAX_TOKEN_ID = 2**31 - 1   # block hashes read ids as int32 (vocabularies are far smaller: Llama-3's is 128,256)


def prompt_input(prompt: Prompt) -> str | list[int]:
    """The one prompt of a completion request: its text or its token ids."""
    if isinstance(prompt, str):
        return _non_empty(prompt)
    if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return prompt_input(prompt[0])
    if prompt and all(type(t) is int for t in prompt):
        if any(t < 0 or t > MAX_TOKEN_ID for t in prompt):
            raise ApiError(400, f"token ids must be in 0..{MAX_TOKEN_ID}", param="prompt")
        return list(prompt)
    if len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "batched prompts are not supported: send one prompt per request", param="prompt")
    raise ApiError(400, "prompt must be a non-empty string, a list of token ids, or a list with one of those",
                   param="prompt")


def _non_empty(text: str) -> str:
    if not text:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    return text


class ContentPart(msgspec.Struct, kw_only=True):
    type: str = "text"
    text: str = ""


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ApiError(Exception):
    """An error to answer with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return msgspec.json.encode({"error": {"message": self.message, "type": self.type,
                                              "param": self.param, "code": self.code}})


_decoders: dict[type, msgspec.json.Decoder] = {}


def decode_request(raw: bytes, kind: type) -> Any:
    """Decode a request body; malformed JSON or wrong types become a 400 naming the field."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request: {exc}", param=_field_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:   # msgspec's own depth guard: a client error, not a server bug
        raise too_deep() from None


def too_deep() -> ApiError:
    return ApiError(400, "JSON body is nested too deeply", code="json_too_deep")


def _field_of(message: str) -> str | None:
    marker = "at `$."
    if marker in message:
        return message.split(marker, 1)[1].split("`", 1)[0]
    if "missing required field `" in message:
        return message.split("missing required field `", 1)[1].split("`", 1)[0]
    return None


# -- responses -------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_body(rid: str, model: str, text: str, finish_reason: str | None, usage_: dict,
                    extra: dict | None = None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}
    if extra:
        body.update(extra)
    return body


def chat_body(rid: str, model: str, text: str, finish_reason: str | None, usage_: dict,
              extra: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}
    if extra:
        body.update(extra)
    return body


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, usage_: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


_encode = msgspec.json.Encoder().encode


def sse(payload: dict) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(err: ApiError) -> bytes:
    """An error inside an already-started stream (status can no longer change)."""
    return b"data: " + err.body() + b"\n\n"


def models_body(model_names: list[str], owned_by: str = "kvlab") -> dict:
    now = int(time.time())
    return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": owned_by}
                                       for name in model_names]}
