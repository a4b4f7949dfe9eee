"""Global prefix index fed by the workers' KV events: which workers hold which cached blocks.

Chained block hashes identify whole prefixes, so a flat ``hash -> workers`` dict answers the same
questions as a radix tree: a worker's cached prefix for a prompt is the run of leading blocks whose
hashes it holds. Workers are bits in an int mask, so following a prompt through the index is one
dict lookup and one AND per block, and it stops at the first block no worker holds.

Events use vLLM's format (``kvlab.wire.kv_events``). With ``rehash=True`` the index recomputes our hashes
from ``BlockStored.token_ids`` (chained from the parent's recomputed hash), so engines whose hash
differs from ours (vLLM's sha256 or builtin hash) still line up with the router's hashes; engine
blocks may then be any multiple of our block size. In that mode a block whose parent was never seen
(the index joined mid-stream) cannot be placed and is skipped, and per-tenant salts cannot be
recovered from the events (vLLM does not publish them), so salted prompts simply never match.

Host tier: with ``host_credit`` set, the index also follows blocks a worker keeps in host memory
(events with ``medium="CPU"``, as vLLM's offloading connector publishes them) in a second index over
every medium, and ``match_tiers`` answers, per worker, how many leading blocks it holds in HBM and how
many more it holds in host memory after them; ``host_credit`` is what a host block is worth against an
HBM block to a policy (emulator.physics.steptime.host_hit_credit). CPU events carry no token ids, so
this needs the engines' own hashes (not ``rehash``).
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from functools import reduce
from itertools import accumulate, repeat
from operator import and_, neg

from kvlab.wire.block_hash import DEFAULT_BLOCK_SIZE, BlockHash, block_hashes, root_hash
from kvlab.wire.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventBatch

# Blocks read per step, doubling: a miss wastes < max(64, matched) hashes. Steps end on multiples of
# 64 so a lazy sequence with a memo (router.policies.hash_memo, 64-block runs) finds whole runs.
FIRST_CHUNK, MAX_CHUNK = 64, 256
DEFAULT_MEDIA = ("GPU", None)  # blocks offloaded to CPU are not a prefix-cache hit on the GPU


class KvIndex:
    def __init__(self, rehash: bool = False, block_size: int = DEFAULT_BLOCK_SIZE,
                 salt: str | None = None, media: Iterable[str | None] = DEFAULT_MEDIA,
                 host_credit: float | None = None) -> None:
        self.rehash = rehash
        self.block_size = block_size
        self._root = root_hash(salt)
        self.media = frozenset(media)
        self.skipped_blocks = 0                       # rehash mode: stored blocks with an unknown parent
        self._owners: dict[BlockHash, int] = {}             # block hash -> bit mask of worker slots
        self._refs: dict[str, dict[BlockHash, int]] = {}    # worker -> block hash -> copies held
        # rehash: engine hash -> (our hashes, copies)
        self._engine: dict[str, dict[BlockHash, tuple[tuple[BlockHash, ...], int]]] = {}
        self._slot: dict[str, int] = {}
        self._ids: list[str | None] = []
        self.host_credit = host_credit
        self.any_tier: KvIndex | None = None   # every medium: HBM and host together
        if host_credit is not None:
            if rehash:
                raise ValueError("a host tier's events carry no token ids: host_credit needs rehash=False")
            if not 0.0 <= host_credit <= 1.0:
                raise ValueError(f"host_credit must be in [0, 1], got {host_credit}")
            self.any_tier = KvIndex(block_size=block_size, salt=salt, media=(*self.media, "CPU"))

    # ---- feeding -------------------------------------------------------------------------------

    def apply(self, worker_id: str, batch: KVEventBatch) -> None:
        for event in batch.events:
            self.apply_event(worker_id, event)

    def apply_event(self, worker_id: str, event: KVEvent) -> None:
        if self.any_tier is not None:
            self.any_tier.apply_event(worker_id, event)
        if isinstance(event, BlockStored):
            if event.medium in self.media:
                self._stored(worker_id, event)
        elif isinstance(event, BlockRemoved):
            if event.medium in self.media:
                self._removed(worker_id, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            self._clear(worker_id)
        else:
            raise TypeError(f"not a KV event: {type(event).__name__}")

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (it left the cluster or restarted with an empty cache)."""
        if self.any_tier is not None:
            self.any_tier.remove_worker(worker_id)
        if worker_id in self._slot:
            self._clear(worker_id)
            slot = self._slot.pop(worker_id)
            self._ids[slot] = None
            del self._refs[worker_id]
            self._engine.pop(worker_id, None)

    # ---- questions -----------------------------------------------------------------------------

    def match(self, blocks: Sequence[BlockHash]) -> dict[str, int]:
        """Leading blocks of `blocks` each worker holds, for workers holding at least the first.

        Reads `blocks` in growing chunks, so a lazy hash sequence is hashed only a little past the
        first block no worker holds. Per chunk the lookups and the running AND of worker masks run
        in C (map, accumulate); the running masks only lose bits, so where each worker drops out is
        found by bisection rather than a Python loop over every block.
        """
        total = len(blocks)
        if not total:
            return {}
        lookup = self._owners.get
        active = lookup(blocks[0], 0)
        matched: dict[str, int] = {}
        upto = getattr(blocks, "upto", None)  # LazyBlockHashes: extend, then read its list in place
        start, end, size = 1, 0, FIRST_CHUNK
        while active and start < total:
            end = min(total, end + size)
            chunk = (upto(end) if upto else blocks)[start:end]
            last = reduce(and_, map(lookup, chunk, repeat(0)), active)  # fast path: no list built
            if last != active:
                running = list(accumulate(map(lookup, chunk, repeat(0)), and_, initial=active))
                self._record_drops(running, start - 1, matched)
            active = last
            start, size = end, min(2 * size, MAX_CHUNK)
        if active:
            self._record(active, total, matched)
        return matched

    def match_tiers(self, blocks: Sequence[BlockHash]) -> dict[str, tuple[int, int]]:
        """Per worker holding the first block in any tier: (leading blocks in HBM, blocks after them in
        host memory). Without a host tier the second number is always 0."""
        gpu = self.match(blocks)
        if self.any_tier is None:
            return {w: (n, 0) for w, n in gpu.items()}
        return {w: (gpu.get(w, 0), n - gpu.get(w, 0)) for w, n in self.any_tier.match(blocks).items()}

    def credited_match(self, blocks: Sequence[BlockHash]) -> Mapping[str, float]:
        """Leading cached blocks per worker as a policy weighs them: HBM blocks count 1, the host-held
        blocks after them host_credit each (just ``match`` without a host tier)."""
        credit = self.host_credit
        if credit is None:
            return self.match(blocks)
        return {w: gpu + credit * host for w, (gpu, host) in self.match_tiers(blocks).items()}

    def workers_with(self, block_hash: BlockHash) -> set[str]:
        return self._bits_to_ids(self._owners.get(block_hash, 0))

    def block_count(self, worker_id: str) -> int:
        return len(self._refs.get(worker_id, ()))

    @property
    def workers(self) -> list[str]:
        return list(self._slot)

    def __len__(self) -> int:
        """Distinct cached blocks across the cluster."""
        return len(self._owners)

    # ---- internals -----------------------------------------------------------------------------

    def _stored(self, worker_id: str, event: BlockStored) -> None:
        if not self.rehash:   # the common case (engine and router blocks alike): the hashes are ours
            if event.block_size != self.block_size:
                raise ValueError(f"engine blocks of {event.block_size} tokens cannot match the router's "
                                 f"{self.block_size}-token hashes; use KvIndex(rehash=True)")
            self._add_refs(worker_id, event.block_hashes)
            return
        groups = self._recompute(worker_id, event)
        engine = self._engine.setdefault(worker_id, {})
        for engine_hash, ours in groups:
            _, copies = engine.get(engine_hash, ((), 0))
            engine[engine_hash] = (ours, copies + 1)
        self._add_refs(worker_id, [h for _, ours in groups for h in ours])

    def _add_refs(self, worker_id: str, hashes: Sequence[BlockHash]) -> None:
        """One more copy of each block on the worker; a block it did not hold gains the worker's bit."""
        refs = self._worker_refs(worker_id)
        owners = self._owners
        bit = 1 << self._slot[worker_id]
        for h in hashes:
            count = refs.get(h, 0)
            refs[h] = count + 1
            if not count:
                owners[h] = owners.get(h, 0) | bit

    def _recompute(self, worker_id: str, event: BlockStored) -> list[tuple[BlockHash, tuple[BlockHash, ...]]]:
        """Our hashes for each engine block of the event: (engine hash, our sub-block hashes)."""
        size = event.block_size
        if size % self.block_size:
            raise ValueError(f"engine block size {size} is not a multiple of the router's {self.block_size}")
        if len(event.token_ids) != size * len(event.block_hashes):
            raise ValueError(f"BlockStored has {len(event.token_ids)} token ids for "
                             f"{len(event.block_hashes)} blocks of {size}")
        if event.parent_block_hash is None:
            seed = self._root
        else:
            parent = self._engine.get(worker_id, {}).get(event.parent_block_hash)
            if parent is None:
                self.skipped_blocks += len(event.block_hashes)
                return []
            seed = parent[0][-1]
        ours = block_hashes(event.token_ids, self.block_size, parent=seed)
        per = size // self.block_size
        return [(e, tuple(ours[i * per:(i + 1) * per])) for i, e in enumerate(event.block_hashes)]

    def _removed(self, worker_id: str, hashes: Sequence[BlockHash]) -> None:
        if worker_id not in self._slot:
            return
        engine = self._engine.get(worker_id, {})
        for engine_hash in hashes:
            if not self.rehash:
                self._release(worker_id, engine_hash)
                continue
            entry = engine.get(engine_hash)
            if entry is None:
                continue
            ours, copies = entry
            if copies > 1:
                engine[engine_hash] = (ours, copies - 1)
            else:
                del engine[engine_hash]
            for h in ours:
                self._release(worker_id, h)

    def _release(self, worker_id: str, h: BlockHash) -> None:
        refs = self._refs[worker_id]
        count = refs.get(h, 0)
        if count > 1:
            refs[h] = count - 1
        elif count == 1:
            del refs[h]
            self._drop_bit(h, 1 << self._slot[worker_id])

    def _clear(self, worker_id: str) -> None:
        if worker_id not in self._slot:
            return
        bit = 1 << self._slot[worker_id]
        for h in self._refs[worker_id]:
            self._drop_bit(h, bit)
        self._refs[worker_id] = {}
        self._engine.pop(worker_id, None)

    def _drop_bit(self, h: BlockHash, bit: int) -> None:
        mask = self._owners[h] & ~bit
        if mask:
            self._owners[h] = mask
        else:
            del self._owners[h]

    def _worker_refs(self, worker_id: str) -> dict[BlockHash, int]:
        if worker_id not in self._slot:
            free = [i for i, w in enumerate(self._ids) if w is None]
            slot = free[0] if free else len(self._ids)
            if slot == len(self._ids):
                self._ids.append(None)
            self._ids[slot] = worker_id
            self._slot[worker_id] = slot
            self._refs[worker_id] = {}
        return self._refs[worker_id]

    def _record_drops(self, running: list[int], base: int, matched: dict[str, int]) -> None:
        """`running[k]` holds the workers with blocks 0..base+k; a worker in running[j-1] but not in
        running[j] matched base + j blocks. Values never gain bits, so they never increase."""
        k, current = 0, running[0]
        while True:
            k = bisect_right(running, -current, k, key=neg)  # first k with running[k] < current
            if k == len(running):
                return
            self._record(current & ~running[k], base + k, matched)
            current = running[k]

    def _record(self, bits: int, depth: int, matched: dict[str, int]) -> None:
        for worker_id in self._bits_to_ids(bits):
            matched[worker_id] = depth

    def _bits_to_ids(self, bits: int) -> set[str]:
        ids = set()
        while bits:
            low = bits & -bits
            worker_id = self._ids[low.bit_length() - 1]
            if worker_id is not None:
                ids.add(worker_id)
            bits ^= low
        return ids
