"""Request -> prompt token ids -> the policies' RouteRequest, exactly as the workers see the prompt.

Router and workers must agree on token ids, the chat template and the cache salt, or the router's
block hashes would never match the workers' prefix cache. So this module uses the same tokenizer
(kvlab.tokenizer), the same template, and the same salt the router forwards in the body.

Chat prompts repeat: the same system prompt (or document) heads many requests. The built-in
tokenizer encodes the text between special tokens independently, so the router encodes a templated
chat segment by segment and memoizes long segments: a repeated 30K-token system prompt costs a dict
lookup instead of ~10 ms of regex work. (A real tokenizer file is used as the workers use it, whole.)

Per-tenant salts (router.gate) are forced into the upstream body (router.body), so a salted tenant's
blocks hash differently from every other tenant's and no KV block is shared across tenants.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Annotated, Sequence

import msgspec

from kvlab.openai_api import ApiError, ChatCompletionRequest, CompletionRequest, prompt_input
from kvlab.tokenizer import OUTPUT_WORDS, SPECIALS, BuiltinTokenizer, Tokenizer, apply_chat_template
from router.policies.base import RouteRequest

_OUTPUT_IDS = {word: i for i, word in enumerate(OUTPUT_WORDS)}
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
MEMO_MIN_CHARS = 512      # shorter segments are cheaper to encode than to look up and copy
MEMO_ENTRIES = 1024       # distinct long segments remembered (LRU)


class SegmentMemo:
    """Token ids of long text segments, least recently used first out."""

    def __init__(self, encode, entries: int = MEMO_ENTRIES):
        self._encode = encode
        self._entries = entries
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self.hits = 0

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for part in _SPECIAL_SPLIT.split(text):
            if not part:
                continue
            if part in SPECIALS:
                out.append(SPECIALS[part])
            elif len(part) < MEMO_MIN_CHARS:
                out += self._encode(part)
            else:
                out += self._long(part)
        return out

    def _long(self, part: str) -> list[int]:
        ids = self._ids.get(part)
        if ids is not None:
            self._ids.move_to_end(part)
            self.hits += 1
            return ids
        ids = self._encode(part)
        self._ids[part] = ids
        if len(self._ids) > self._entries:
            self._ids.popitem(last=False)
        return ids


class TokenIdsCompletion(CompletionRequest, kw_only=True):
    """A completion whose prompt msgspec decoded and checked as non-negative token ids, in C.

    The generic request types the prompt loosely (text, ids, or lists of either) and checks ids in
    Python at ~100 ns a token: 3 ms for a 32K-token prompt. Here the check costs nothing beyond the
    decode itself.
    """
    prompt: list[Annotated[int, msgspec.Meta(ge=0)]]


class PromptTokenizer:
    def __init__(self, tokenizer: Tokenizer, block_size: int):
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.memo = SegmentMemo(tokenizer.encode) if isinstance(tokenizer, BuiltinTokenizer) else None

    def completion(self, request: CompletionRequest) -> list[int]:
        if isinstance(request, TokenIdsCompletion):
            if not request.prompt:
                raise ApiError(400, "prompt must not be empty", param="prompt")
            return request.prompt
        prompt = prompt_input(request.prompt)   # raises ApiError(400) on an empty or batched prompt
        return prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def chat(self, request: ChatCompletionRequest) -> list[int]:
        if not request.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        text = apply_chat_template([{"role": m.role, "content": m.text()} for m in request.messages])
        return self.memo.encode(text) if self.memo is not None else self.tokenizer.encode(text)

    def output_ids(self, text: str) -> list[int]:
        """Token ids of generated text, for servers that stream text without ids.

        kvlab's emulated workers emit words from a fixed output vocabulary (id i is " " + word i),
        which the built-in tokenizer would re-encode to different ids, so those words map back
        exactly here; anything else goes through the tokenizer (exact for whole-token pieces of a
        real tokenizer, an approximation otherwise).
        """
        if isinstance(self.tokenizer, BuiltinTokenizer):
            words = text.split(" ")
            if words[0] == "" and all(w in _OUTPUT_IDS for w in words[1:]):
                return [_OUTPUT_IDS[w] for w in words[1:]]
        return self.tokenizer.encode(text)

    def route_request(self, tokens: Sequence[int], salt: str | None, policy: str | None) -> RouteRequest:
        # Block hashes are lazy: a prefix policy hashes only the blocks it reads.
        return RouteRequest.from_tokens(tokens, block_size=self.block_size, salt=salt, policy=policy)
