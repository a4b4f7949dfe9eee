"""Mooncake-style request traces: records, lazily expanded token prompts, and their block hashes.

A trace line is ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`` with one
id per 512-token prompt block; requests that share a leading run of ids share that prefix block for
block (see the traces' README in the data folder, emulator.datasets). To replay it with kvlab's 16-token
blocks, each id expands into 512 token ids that are a pure function of the id (the same wherever the id
appears), and the last block is truncated to ``input_length``.

Token ids come from the workload vocabulary (emulator.workload), so an expanded prompt also has an exact
text form that the built-in tokenizer encodes back to the same ids: HTTP clients may send either.
Expansion is lazy (one request at a time): the Mooncake conversation trace holds ~147M prompt tokens.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import msgspec
import numpy as np

from emulator.datasets import dataset
from emulator.workload import VOCAB_WORDS, Request, vocabulary
from kvlab.wire.block_hash import DEFAULT_BLOCK_SIZE, BlockHash, block_hashes, root_hash
from kvlab.wire.user_errors import UserError

TRACE_BLOCK_TOKENS = 512  # tokens per hash_id in Mooncake traces (FAST'25 release README)
MOONCAKE_CONVERSATION = "mooncake_conversation.jsonl"

# splitmix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014):
# a bijective 64-bit mixer, so (id, position) -> token is pure, uniform and vectorizes in numpy.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class TraceRecord(msgspec.Struct, frozen=True):
    timestamp: int          # ms from the trace start
    input_length: int       # prompt tokens
    output_length: int      # generated tokens
    hash_ids: list[int]     # one id per 512-token prompt block


class HashedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A trace request as the simulator needs it: lengths and 16-token block hashes, no tokens."""
    request_id: str
    arrival_s: float
    prompt_len: int
    max_tokens: int
    block_hashes: list[BlockHash]


def shared_trace(name: str = MOONCAKE_CONVERSATION) -> Path | None:
    """A trace from the data folder (``$KVLAB_DATA_DIR/traces``, see emulator.datasets), or None."""
    return dataset("traces", name)


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    """All records of a JSON-lines trace (or the first `limit`), in file order."""
    try:
        data = Path(path).read_bytes()
        records = msgspec.json.Decoder(TraceRecord).decode_lines(data)
    except OSError as exc:
        raise UserError(f"cannot read trace {str(path)!r} ({exc.strerror}); pass --trace PATH to a JSON-lines "
                        f"trace (see emulator/traces.py)") from None
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError: wrong fields as well as bad JSON
        raise UserError(f"{str(path)!r} is not a Mooncake-style JSON-lines trace ({exc}); pass a .jsonl file with "
                        f"timestamp, input_length, output_length and hash_ids on each line") from None
    for i, r in enumerate(records):
        if len(r.hash_ids) * TRACE_BLOCK_TOKENS < r.input_length:
            raise ValueError(f"{path}: record {i} has {len(r.hash_ids)} blocks for {r.input_length} tokens")
    return records[:limit] if limit is not None else records


# -- tokens -----------------------------------------------------------------------------------------

