"""Emulated model output: deterministic tokens and end-of-sequence decisions.

The next token is a pure function of the previous token and the position, like greedy decoding of
a fixed model: a request migrated to another worker with its generated tokens appended to the
prompt continues with exactly the tokens it would have produced. Ids index kvlab's output words,
so the text reads as words.
"""
from __future__ import annotations

import xxhash

from kvlab.wire.tokenizer import EOS_TOKEN_ID, OUTPUT_WORDS
from workers.core.request import Request

_WORDS = len(OUTPUT_WORDS)
_UNIT = float(2**32)
# An output token's 4 little-endian bytes, built once: every generated token after the first follows
# an output token, and int.to_bytes with keywords costs a call per token.
_BYTES = [i.to_bytes(4, "little") for i in range(_WORDS)]


def _token_bytes(token: int) -> bytes:
    return _BYTES[token] if 0 <= token < _WORDS else token.to_bytes(4, "little", signed=False)


def next_token(previous: int, position: int) -> int:
    return xxhash.xxh32_intdigest(_token_bytes(previous), position) % _WORDS


def _uniform(previous: int, position: int) -> float:
    """A deterministic draw in [0, 1) for the EOS decision at this position."""
    return xxhash.xxh32_intdigest(previous.to_bytes(4, "little"), position ^ 0x5EED) / _UNIT


def sample(req: Request) -> tuple[int, str | None]:
    """The request's next token and, if the request ends with it, the finish reason."""
    params = req.params
    tokens = req.tokens
    previous = tokens[-1] if tokens else 0
    position = len(tokens)                    # req.num_tokens
    produced = position - req.num_prompt + 1  # req.num_output + 1
    # eos_probability first: it is 0 for most requests, and the test ends there (runs per token)
    can_stop = params.eos_probability > 0 and not params.ignore_eos and produced > params.min_tokens
    if can_stop and _uniform(previous, position) < params.eos_probability:
        return EOS_TOKEN_ID, "stop"
    token = xxhash.xxh32_intdigest(_BYTES[previous] if 0 <= previous < _WORDS else _token_bytes(previous),
                                   position) % _WORDS   # next_token, inlined
    return token, ("length" if produced >= params.max_tokens else None)
