"""Chained block hashes: the prefix-cache key shared by workers, router and simulator.

Block i's hash is xxh3_64 over its token ids (little-endian int32) seeded with block i-1's hash,
so equal hashes mean equal prefixes, not merely equal blocks. The first block is seeded with the
salt's hash (0 without a salt), so tenants with different salts never share a block.
Only full blocks are hashed: a partial last block is never cached.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash

DEFAULT_BLOCK_SIZE = 16  # vLLM's default block size (tokens per KV block)


def root_hash(salt: str | None = None) -> int:
    return xxhash.xxh3_64_intdigest(salt.encode()) if salt else 0


def block_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE,
                 salt: str | None = None, parent: int | None = None, limit: int | None = None) -> list[int]:
    """Hashes of the full blocks of `token_ids`, chained from `parent` (or the salt's root).

    `limit` stops after that many blocks (a router that keys on the leading blocks needs no more).
    """
    count = len(token_ids) // block_size
    if limit is not None:
        count = max(0, min(count, limit))
    # Convert only the tokens that get hashed: list-to-array conversion costs ~15 ns a token, so a
    # 32K-token list with limit=4 would otherwise pay ~0.5 ms for nothing.
    data = np.asarray(token_ids[:count * block_size], dtype="<i4").tobytes()
    width = 4 * block_size
    h = root_hash(salt) if parent is None else parent
    out: list[int] = []
    append = out.append
    digest = xxhash.xxh3_64_intdigest
    # Slicing bytes is ~15% faster per block than slicing a memoryview (fewer objects to build).
    for start in range(0, count * width, width):
        h = digest(data[start:start + width], h)
        append(h)
    return out
