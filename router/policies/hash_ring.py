"""Consistent-hash ring with virtual nodes: adding or removing one of N workers moves ~1/N of keys.

Each worker owns `vnodes` points at xxh3 positions of "<id>#<i>"; a key belongs to the first point
clockwise from it. More virtual nodes even out the shares (the spread of a share falls roughly as
1/sqrt(vnodes)); lookups are a bisect over the sorted points, O(log(N * vnodes)).
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator

import xxhash

DEFAULT_VNODES = 128
# Walk orders remembered (one per ring position a key landed on): every position of a 16-worker ring at
# the default vnodes, ~2 MB of tuples at most; past it they are forgotten and found again.
ORDERS_KEPT = 2048


class HashRing:
    def __init__(self, vnodes: int = DEFAULT_VNODES, seed: int = 0) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.vnodes = vnodes
        self.seed = seed
        self._members: set[str] = set()
        self._points: list[int] = []   # sorted ring positions
        self._owners: list[str] = []   # owner of each position
        self._orders: dict[int, tuple[str, ...]] = {}   # order()'s answers by start position

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._members

    def __len__(self) -> int:
        return len(self._members)

    def holds(self, worker_ids: Iterable[str]) -> bool:
        """Whether every one of `worker_ids` is on the ring."""
        return self._members.issuperset(worker_ids)

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def add(self, worker_id: str) -> None:
        if worker_id not in self._members:
            self._members.add(worker_id)
            self._rebuild()

    def remove(self, worker_id: str) -> None:
        if worker_id in self._members:
            self._members.discard(worker_id)
            self._rebuild()

    def owner(self, key: int) -> str:
        """The worker owning `key`: the first point clockwise (wrapping) from it."""
        if not self._points:
            raise LookupError("the ring is empty")
        i = bisect_right(self._points, key)
        return self._owners[i if i < len(self._owners) else 0]

    def walk(self, key: int) -> Iterator[str]:
        """Distinct workers in clockwise order from `key`: the owner first, then its successors."""
        owners = self._owners
        total = len(owners)
        if not total:
            return
        start = bisect_right(self._points, key)
        seen: set[str] = set()
        for step in range(total):
            owner = owners[(start + step) % total]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self._members):
                    return

    def order(self, key: int) -> tuple[str, ...]:
        """``walk(key)`` whole: it depends only on the position the key lands on, so it is remembered
        per position (a decision then costs a bisect and a look-up) until membership changes."""
        points = self._points
        start = bisect_right(points, key)
        if start == len(points):
            start = 0   # past the last point: the walk wraps to the first
        found = self._orders.get(start)
        if found is None:
            if len(self._orders) >= ORDERS_KEPT:
                self._orders.clear()
            found = self._orders[start] = tuple(self.walk(key))
        return found

    def _rebuild(self) -> None:
        self._orders = {}
        # Membership changes are rare; a full sort keeps the code obvious (10K points sort in ~2 ms).
        points = sorted((self._position(w, i), w) for w in self._members for i in range(self.vnodes))
        self._points = [p for p, _ in points]
        self._owners = [w for _, w in points]

    def _position(self, worker_id: str, vnode: int) -> int:
        return xxhash.xxh3_64_intdigest(f"{worker_id}#{vnode}".encode(), self.seed)
