"""From a raw request body to a validated Job: decode, check, tokenize, salt.

Every refusal is an ApiError with the OpenAI status and body: 400 for a malformed or invalid request
(naming the field), 404 for an unknown model, 413 for a body over the limit. Checks run before any
worker is involved, so a bad request costs the cluster nothing.
"""
from __future__ import annotations

import time

import msgspec

from kvlab.wire.openai_api import ApiError, ChatCompletionRequest, CompletionRequest, decode_request
from router.frontdoor.admission import RequestLimits, check_request
from router.config import Limits
from router.frontdoor.job import Endpoint, Job
from router.policies.registry import BUILDERS
from router.frontdoor.tokenize import PromptTokenizer, TokenIdsCompletion

KINDS = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
POLICY_HEADER = "x-kvlab-policy"   # per-request policy override, for side-by-side experiments


def _decode(raw: bytes, endpoint: Endpoint):
    """Token-id completions decode straight to list[int]; anything else (or any error) takes the
    general decoder, which also names the field at fault."""
    if endpoint == "completions":
        try:
            return _ids_decoder.decode(raw)
        except msgspec.MsgspecError:
            pass
    return decode_request(raw, KINDS[endpoint])


_ids_decoder = msgspec.json.Decoder(TokenIdsCompletion)


class Intake:
    def __init__(self, limits: Limits, tokenizer: PromptTokenizer, models):
        self.limits = limits
        self.tokenizer = tokenizer
        self.models = models   # () -> list of served model names (empty: accept any)
        self._size_limits = RequestLimits(max_input_tokens=limits.max_input_tokens,
                                          max_tokens_limit=limits.max_tokens_limit)

    def job(self, endpoint: Endpoint, raw: bytes, received: float, policy: str | None = None,
            tenant: str | None = None, tenant_salt: str | None = None) -> Job:
        request = _decode(raw, endpoint)
        self._check_model(request.model)
        if request.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if policy is not None and policy not in BUILDERS:
            raise ApiError(400, f"unknown routing policy {policy!r}; known: {', '.join(BUILDERS)}",
                           param=POLICY_HEADER)
        max_tokens = self._max_tokens(endpoint, request)
        started = time.perf_counter()
        prompt = self.tokenizer.chat(request) if endpoint == "chat" else self.tokenizer.completion(request)
        chat_limit = endpoint == "chat" and request.max_completion_tokens is not None
        self._check_sizes(len(prompt), max_tokens, "max_completion_tokens" if chat_limit else "max_tokens")
        salt = _salt(request.cache_salt, tenant_salt)
        route = self.tokenizer.route_request(prompt, salt, policy)
        job = Job(endpoint, raw, request, prompt, route, max_tokens, salt, tenant, received)
        job.tokenize_s = time.perf_counter() - started
        if tenant_salt is not None:
            job.fields["cache_salt"] = salt   # forced: spliced last, it overrides the client's own
        return job

    def _check_model(self, model: str) -> None:
        served = self.models()
        if served and model not in served:
            raise ApiError(404, f"The model `{model}` does not exist.", type_="not_found_error",
                           param="model", code="model_not_found")

    def _max_tokens(self, endpoint: Endpoint, request) -> int:
        asked = request.output_limit() if endpoint == "chat" else request.max_tokens
        if asked is not None:
            return asked
        default = self.limits.chat_default_max_tokens if endpoint == "chat" else self.limits.default_max_tokens
        limit = self.limits.max_tokens_limit
        return min(default, limit) if limit else default

    def _check_sizes(self, prompt_tokens: int, max_tokens: int, max_field: str) -> None:
        verdict = check_request(prompt_tokens, max_tokens, self._size_limits)
        if not verdict.ok:
            param = max_field if verdict.reason.startswith("max_tokens") else "prompt"
            raise ApiError(400, verdict.message, param=param, code=verdict.reason)


def _salt(client_salt: str | None, tenant_salt: str | None) -> str | None:
    """A salted tenant's salt (combined with the client's own, if any), else the client's."""
    if tenant_salt is None:
        return client_salt
    return f"{tenant_salt}:{client_salt}" if client_salt else tenant_salt
