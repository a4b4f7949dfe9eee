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
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from kvlab.wire.openai_api import ChatCompletionRequest, CompletionRequest
from router.frontdoor.admission import Admission, RequestLimits
from router.frontdoor.body import rebuilt, with_fields
from router.frontdoor.tokenize import TokenIds
from router.policies.base import RouteRequest

Endpoint = Literal["completions", "chat"]
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Chat-only fields that mean something else (or nothing) on /v1/completions.
_CHAT_ONLY = ("messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
              "response_format", "parallel_tool_calls")


class Job:
    __slots__ = ("endpoint", "raw", "request", "_prompt", "_whole", "salt", "route", "tenant", "max_tokens",
                 "received", "fields", "tokenize_s", "ticket", "prompt_estimate", "reported_prompt_tokens",
                 "limits", "prompt_cap")

    def __init__(self, endpoint: Endpoint, raw: bytes, request: CompletionRequest | ChatCompletionRequest,
                 max_tokens: int, salt: str | None = None, tenant: str | None = None,
                 received: float | None = None, prompt_estimate: int = 0):
        self.endpoint = endpoint
        self.raw = raw
        self.request = request
        self._prompt: TokenIds = []
        self._whole: Callable[[], TokenIds] | None = None   # set while only the prompt's head is tokenized
        self.route = RouteRequest(blocks=[], prompt_tokens=0)   # set once tokenized (router.frontdoor.intake)
        self.max_tokens = max_tokens
        self.salt = salt
        self.tenant = tenant
        self.received = time.perf_counter() if received is None else received
        self.fields: dict[str, Any] = {}      # spliced into every upstream body
        self.tokenize_s = 0.0                 # time spent tokenizing (for the decision-time metric)
        self.ticket: Admission | None = None  # admission's record of this request, settled at the end
        self.prompt_estimate = prompt_estimate         # prompt tokens guessed before tokenizing (admission)
        self.reported_prompt_tokens: int | None = None  # prompt tokens in the worker's usage, once it came
        self.limits: RequestLimits | None = None   # the size limits it was checked against (intake)
        self.prompt_cap = 1 << 62                  # the most prompt tokens they let through

    @property
    def prompt(self) -> TokenIds:
        """The whole prompt's token ids, tokenized on first use where routing needed only its head
        (a migration, a router-written usage event)."""
        if self._whole is not None:
            self._prompt, self._whole = self._whole(), None
        return self._prompt

    @property
    def prompt_head(self) -> TokenIds:
        """The prompt's ids as far as they are tokenized (what routing reads)."""
        return self._prompt

    def set_prompt(self, tokens: TokenIds, whole: Callable[[], TokenIds] | None = None) -> None:
        """The prompt's token ids, or (with `whole`) its leading ids and how to get all of them."""
        self._prompt, self._whole = tokens, whole

    @property
    def prompt_tokens(self) -> int:
        """The prompt's token count as far as it is known without tokenizing: the worker's usage, the
        whole prompt if tokenized, else the admission estimate (what token limits settle with)."""
        if self.reported_prompt_tokens is not None:
            return self.reported_prompt_tokens
        return self.prompt_estimate if self._whole is not None else len(self._prompt)

    @property
    def stream(self) -> bool:
        return self.request.stream

    @property
    def include_usage(self) -> bool:
        options = self.request.stream_options
        return bool(options and options.include_usage)

    @property
    def upstream_usage(self) -> bool:
        """The upstream was asked for a usage report (by the client, or by the router for a stream)."""
        return self.include_usage or "stream_options" in self.fields

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
