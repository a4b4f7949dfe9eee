"""From a raw request body to a validated Job: decode, check and salt (``job``), then, once the request
is admitted, tokenize (``tokenize``).

Admission (router.frontdoor.gate) sits between the two steps, so a shed or over-limit request costs no
tokenizer time: token limits reserve an estimate from the body's size. Tokenizing then covers only the
leading blocks the routing policy reads (none for round robin and least loaded; the ring key's blocks
for a prefix ring), unless the size limits need the whole prompt's count: a text's characters bound
its tokens from above (every built-in piece covers one), so a prompt whose characters fit the limits
is never counted. The whole prompt is tokenized later only where it is needed (a migration).

Every refusal is an ApiError with the OpenAI status and body: 400 for a malformed or invalid request
(naming the field), 404 for an unknown model, 413 for a body over the limit. Checks run before any
worker is involved, so a bad request costs the cluster nothing.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec

from kvlab.wire.openai_api import ApiError, ChatCompletionRequest, CompletionRequest, decode_request
from kvlab.wire.tokenizer import PIECE_CHARS
from router.config import Limits
from router.frontdoor.admission import RequestLimits, check_request
from router.frontdoor.job import Endpoint, Job
from router.frontdoor.tokenize import PromptTokenizer, TokenIdsCompletion
from router.policies.base import RouteRequest
from router.policies.registry import BUILDERS

KINDS = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
POLICY_HEADER = "x-kvlab-policy"   # per-request policy override, for side-by-side experiments


def _decode(raw: bytes, endpoint: Endpoint):
    """Token-id completions decode straight to list[int]; anything else (or any error) takes the
    general decoder, which also names the field at fault. The first is tried only where the prompt
    looks like a list: a text prompt would fail it first (~1 us, with an exception) for nothing."""
    if endpoint == "completions" and _prompt_is_list(raw):
        try:
            return _ids_decoder.decode(raw)
        except (msgspec.MsgspecError, RecursionError):
            pass
    return decode_request(raw, KINDS[endpoint])


_ids_decoder = msgspec.json.Decoder(TokenIdsCompletion)


def _prompt_is_list(raw: bytes) -> bool:
    """Whether the body's first "prompt" key is followed by a list: a guess that picks the decoder
    tried first, never the result (both decoders give the same request, or the general one's error)."""
    at = raw.find(b'"prompt"')
    if at < 0:
        return False
    rest = raw[at + 8:at + 72].lstrip()
    return rest[:1] == b":" and rest[1:].lstrip()[:1] == b"["


class Intake:
    """Turns bodies into Jobs in two steps, so that admission comes between them: ``job`` decodes and
    checks (no tokenizing), ``tokenize`` gives the Job the prompt ids its policy reads and checks the
    prompt's size. Both are synchronous and touch no event-loop state, so the server may run them on
    a thread for large bodies (router.server)."""

    def __init__(self, limits: Limits, tokenizer: PromptTokenizer, models, context_length=lambda: None,
                 prompt_blocks=lambda policy: None):
        self.limits = limits
        self.tokenizer = tokenizer
        self.models = models                   # () -> list of served model names (empty: accept any)
        self.context_length = context_length   # () -> the model's context in tokens, or None (unknown)
        self.prompt_blocks = prompt_blocks     # (policy name or None) -> leading blocks it reads; None: all
        self._last_limits: tuple[Limits, RequestLimits] | None = None   # (from these limits, the last made)

    def job(self, endpoint: Endpoint, raw: bytes, received: float, policy: str | None = None,
            tenant: str | None = None, tenant_salt: str | None = None) -> Job:
        """The decoded, checked request, with a prompt-size estimate for admission; not tokenized."""
        request = _decode(raw, endpoint)
        self._check_fields(request, policy)
        max_tokens = self._max_tokens(endpoint, request)
        limits = self._limits()   # reads the workers' context lengths: once a request (tokenize reuses them)
        cap = _prompt_cap(limits, max_tokens)
        _refuse_early(self._min_tokens(endpoint, request, cap), cap, limits)
        # Token ids count themselves; text is guessed from the body's size at ~4 characters a token
        # (kvlab.wire.tokenizer.PIECE_CHARS), and the tenant's bucket is settled with the real count.
        prompt = request.prompt if isinstance(request, CompletionRequest) else None
        if isinstance(prompt, list) and all(type(t) is int for t in prompt[:1]):
            estimate = len(prompt)
        else:
            estimate = -(-len(raw) // PIECE_CHARS)
        job = Job(endpoint, raw, request, max_tokens, _salt(request.cache_salt, tenant_salt), tenant, received,
                  prompt_estimate=estimate)
        job.limits, job.prompt_cap = limits, cap
        job.route = RouteRequest(blocks=[], prompt_tokens=0, policy=policy)   # its policy, until tokenized
        if request.stream and not job.include_usage:
            # The worker's usage settles the tenant's tokens and counts the prompt, which routing may
            # have tokenized only the head of; the relay keeps it from a client that did not ask.
            job.fields["stream_options"] = {"include_usage": True}
        if tenant_salt is not None:
            job.fields["cache_salt"] = job.salt   # forced: spliced last, it overrides the client's own
        return job

    def tokenize(self, job: Job) -> None:
        """Tokenize as much of the prompt as the routing policy reads (all of it where the size limits
        cannot be checked otherwise), check its size, and build the policy's RouteRequest."""
        started = time.perf_counter()
        request = job.request
        if job.limits is None:
            job.limits = self._limits()
            job.prompt_cap = _prompt_cap(job.limits, job.max_tokens)
        limits = job.limits
        if isinstance(request, ChatCompletionRequest):
            given: str | Sequence[int] = self.tokenizer.chat_input(request)
            asked_completion = request.max_completion_tokens is not None
        else:
            given, asked_completion = self.tokenizer.completion_input(request), False
        blocks = self.prompt_blocks(job.route.policy)
        at_most = self.tokenizer.max_tokens(given)
        if blocks is None or at_most is None or at_most > job.prompt_cap:
            job.set_prompt(self.tokenizer.encode(given))
            count = len(job.prompt)
        else:   # fits whatever it tokenizes to: only the head the policy reads
            tokenizer = self.tokenizer
            job.set_prompt(tokenizer.head(given, blocks * tokenizer.block_size), lambda: tokenizer.encode(given))
            count = max(1, at_most)
        max_field = "max_completion_tokens" if asked_completion else "max_tokens"
        _check_sizes(count, job.max_tokens, limits, max_field)
        job.route = self.tokenizer.route_request(job.prompt_head, job.salt, job.route.policy)
        job.tokenize_s = time.perf_counter() - started

    def _limits(self) -> RequestLimits:
        """The size limits now (the workers' context length may change): the last ones while neither it
        nor the configured limits have."""
        context, limits = self.context_length(), self.limits
        last = self._last_limits
        if last is None or last[0] is not limits or last[1].max_model_len != context:
            last = self._last_limits = (limits, RequestLimits(max_input_tokens=limits.max_input_tokens,
                                                              max_tokens_limit=limits.max_tokens_limit,
                                                              max_model_len=context))
        return last[1]

    def _check_fields(self, request, policy: str | None) -> None:
        self._check_model(request.model)
        if request.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if request.kv_transfer_params is not None:
            # Only the router's own P/D path sets these: they name URLs a worker will call and
            # KV it will release or trust (router.forwarding.pd). A client never may.
            raise ApiError(400, "kv_transfer_params is set by the router only", param="kv_transfer_params",
                           code="internal_field")
        if policy is not None and policy not in BUILDERS:
            raise ApiError(400, f"unknown routing policy {policy!r}; known: {', '.join(BUILDERS)}",
                           param=POLICY_HEADER)

    def _min_tokens(self, endpoint: Endpoint, request, cap: int) -> int:
        """A lower bound on the prompt's tokens, read before the chat template copies it (the
        template only adds tokens): exact for token ids, 0 when unknown."""
        if endpoint == "chat":
            return self.tokenizer.min_tokens([m.text() for m in request.messages], cap)
        prompt = request.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.min_tokens([prompt], cap)
        return len(prompt) if all(type(t) is int for t in prompt[:1]) else 0

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


def _prompt_cap(limits: RequestLimits, max_tokens: int) -> int:
    """The most prompt tokens the limits let through (a huge number when none applies): the smaller of
    max_input_tokens and the context left after max_tokens, each where positive."""
    cap = 1 << 62
    if limits.max_input_tokens is not None and limits.max_input_tokens > 0:
        cap = limits.max_input_tokens
    room = (limits.max_model_len or 0) - max(max_tokens, 0)
    return room if 0 < room < cap else cap


def _refuse_early(at_least: int, cap: int, limits: RequestLimits) -> None:
    """Refuse a prompt whose lower-bound token count already breaks a limit (`cap`: _prompt_cap's),
    before tokenizing it."""
    if at_least > cap:
        within = limits.max_input_tokens is not None and cap == limits.max_input_tokens
        code = "prompt_too_long" if within else "context_length_exceeded"
        raise ApiError(400, f"the prompt has at least {at_least} tokens; at most {cap} fit", param="prompt",
                       code=code)


def _check_sizes(prompt_tokens: int, max_tokens: int, limits: RequestLimits, max_field: str) -> None:
    verdict = check_request(prompt_tokens, max_tokens, limits)
    if not verdict.ok:
        param = max_field if (verdict.reason or "").startswith("max_tokens") else "prompt"
        raise ApiError(400, verdict.message, param=param, code=verdict.reason)


def _salt(client_salt: str | None, tenant_salt: str | None) -> str | None:
    """A salted tenant's salt (combined with the client's own, if any), else the client's."""
    if tenant_salt is None:
        return client_salt
    return f"{tenant_salt}:{client_salt}" if client_salt else tenant_salt
