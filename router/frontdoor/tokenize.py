"""Request -> prompt token ids -> the policies' RouteRequest, exactly as the workers see the prompt.

Router and workers must agree on token ids, the chat template and the cache salt, or the router's
block hashes would never match the workers' prefix cache. So this module uses the same tokenizer
(kvlab.wire.tokenizer), the same template, and the same salt the router forwards in the body.

Prompts repeat: the same system prompt (or document) heads many requests. The built-in tokenizer
encodes the text between special tokens independently, so the router encodes a templated chat (or
a text prompt) segment by segment and memoizes long segments: a repeated 30K-token system prompt costs a dict
lookup instead of ~10 ms of regex work. (A real tokenizer file is used as the workers use it, whole.)

Per-tenant salts (router.frontdoor.gate) are forced into the upstream body (router.frontdoor.body), so a salted tenant's
blocks hash differently from every other tenant's and no KV block is shared across tenants.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from itertools import chain, islice
from typing import Annotated

import msgspec
import numpy as np

from kvlab.wire.openai_api import MAX_TOKEN_ID, ApiError, ChatCompletionRequest, CompletionRequest, prompt_input
from kvlab.wire.tokenizer import (
    OUTPUT_WORDS,
    PIECE,
    SPECIALS,
    BuiltinTokenizer,
    Tokenizer,
    apply_chat_template,
    piece_id,
    split_specials,
)
from router.policies.base import RouteRequest
from router.policies.hash_memo import DEFAULT_RUNS, BlockHashMemo

TokenIds = Sequence[int] | np.ndarray   # a prompt's ids: as the client sent them, or the tokenizer's (SegmentMemo)
_OUTPUT_IDS = {word: i for i, word in enumerate(OUTPUT_WORDS)}
MEMO_MIN_CHARS = 512      # shorter segments are cheaper to encode than to look up and copy
MEMO_ENTRIES = 1024       # distinct long segments remembered (LRU)
# The built-in tokenizer's pieces hold at most 4 non-space characters (kvlab.wire.tokenizer.PIECE: up to
# 4 letters, 3 digits or 1 other character; whitespace runs are pieces of their own), so a text has
# at least (non-space characters) / 4 tokens: a bound that costs a scan, not a tokenization.
MAX_NONSPACE_PER_PIECE = 4


_SCAN_CHARS = 1 << 16   # characters counted at a time by min_tokens
# A first guess at the characters n leading tokens cover: a built-in piece is at most 5 characters
# (a space and 4 letters); whitespace runs and special tokens are longer, and then ``head`` doubles it.
HEAD_CHARS_PER_TOKEN = 5
CHUNK_CHARS = 1 << 16   # a long segment is tokenized this many characters at a time (see _chunks)
_LONGEST_SPECIAL = max(map(len, SPECIALS))


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """`text` (no special tokens in it) in pieces of about `size` characters that the built-in tokenizer
    encodes to exactly the ids of the whole: each cut is at a single space between two non-space
    characters, which is always the next piece's optional leading space and never part of the one
    before (a letter or digit run stops at it; a whitespace run needs two). The regex holds the GIL
    for a whole call (~0.1 us a character): a 3 MB prompt on the intake thread would pause the event
    loop ~300 ms at once; in 64K pieces it yields between them."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while len(text) - start > size:
        cut = _safe_cut(text, start + size)
        if cut < 0:
            break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _safe_cut(text: str, at: int) -> int:
    """The first position from `at` on holding a single space between two non-space characters; -1 if none."""
    cut = text.find(" ", at)
    while 0 < cut < len(text) - 1:
        if not text[cut - 1].isspace() and not text[cut + 1].isspace():
            return cut
        cut = text.find(" ", cut + 1)
    return -1


def _cut_before_specials(text: str, at: int) -> int:
    """`at`, moved back before a "<" that could start a special token running across it."""
    near = text.rfind("<", max(0, at - _LONGEST_SPECIAL + 1), at)
    return near if near >= 0 else at


def _nonspace(text: str) -> int:
    """Characters of `text` that are not whitespace (as the tokenizer's regex sees it)."""
    if text.isascii():   # counting six characters beats splitting; str.split knows Unicode spaces
        return len(text) - sum(map(text.count, " \n\t\r\f\v"))
    return sum(map(len, text.split()))


PIECE_IDS = 1 << 16   # distinct pieces remembered by PieceIds before it starts over
PIECE_CHARS_KEPT = 8  # longer pieces (whitespace runs) are hashed each time: a client cannot fill memory


