"""One client request on its way through the router, and the upstream bodies made from it.

The first attempt forwards the client's own body (plus spliced fields). A migration sends a
*continuation*: the prompt as token ids with the tokens generated so far appended and the output
budget reduced by as many, always to ``/v1/completions`` (a chat prompt is already templated into
token ids, so the worker continues the same sequence). Workers emulate greedy decoding, where the
next token depends only on the sequence so far, so the continuation yields exactly the tokens the
dead worker would have produced.
"""
from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np

from kvlab.wire.openai_api import ChatCompletionRequest, CompletionRequest
from router.frontdoor.admission import Admission
from router.frontdoor.body import rebuilt, with_fields
from router.frontdoor.tokenize import TokenIds
from router.policies.base import RouteRequest

Endpoint = Literal["completions", "chat"]
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Chat-only fields that mean something else (or nothing) on /v1/completions.
_CHAT_ONLY = ("messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
              "response_format", "parallel_tool_calls")


class Job:
    __slots__ = ("endpoint", "raw", "request", "prompt", "salt", "route", "tenant", "max_tokens",
                 "received", "fields", "tokenize_s", "ticket")

    def __init__(self, endpoint: Endpoint, raw: bytes, request: CompletionRequest | ChatCompletionRequest,
                 prompt: TokenIds, route: RouteRequest, max_tokens: int, salt: str | None = None,
                 tenant: str | None = None, received: float | None = None):
        self.endpoint = endpoint
        self.raw = raw
        self.request = request
        self.prompt = prompt                  # token ids: a list, or an int32 array from the tokenizer
        self.route = route
        self.max_tokens = max_tokens
        self.salt = salt
        self.tenant = tenant
        self.received = time.perf_counter() if received is None else received
        self.fields: dict[str, Any] = {}      # spliced into every upstream body
        self.tokenize_s = 0.0                 # time spent tokenizing (for the decision-time metric)
        self.ticket: Admission | None = None  # admission's record of this request, settled at the end

    @property
    def stream(self) -> bool:
        return self.request.stream

    @property
    def include_usage(self) -> bool:
        options = self.request.stream_options
        return bool(options and options.include_usage)

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def path(self) -> str:
        return PATHS[self.endpoint]

    def body(self, extra: dict[str, Any] | None = None) -> bytes:
        fields = {**self.fields, **extra} if extra else self.fields
        return with_fields(self.raw, fields)

    def tokens_after(self, generated: list[int]) -> list[int]:
        """The prompt with `generated` appended: the prompt of a continuation."""
        prompt = self.prompt.tolist() if isinstance(self.prompt, np.ndarray) else list(self.prompt)
        return prompt + generated

    def continuation(self, generated: list[int]) -> bytes:
        """A /v1/completions body that resumes this request after `generated` output tokens."""
        min_tokens = max(0, self.request.min_tokens - len(generated))
        fields = {**self.fields, "prompt": self.tokens_after(generated), "stream": True,
                  "max_tokens": self.max_tokens - len(generated), "min_tokens": min_tokens}
        drop = _CHAT_ONLY if self.endpoint == "chat" else ()
        return rebuilt(self.raw, fields, drop)