def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def block_words(hash_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Vocabulary word indices, shape (len(hash_ids), 512): row i is a pure function of hash_ids[i]."""
    ids = np.asarray(hash_ids, dtype=np.uint64).reshape(-1, 1)
    positions = np.arange(TRACE_BLOCK_TOKENS, dtype=np.uint64)
    return (_splitmix64(ids * np.uint64(TRACE_BLOCK_TOKENS) + positions) % np.uint64(VOCAB_WORDS)).astype(np.int64)


def _prompt_words(record: TraceRecord) -> np.ndarray:
    return block_words(record.hash_ids).reshape(-1)[:record.input_length]


def expand_tokens(record: TraceRecord) -> np.ndarray:
    """The record's prompt token ids (int32), `input_length` of them."""
    return vocabulary()[0][_prompt_words(record)]


def expand_text(record: TraceRecord) -> str:
    """The same prompt as text; BuiltinTokenizer().encode(text) equals expand_tokens(record)."""
    return vocabulary()[1][_prompt_words(record)].tobytes().decode("ascii")


def _arrivals(records: Sequence[TraceRecord], speedup: float) -> np.ndarray:
    if speedup <= 0:
        raise ValueError(f"speedup must be > 0 (got {speedup})")
    stamps = np.fromiter((r.timestamp for r in records), dtype=np.float64, count=len(records))
    return (stamps - (stamps[0] if len(stamps) else 0.0)) / 1000.0 / speedup


def trace_requests(trace: str | Path | Sequence[TraceRecord], *, speedup: float = 1.0, limit: int | None = None,
                   tenant: str = "default", with_text: bool = False) -> Iterator[Request]:
    """Requests in trace order, expanded one at a time; arrival times divided by `speedup`."""
    records = _records(trace, limit)
    for i, (record, t) in enumerate(zip(records, _arrivals(records, speedup), strict=True)):
        yield Request(request_id=f"trace-{i:06d}", arrival_s=float(t), tokens=expand_tokens(record),
                      max_tokens=max(1, record.output_length), archetype="trace", tenant=tenant,
                      text=expand_text(record) if with_text else None)


def _records(trace: str | Path | Sequence[TraceRecord], limit: int | None) -> Sequence[TraceRecord]:
    if isinstance(trace, (str, Path)):
        return read_trace(trace, limit)
    return trace[:limit] if limit is not None else trace


# -- block hashes without tokens --------------------------------------------------------------------

class TraceHasher:
    """16-token block hashes of trace prompts, equal to kvlab.wire.block_hash.block_hashes over the tokens.

    A 512-token block's sub-block hashes depend only on its id and the hash chained into it, so they are
    computed once per (parent hash, id) and kept in an LRU: shared prefixes are hashed once.
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, salt: str | None = None, cache_blocks: int = 65536):
        if block_size < 1 or TRACE_BLOCK_TOKENS % block_size:
            raise ValueError(f"block_size must divide {TRACE_BLOCK_TOKENS} (got {block_size})")
        self.block_size = block_size
        self.root = root_hash(salt)
        self._cache: OrderedDict[tuple[BlockHash, int], list[BlockHash]] = OrderedDict()   # (parent, id)
        self._capacity = cache_blocks

    def hashes(self, record: TraceRecord) -> list[BlockHash]:
        out: list[BlockHash] = []
        parent, ids = self.root, record.hash_ids
        done = 0
        while done < len(ids) and (sub := self._cached(parent, ids[done])) is not None:
            out += sub
            parent, done = sub[-1], done + 1
        # Past the first miss every (parent, id) is new too (a hit there would mean the same prefix),
        # so the rest is hashed in one pass over all its tokens.
        if done < len(ids):
            out += self._hash_rest(parent, ids[done:])
        # A truncated last block's tokens are a prefix of the full block's: its full sub-blocks match.
        return out[:record.input_length // self.block_size]

    def _cached(self, parent: BlockHash, hash_id: int) -> list[BlockHash] | None:
        sub = self._cache.get((parent, hash_id))
        if sub is not None:
            self._cache.move_to_end((parent, hash_id))
        return sub

    def _hash_rest(self, parent: BlockHash, ids: Sequence[int]) -> list[BlockHash]:
        tokens = vocabulary()[0][block_words(ids)].reshape(-1)
        hashes = block_hashes(tokens, self.block_size, parent=parent)
        per_block = TRACE_BLOCK_TOKENS // self.block_size
        for k, hash_id in enumerate(ids):
            self._cache[(parent, hash_id)] = sub = hashes[k * per_block:(k + 1) * per_block]
            parent = sub[-1]
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return hashes


def hashed_requests(trace: str | Path | Sequence[TraceRecord], *, speedup: float = 1.0, limit: int | None = None,
                    block_size: int = DEFAULT_BLOCK_SIZE, salt: str | None = None) -> Iterator[HashedRequest]:
    """Trace requests as lengths and block hashes only: what a discrete-event simulation needs."""
    records = _records(trace, limit)
    hasher = TraceHasher(block_size, salt)
    for i, (record, t) in enumerate(zip(records, _arrivals(records, speedup), strict=True)):
        yield HashedRequest(request_id=f"trace-{i:06d}", arrival_s=float(t), prompt_len=record.input_length,
                            max_tokens=max(1, record.output_length), block_hashes=hasher.hashes(record))


def prefix_reuse_fraction(records: Iterable[TraceRecord]) -> float:
    """Fraction of prompt blocks whose id appeared earlier: an infinite, perfectly routed cache's hit rate."""
    seen: set[int] = set()
    hits = total = 0
    for r in records:
        hits += sum(1 for h in r.hash_ids if h in seen)
        total += len(r.hash_ids)
        seen.update(r.hash_ids)
    return hits / total if total else 0.0
