"""A prompt's chained block hashes, computed only as far as a policy looks.

Hashing is sequential (block i is seeded by block i-1), about 0.1 us a block in Python, so a 32K-token
prompt costs ~0.2-0.25 ms to hash in full. Prefix-ring policies need only the first K blocks and the
KV-aware policy stops at the first block no worker holds, so hashing on demand keeps most decisions
far below that. With a ``BlockHashMemo``, each aligned run of RUN_BLOCKS blocks that lies wholly
inside a stretch being hashed is looked up there first, so a remembered prefix costs ~1 us per run.
Values are identical to ``kvlab.wire.block_hash.block_hashes`` either way.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np

from kvlab.wire.block_hash import DEFAULT_BLOCK_SIZE, BlockHash, chain, root_hash, token_bytes
from router.policies.hash_memo import RUN_BLOCKS, BlockHashMemo

CHUNK_BLOCKS = RUN_BLOCKS  # iteration hashes a memo run at a time, so a loop that breaks early stops soon


class LazyBlockHashes(Sequence[BlockHash]):
    """Sequence of the full-block hashes of `tokens`; ``len`` is free, items are hashed on first use."""

    __slots__ = ("_tokens", "_block_size", "_count", "_hashes", "_seed", "_memo")

    def __init__(self, tokens: Sequence[int] | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE,
                 salt: str | None = None, parent: BlockHash | None = None, memo: BlockHashMemo | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if memo is not None and memo.block_size != block_size:
            raise ValueError(f"memo is for {memo.block_size}-token blocks, not {block_size}")
        self._memo = memo
        self._tokens = tokens
        self._block_size = block_size
        self._count = len(tokens) // block_size
        self._hashes: list[BlockHash] = []
        self._seed = root_hash(salt) if parent is None else parent

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> BlockHash: ...
    @overload
    def __getitem__(self, index: slice) -> list[BlockHash]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            stop = index.indices(self._count)[1]
            return self.upto(stop)[index] if stop > 0 else []
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("block index out of range")
        return self.upto(index + 1)[index]

    def __iter__(self) -> Iterator[BlockHash]:
        for start in range(0, self._count, CHUNK_BLOCKS):
            yield from self.upto(start + CHUNK_BLOCKS)[start:start + CHUNK_BLOCKS]

    @property
    def computed(self) -> int:
        """How many blocks have been hashed so far (for benchmarks and tests)."""
        return len(self._hashes)

    def upto(self, stop: int) -> list[BlockHash]:
        """The internal hash list, extended to at least min(stop, len) blocks; do not mutate it."""
        stop = min(stop, self._count)
        done = len(self._hashes)
        if stop > done:
            self._extend(done, stop)
        return self._hashes

    def _extend(self, start: int, stop: int) -> None:
        if self._memo is None:
            self._chain(start, stop)
            return
        begin = start - start % RUN_BLOCKS
        if begin + RUN_BLOCKS <= stop:
            # The stretch now covers the run it started inside (a policy peeked at a few leading
            # blocks first): redo that run from its beginning, through the memo; same values.
            del self._hashes[begin:]
            start = begin
        # Hash up to the first run boundary, look up each whole run, hash what is left after the last.
        first = min(stop, -(-start // RUN_BLOCKS) * RUN_BLOCKS)
        last = max(first, stop - stop % RUN_BLOCKS)
        self._chain(start, first)
        bs = self._block_size
        for block in range(first, last, RUN_BLOCKS):
            self._hashes += self._memo.run(self._tokens, block * bs, (block + RUN_BLOCKS) * bs, self._parent())
        self._chain(last, stop)

    def _chain(self, start: int, stop: int) -> None:
        """Hash blocks start..stop-1 one by one. Only the ids hashed are converted to bytes: a policy
        that reads 4 blocks converts 4, a walk that stops at the first uncached block stops there."""
        if stop > start:
            bs = self._block_size
            self._hashes += chain(token_bytes(self._tokens, start * bs, stop * bs), 4 * bs, self._parent())

    def _parent(self) -> BlockHash:
        return self._hashes[-1] if self._hashes else self._seed
