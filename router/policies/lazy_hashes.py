"""A prompt's chained block hashes, computed only as far as a policy looks.

Hashing is sequential (block i is seeded by block i-1), about 0.1 us a block in Python, so a 32K-token
prompt costs ~0.2-0.25 ms to hash in full. Prefix-ring policies need only the first K blocks and the
KV-aware policy stops at the first block no worker holds, so hashing on demand keeps most decisions
far below that. Values are identical to ``kvlab.block_hash.block_hashes``.
"""
from __future__ import annotations

from typing import Iterator, Sequence, overload

import numpy as np
import xxhash

from kvlab.block_hash import DEFAULT_BLOCK_SIZE, root_hash

CHUNK_BLOCKS = 32  # iteration hashes this many blocks at a time, so a loop that breaks early stops soon


class LazyBlockHashes(Sequence[int]):
    """Sequence of the full-block hashes of `tokens`; ``len`` is free, items are hashed on first use."""

    __slots__ = ("_tokens", "_block_size", "_count", "_hashes", "_seed", "_bytes", "_converted")

    def __init__(self, tokens: Sequence[int] | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE,
                 salt: str | None = None, parent: int | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._tokens = tokens
        self._block_size = block_size
        self._count = len(tokens) // block_size
        self._hashes: list[int] = []
        self._seed = root_hash(salt) if parent is None else parent
        self._bytes = b""      # little-endian int32 bytes of the first `_converted` blocks
        self._converted = 0

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            stop = index.indices(self._count)[1]
            return self.upto(stop)[index] if stop > 0 else []
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("block index out of range")
        return self.upto(index + 1)[index]

    def __iter__(self) -> Iterator[int]:
        for start in range(0, self._count, CHUNK_BLOCKS):
            yield from self.upto(start + CHUNK_BLOCKS)[start:start + CHUNK_BLOCKS]

    @property
    def computed(self) -> int:
        """How many blocks have been hashed so far (for benchmarks and tests)."""
        return len(self._hashes)

    def upto(self, stop: int) -> list[int]:
        """The internal hash list, extended to at least min(stop, len) blocks; do not mutate it."""
        stop = min(stop, self._count)
        done = len(self._hashes)
        if stop > done:
            self._extend(done, stop)
        return self._hashes

    def _extend(self, start: int, stop: int) -> None:
        if stop > self._converted:
            self._convert(stop)
        width = 4 * self._block_size
        data = self._bytes
        h = self._hashes[-1] if self._hashes else self._seed
        append = self._hashes.append
        digest = xxhash.xxh3_64_intdigest
        for offset in range(start * width, stop * width, width):
            h = digest(data[offset:offset + width], h)
            append(h)

    def _convert(self, stop: int) -> None:
        # Convert tokens to bytes in doubling spans: a list-to-array conversion costs ~15 ns a token,
        # so a policy that needs 4 blocks converts 4, while a long walk pays ~one conversion in all.
        upto = min(self._count, max(stop, 2 * self._converted))
        bs = self._block_size
        self._bytes += np.asarray(self._tokens[self._converted * bs:upto * bs], dtype="<i4").tobytes()
        self._converted = upto