class PieceIds(dict):
    """The built-in tokenizer's id of each piece, remembered: prompts are made of few distinct pieces
    (words), and a lookup in C costs ~1/10 of hashing the piece again in Python."""

    def __missing__(self, piece: str) -> int:
        token = piece_id(piece)
        if len(piece) <= PIECE_CHARS_KEPT:
            if len(self) >= PIECE_IDS:
                self.clear()
            self[piece] = token
        return token


WORD_IDS = 1 << 15    # distinct words remembered by WordIds before it starts over
WORD_CHARS_KEPT = 24  # longer words are split each time: a client cannot fill memory
_OTHER_SPACE = re.compile(r"[^\S ]")   # whitespace other than the space character


class WordIds(dict):
    """The ids of a word (a run of non-whitespace characters) and of the space before it (`lead`):
    the pieces of a text split at a single space between two non-space characters are the pieces of
    the parts (the space is the next piece's optional leading space, and no piece reaches back over
    it: see _chunks), so a word's ids are the same wherever it stands, and are remembered."""

    def __init__(self, lead: str, ids_of):
        super().__init__()
        self._lead = lead
        self._ids_of = ids_of

    def __missing__(self, word: str) -> list[int]:
        ids = list(map(self._ids_of, PIECE.findall(self._lead + word)))
        if len(word) <= WORD_CHARS_KEPT:
            if len(self) >= WORD_IDS:
                self.clear()
            self[word] = ids
        return ids


def builtin_encoder():
    """BuiltinTokenizer.encode (the same ids), with its pieces' and words' ids remembered
    (builtin_part_encoder, for each part between special tokens)."""
    encode_part = builtin_part_encoder()

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for part in split_specials(text):
            if part in SPECIALS:
                ids.append(SPECIALS[part])
            else:
                ids += encode_part(part)
        return ids
    return encode


def builtin_part_encoder():
    """BuiltinTokenizer.encode of text without special tokens (a part split_specials cuts out; such a
    part tokenizes on its own), with its pieces' and words' ids remembered. Safe on several threads:
    each dict operation holds the GIL, and a piece or word always gets the same ids.

    Text whose only whitespace is single spaces between words (most single-line prompts) is split at
    them by str.split and each word's ids are looked up (WordIds): ~3x cheaper than the regex, whose
    cost is per piece. Any other text goes through the regex, piece by piece."""
    ids_of = PieceIds().__getitem__
    find = PIECE.findall
    first = WordIds("", ids_of).__getitem__
    spaced = WordIds(" ", ids_of).__getitem__
    other_space = _OTHER_SPACE.search

    def encode_part(part: str) -> list[int]:
        # isprintable: one C pass, ~20x cheaper than the regex's search, and true only where no
        # character is whitespace but the space (every other one is a control or separator character)
        if "  " in part or (not part.isprintable() and other_space(part)):
            return list(map(ids_of, find(part)))
        words = part.split(" ")   # words, each after one space (the first: after none; an empty one: the space alone)
        ids: list[int] = []
        ids += first(words[0])
        ids += chain.from_iterable(map(spaced, islice(words, 1, None)))
        return ids
    return encode_part


class SegmentMemo:
    """Token ids of long text segments (int32 arrays), least recently used first out.

    Prompts with a long segment come out as int32 arrays: a remembered 30K-token segment is then
    copied by one concatenate, and block hashing reads the array's bytes without unboxing 30K Python
    ints. A text without one stays a list: converting a few hundred ids to an array (~40 ns each)
    costs more than hashing reads from a list.
    Large prompts are encoded on a thread (router.server), so the LRU's updates hold a lock
    (encoding itself runs outside it).
    """

    def __init__(self, encode, entries: int = MEMO_ENTRIES):
        self._encode = encode   # ids of text without special tokens (builtin_part_encoder)
        self._entries = entries
        self._ids: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def encode(self, text: str) -> TokenIds:
        pieces: list[np.ndarray] = []
        short: list[int] = []       # ids of specials and short parts, flushed before each long part
        for part in split_specials(text):
            if part in SPECIALS:
                short.append(SPECIALS[part])
            elif len(part) < MEMO_MIN_CHARS:
                short += self._encode(part)
            else:
                if short:
                    pieces.append(np.array(short, dtype=np.int32))
                    short = []
                pieces.append(self._long(part))
        if not pieces:
            return short
        pieces.append(np.array(short, dtype=np.int32))
        return np.concatenate(pieces)

    def _long(self, part: str) -> np.ndarray:
        with self._lock:
            ids = self._ids.get(part)
            if ids is not None:
                self._ids.move_to_end(part)
                self.hits += 1
                return ids
        ids = np.concatenate([np.array(self._encode(piece), dtype=np.int32) for piece in _chunks(part)])
        with self._lock:
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
    prompt: list[Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]]


