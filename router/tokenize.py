"""Request -> prompt token ids -> the policies' RouteRequest, exactly as the workers see the prompt.

Router and workers must agree on token ids, the chat template and the cache salt, or the router's
block hashes would never match the workers' prefix cache. So this module uses the same tokenizer
(kvlab.tokenizer), the same template, and the same salt the router forwards in the body.

Per-tenant salts (router.gate) are forced into the upstream body (router.body), so a salted tenant's
blocks hash differently from every other tenant's and no KV block is shared across tenants.
"""
from __future__ import annotations

from typing import Sequence

from kvlab.openai_api import ApiError, ChatCompletionRequest, CompletionRequest, prompt_input
from kvlab.tokenizer import OUTPUT_WORDS, BuiltinTokenizer, Tokenizer, apply_chat_template
from router.policies.base import RouteRequest

_OUTPUT_IDS = {word: i for i, word in enumerate(OUTPUT_WORDS)}


class PromptTokenizer:
    def __init__(self, tokenizer: Tokenizer, block_size: int):
        self.tokenizer = tokenizer
        self.block_size = block_size

    def completion(self, request: CompletionRequest) -> list[int]:
        prompt = prompt_input(request.prompt)   # raises ApiError(400) on an empty or batched prompt
        return prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def chat(self, request: ChatCompletionRequest) -> list[int]:
        if not request.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        text = apply_chat_template([{"role": m.role, "content": m.text()} for m in request.messages])
        return self.tokenizer.encode(text)

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
