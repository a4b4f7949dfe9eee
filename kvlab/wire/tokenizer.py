"""A deterministic built-in tokenizer and the fixed chat template shared by router and workers.

Router and workers must agree on token ids so that they agree on block boundaries and hashes.
Text splits into word pieces of at most 4 characters (a leading space stays with its word), close
to BPE's ~4 characters per English token; each piece maps to a stable id by hashing. Emulated
output tokens come from a small fixed vocabulary so that they decode back to readable text.
A real Hugging Face ``tokenizer.json`` can be used instead (needs the ``tokenizers`` package).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import xxhash

VOCAB_SIZE = 128256          # Llama-3 vocabulary size (meta-llama/Llama-3.1-8B config.json)
SPECIAL_BASE = 128000        # Llama-3 puts its special tokens at 128000+
PIECE_CHARS = 4              # ~4 characters per token for English BPE (OpenAI tokenizer guidance)
_HASHED_RANGE = SPECIAL_BASE - 1024   # ids [1024, SPECIAL_BASE) for hashed pieces; [0, 1024) for output words
PIECE = re.compile(r" ?[A-Za-z]{1,4}| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]|\s+")

SPECIALS = {
    "<|begin_of_text|>": SPECIAL_BASE,
    "<|end_of_text|>": SPECIAL_BASE + 1,
    "<|start_header_id|>": SPECIAL_BASE + 6,
    "<|end_header_id|>": SPECIAL_BASE + 7,
    "<|eot_id|>": SPECIAL_BASE + 9,
}
EOS_TOKEN_ID = SPECIALS["<|eot_id|>"]

# Emulated output text: ids 0..len-1 decode to these words.
OUTPUT_WORDS = (
    "the of and to in is that it for as with was on be by this are from at or an have not but they "
    "which one you all were can there their has more when will would if so what about out up into "
    "them some than other time only new could these two may first then do any like my now over such "
    "our man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three"
).split()


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class BuiltinTokenizer:
    """Deterministic word-piece tokenizer; no files, no downloads."""

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in split_specials(text):
            if part in SPECIALS:
                ids.append(SPECIALS[part])
            else:
                ids.extend(piece_id(p) for p in PIECE.findall(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(token_text(i) for i in ids)


def token_text(token_id: int) -> str:
    if token_id < len(OUTPUT_WORDS):
        return " " + OUTPUT_WORDS[token_id]
    for name, value in SPECIALS.items():
        if value == token_id:
            return name
    return f" <{token_id}>"


def piece_id(piece: str) -> int:
    return 1024 + xxhash.xxh32_intdigest(piece.encode()) % (_HASHED_RANGE)


_SPECIAL_FIRST = "<"   # every special token starts with it (and none is a prefix of another)
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
_FIND_AT_MOST = 64     # more "<" than this outside specials (markup, code): one regex pass beats a find each


def split_specials(text: str) -> list[str]:
    """`text` cut around its special tokens (kept as parts); the built-in tokenizer encodes each part
    on its own, so the parts between specials may be encoded (and memoized) independently.

    Scans with str.find for "<" rather than a regex: a one-character find runs at memchr speed (a
    32K-token, 130K-character chat prompt with a handful of specials is scanned in ~2 us, where the
    regex takes ~40 and a two-character find ~100). Text full of "<" (markup, code) takes the regex.
    """
    parts: list[str] = []
    start = 0
    misses = 0
    at = text.find(_SPECIAL_FIRST)
    while at >= 0:
        special = next((s for s in SPECIALS if text.startswith(s, at)), None)
        if special is None:
            misses += 1
            if misses > _FIND_AT_MOST:
                return [part for part in _SPECIAL_SPLIT.split(text) if part]
            at = text.find(_SPECIAL_FIRST, at + 1)
            continue
        if at > start:
            parts.append(text[start:at])
        parts.append(special)
        start = at + len(special)
        at = text.find(_SPECIAL_FIRST, start)
    if start < len(text):
        parts.append(text[start:])
    return parts


class HuggingFaceTokenizer:
    """A real tokenizer loaded from a local tokenizer.json file."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as exc:  # optional dependency
            raise RuntimeError("a tokenizer file needs the 'tokenizers' package: pip install tokenizers") from exc
        self._tok = _HF.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(path: str | None = None) -> Tokenizer:
    return HuggingFaceTokenizer(path) if path else BuiltinTokenizer()


def apply_chat_template(messages: Sequence[dict]) -> str:
    """Llama-3-style template, fixed, so a shared system prompt is a shared token prefix."""
    parts = ["<|begin_of_text|>"]
    for message in messages:
        parts.append(f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n{message['content']}<|eot_id|>")
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)