class PromptTokenizer:
    def __init__(self, tokenizer: Tokenizer, block_size: int, hash_memo_runs: int = DEFAULT_RUNS):
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.hashes = BlockHashMemo(block_size, hash_memo_runs) if hash_memo_runs else None
        # The memo splits out special tokens itself, so it encodes the parts between them directly.
        self.memo = SegmentMemo(builtin_part_encoder()) if isinstance(tokenizer, BuiltinTokenizer) else None

    def completion(self, request: CompletionRequest) -> TokenIds:
        """Token ids pass through as the list msgspec decoded; text is tokenized (an int32 array)."""
        return self.encode(self.completion_input(request))

    def chat(self, request: ChatCompletionRequest) -> TokenIds:
        return self.encode(self.chat_input(request))

    @staticmethod
    def completion_input(request: CompletionRequest) -> str | Sequence[int]:
        """The prompt's text, or its token ids as given (checked)."""
        if isinstance(request, TokenIdsCompletion):
            if not request.prompt:
                raise ApiError(400, "prompt must not be empty", param="prompt")
            return request.prompt
        return prompt_input(request.prompt)   # raises ApiError(400) on an empty or batched prompt

    @staticmethod
    def chat_input(request: ChatCompletionRequest) -> str:
        """The templated chat, as text."""
        if not request.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        return apply_chat_template([{"role": m.role, "content": m.text()} for m in request.messages])

    def encode(self, prompt: str | Sequence[int]) -> TokenIds:
        return self._encode(prompt) if isinstance(prompt, str) else prompt

    def min_tokens(self, texts: Sequence[str], above: int) -> int:
        """A lower bound on the token count of `texts` (a prompt, or a chat's message contents), found
        without tokenizing; 0 when it cannot tell (a tokenizer file has no such bound, or the texts are
        too short to exceed `above`). It stops reading once the bound passes `above`: refusing a 6 MB
        prompt against an 8K context reads its first ~40 KB."""
        if self.memo is None or sum(map(len, texts)) <= above * MAX_NONSPACE_PER_PIECE:
            return 0
        nonspace = 0
        for text in texts:
            for start in range(0, len(text), _SCAN_CHARS):
                nonspace += _nonspace(text[start:start + _SCAN_CHARS])
                if nonspace > above * MAX_NONSPACE_PER_PIECE:
                    break
        return -(-nonspace // MAX_NONSPACE_PER_PIECE)

    def max_tokens(self, prompt: str | Sequence[int]) -> int | None:
        """An upper bound on the prompt's token count without tokenizing it (None: no bound known).
        Every built-in piece and special token covers at least one character."""
        if not isinstance(prompt, str):
            return len(prompt)
        return len(prompt) if self.memo is not None else None

    def head(self, prompt: str | Sequence[int], n: int) -> TokenIds:
        """The first `n` token ids of the prompt (all of them if it has fewer), tokenizing only about
        as much text as they cover. A piece never reaches back across a cut: cutting the text changes
        only the piece the cut falls in (and a special token cut in two), so the cut is moved before
        any "<" near it and the last piece of the cut text is dropped. A tokenizer file has no such
        guarantee: it encodes the whole prompt."""
        if not isinstance(prompt, str):
            return prompt[:n]
        if self.memo is None or n <= 0:
            return self._encode(prompt)[:n] if n > 0 else []
        chars = (n + 1) * HEAD_CHARS_PER_TOKEN
        while chars < len(prompt):
            cut = _cut_before_specials(prompt, chars)
            ids = self._encode(prompt[:cut])
            if len(ids) > n:                  # n whole pieces before the (dropped) last one
                return ids[:n]
            chars *= 2
        return self._encode(prompt)[:n]

    def _encode(self, text: str) -> TokenIds:
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

    def route_request(self, tokens: TokenIds, salt: str | None, policy: str | None) -> RouteRequest:
        # Block hashes are lazy (a prefix policy hashes only the blocks it reads) and remembered in
        # runs (a repeated prefix is looked up, not re-hashed).
        return RouteRequest.from_tokens(tokens, block_size=self.block_size, salt=salt, policy=policy,
                                        memo=self.hashes)
