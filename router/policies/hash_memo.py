"""Remembered block-hash runs: a prompt that repeats a known prefix hashes only its new part.

Chained hashing is sequential, one xxhash call per block (~0.12 us in Python): ~240 us for a
32K-token prompt, more than a KV-aware decision may take. Prompts repeat long prefixes (system
prompts, shared documents, earlier turns of a chat), so the router remembers every aligned run of
RUN_BLOCKS blocks it hashed, keyed by a 128-bit digest of the run's token ids seeded with the hash
of the block before the run. A known run then costs one digest and a dict lookup (~1 us for 64
blocks of an int32 array) instead of 64 chained calls.

The digest reads the ids as cheaply as their form allows: an array's int32 bytes as they are, a
list (token ids decoded from JSON) through msgpack, which msgspec writes in C at ~5 ns an id, where
packing int32 bytes takes ~8: a hit on a list then never converts it. The two encodings are kept in
separate key ranges, so they cannot collide with each other.

A hit returns exactly what chaining would: the key covers the parent hash and every id of the run,
so a wrong hit needs a 128-bit digest collision (the 64-bit chain already assumes none). The memo is
bounded, least recently used runs leave first, and it reads no clock and does no I/O.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import msgspec
import numpy as np
import xxhash

from kvlab.wire.block_hash import BlockHash, chain, token_bytes

RUN_BLOCKS = 64       # blocks per remembered run: 1,024 tokens at 16 a block; a miss costs ~7.5 us
DEFAULT_RUNS = 8192   # 512K blocks (8M tokens at 16 a block), more than a large cluster's KV cache
                      # holds; ~3 KB a run (64 Python ints in a tuple, its key, the LRU link; measured
                      # with tracemalloc), so ~24 MB when full
_LIST_KEYS = 1 << 128   # list keys live above every array key
_msgpack = msgspec.msgpack.Encoder().encode


class BlockHashMemo:
    def __init__(self, block_size: int, runs: int = DEFAULT_RUNS) -> None:
        if runs <= 0:
            raise ValueError(f"runs must be positive, got {runs}")
        self.block_size = block_size
        self.width = 4 * block_size             # bytes per block (int32 tokens)
        self.capacity = runs
        self._runs: OrderedDict[int, tuple[BlockHash, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def run(self, tokens: Sequence[int] | np.ndarray, start: int, stop: int,
            parent: BlockHash) -> tuple[BlockHash, ...]:
        """The chained hashes of the run of blocks in tokens[start:stop] (RUN_BLOCKS whole blocks),
        the first seeded by `parent`."""
        key = _key(tokens, start, stop, parent)
        hashes = self._runs.get(key)
        if hashes is not None:
            self._runs.move_to_end(key)
            self.hits += 1
            return hashes
        self.misses += 1
        hashes = tuple(chain(token_bytes(tokens, start, stop), self.width, parent))
        self._runs[key] = hashes
        if len(self._runs) > self.capacity:
            self._runs.popitem(last=False)
        return hashes

    def __len__(self) -> int:
        return len(self._runs)


def _key(tokens: Sequence[int] | np.ndarray, start: int, stop: int, parent: int) -> int:
    if isinstance(tokens, np.ndarray):
        ids = tokens[start:stop]
        data = ids if ids.dtype == np.dtype("<i4") else ids.astype("<i4")   # int32: hashed in place
        return xxhash.xxh3_128_intdigest(data, parent)   # type: ignore[arg-type]  # ndarray is a buffer; stubs disagree
    return _LIST_KEYS + xxhash.xxh3_128_intdigest(_msgpack(tokens[start:stop]), parent)
