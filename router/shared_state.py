"""State several router processes on one port share: in-flight counts and tenant limits, in shared memory.

A ``ProcessShare`` is built once by the supervisor (router.processes) before it starts the processes and
handed to each; ``share.joined(index)`` is process `index`'s handle to it.

In-flight counts (bounded loads). Each process has a row of int64 counters in a shared array, one per
worker and one per tenant, and only that process writes its row (one writer: no lock, and an aligned
8-byte store is never seen torn). A worker's load is the sum of its column, read before every
decision (WorkerPool.views). **Guarantee**: a decision sees every placement whose charge was stored
before it read the counts. A process decides and charges without yielding to its event loop (choose,
then charge, in one synchronous run: router.forwarding.proxy), so at any moment each *other* process
has at most one placement between its read and its charge. Hence with P processes a placement can miss
at most P - 1 concurrent ones, and bounded loads hold with an additive P - 1: no worker ends above
max((1 + eps) * a, a + slack) + P, where a = (T + 1) / n (router.policies.bounded_load, whose bound
with one process is the same with + 1). Placements that do not overlap in time obey the one-process
bound exactly.

Tenant limits. The request and token buckets of every tenant live in one shared array of doubles
(level and last refill time per bucket), updated under one cross-process lock (an flock on a file,
which the kernel releases when its holder dies: a process killed inside the lock cannot wedge the
others, as it would a semaphore); a tenant's requests in
flight are its column of the per-process rows, summed under the same lock. peek, admit and release
run whole under the lock, so the buckets and the concurrency cap behave exactly as in one process:
**no error bound beyond one process's** (the clock is CLOCK_MONOTONIC, one clock for every process on
the host). A process that dies loses nothing it had admitted except the settlement: its in-flight row
is cleared by the supervisor, and the tokens it had reserved stay charged (never refunded: the limit
errs on the strict side).
"""
from __future__ import annotations

import copy
import fcntl
import math
import multiprocessing as mp
import os
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager

from router.frontdoor.admission import Admission
from router.frontdoor.tenants import TOKENS_BURST_S, TenantConfig, Tenants, _TenantState
from router.frontdoor.token_bucket import TokenBucket

_BUCKET_FIELDS = 2   # level, last refill time


class ProcessShare:
    """Shared arrays for `processes` routers over fixed `workers` and `tenants` (picklable for spawn)."""

    def __init__(self, processes: int, workers: Sequence[str], tenants: Iterable[TenantConfig]):
        ctx = mp.get_context("spawn")
        self.processes = processes
        self.workers = {worker_id: slot for slot, worker_id in enumerate(workers)}
        self.tenants = {t.name: slot for slot, t in enumerate(tenants)}
        self.width = len(self.workers) + len(self.tenants)
        self.counts = ctx.RawArray("q", max(1, processes * self.width))
        # NaN: not yet used (a bucket starts full at its first use; router.shared_state.SharedBucket)
        self.buckets = ctx.RawArray("d", [math.nan] * max(1, 2 * _BUCKET_FIELDS * len(self.tenants)))
        fd, path = tempfile.mkstemp(prefix="kvlab-router-lock-")
        os.close(fd)
        self.lock = FileLock(path)
        self.index = -1

    def joined(self, index: int) -> ProcessShare:
        """This share as process `index` uses it: its own row, and its own handle on the lock."""
        if not 0 <= index < self.processes:
            raise ValueError(f"process index {index} outside 0..{self.processes - 1}")
        mine = copy.copy(self)
        mine.index, mine.lock = index, FileLock(self.lock.path)
        return mine

    def remove(self) -> None:
        """Delete the lock file (the supervisor, once every process has stopped)."""
        try:
            os.unlink(self.lock.path)
        except FileNotFoundError:
            pass

    def clear(self, index: int) -> None:
        """Forget what process `index` had in flight (it died; the supervisor calls this)."""
        base = index * self.width
        for i in range(base, base + self.width):
            self.counts[i] = 0

    # -- worker loads ----------------------------------------------------------------------------
    def worker_slot(self, worker_id: str) -> int | None:
        return self.workers.get(worker_id)

    def add(self, slot: int, delta: int) -> None:
        """Add to this process's own count in column `slot` (only this process writes its row)."""
        i = self.index * self.width + slot
        self.counts[i] += delta

    def total(self, slot: int) -> int:
        counts, width = self.counts, self.width
        return sum(counts[p * width + slot] for p in range(self.processes))

    # -- tenants ---------------------------------------------------------------------------------
    def tenant_table(self, configs: list[TenantConfig], now: float) -> Tenants:
        """The Gate's tenant table, backed by this share (router.frontdoor.gate.Gate's make_tenants)."""
        return SharedTenants(configs, now, self)


class FileLock:
    """A lock between processes: an exclusive flock on `path`, through a descriptor this process opens
    (flock excludes open file descriptions, so each process opens its own; not between threads)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_fd": None}   # a descriptor means nothing in another process

    def __enter__(self) -> FileLock:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        assert self._fd is not None   # entered
        fcntl.flock(self._fd, fcntl.LOCK_UN)


class SharedBucket(TokenBucket):
    """A TokenBucket whose level and last refill time live in the share's array: every process
    refills and takes from the same bucket (callers hold the share's lock)."""
    __slots__ = ("_array", "_at")

    def __init__(self, rate: float, burst: float, array, at: int) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"token bucket needs rate > 0 and burst > 0 (got rate={rate}, burst={burst})")
        self.rate, self.burst = float(rate), float(burst)
        self._array, self._at = array, at

    @property
    def _level(self) -> float:
        level = self._array[self._at]
        return self.burst if math.isnan(level) else level   # starts full, as TokenBucket

    @_level.setter
    def _level(self, value: float) -> None:
        self._array[self._at] = value

    @property
    def _last(self) -> float:
        last = self._array[self._at + 1]
        return -math.inf if math.isnan(last) else last   # never refilled: the first refill fills it (to burst)

    @_last.setter
    def _last(self, value: float) -> None:
        self._array[self._at + 1] = value


class _SharedTenantState(_TenantState):
    """A tenant's buckets in the shared array and its in-flight count as the sum over processes."""
    __slots__ = ("_share", "_column")

    def __init__(self, config: TenantConfig, share: ProcessShare, slot: int) -> None:
        self.config = config
        at = 2 * _BUCKET_FIELDS * slot
        self.requests = _shared_bucket(config.requests_per_s, config.requests_burst, 1.0, share, at)
        self.tokens = _shared_bucket(config.tokens_per_s, config.tokens_burst, TOKENS_BURST_S, share,
                                     at + _BUCKET_FIELDS)
        self._share, self._column = share, len(share.workers) + slot

    @property
    def in_flight(self) -> int:
        return self._share.total(self._column)

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._share.add(self._column, value - self.in_flight)   # the change lands in this process's row


def _shared_bucket(rate: float | None, burst: float | None, burst_s: float, share: ProcessShare,
                   at: int) -> SharedBucket | None:
    if rate is None:
        return None
    return SharedBucket(rate, burst if burst is not None else max(1.0, rate * burst_s), share.buckets, at)


class SharedTenants(Tenants):
    """Tenants whose limits hold across processes: every check and settlement under the share's lock."""

    def __init__(self, configs: list[TenantConfig], now: float, share: ProcessShare) -> None:
        self._share = share
        super().__init__(configs, now)

    def _new_state(self, config: TenantConfig, now: float) -> _TenantState:
        return _SharedTenantState(config, self._share, self._share.tenants[config.name])

    def _locked(self) -> AbstractContextManager:
        return self._share.lock

    def peek(self, tenant: str, now: float) -> Admission | None:
        with self._locked():
            return super().peek(tenant, now)

    def in_flight(self, tenant: str) -> int:
        with self._locked():
            return super().in_flight(tenant)

    def admit(self, tenant: str, tokens: int, now: float) -> Admission:
        with self._locked():
            return super().admit(tenant, tokens, now)

    def release(self, admission: Admission, used_tokens: int, now: float) -> None:
        with self._locked():
            super().release(admission, used_tokens, now)

