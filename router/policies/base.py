"""The small interface every routing policy implements: plain data in, a decision out, no I/O.

The caller (HTTP router or simulator) owns the worker snapshots and the in-flight counts:
after ``choose`` it adds 1 to ``in_flight`` of each worker in ``Decision.charged`` and subtracts 1 when
that worker's part of the request ends. Load-aware policies read those counts on the next call.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec
import numpy as np
import xxhash

from emulator.engine_config import Role
from kvlab.wire.block_hash import DEFAULT_BLOCK_SIZE, BlockHash, root_hash, token_bytes
from router.policies.hash_memo import BlockHashMemo
from router.policies.lazy_hashes import LazyBlockHashes


class NoWorkerAvailable(RuntimeError):
    """No healthy worker can take the request (the HTTP layer answers 503)."""


class WorkerView(msgspec.Struct):
    """A snapshot of one worker as the router sees it; mutable so the caller can update it in place."""
    id: str
    role: Role = "both"
    healthy: bool = True
    in_flight: int = 0      # requests the router has sent and not yet seen finish (fresh, router-side)
    running: int = 0        # engine-reported, from the last metrics scrape (stale by up to one scrape)
    waiting: int = 0
    kv_usage: float = 0.0   # engine-reported fraction of KV blocks in use, 0..1
    queued: int = 0         # its waiting requests now, as the load shedder counts them (router: the last
                            # /load plus the router's traffic since; simulator: the engine's own count)
    # Router-side, kept by router.policies.slo_ledger for slo_aware: requests sent here that have not
    # produced a first token, their prompt tokens left to compute and predicted marginal prefill
    # seconds; the prompt tokens of those past their first token (the decode batch's context); and
    # the rate prefill tokens have lately been sent here; and how long ago a step ended there (a first
    # token it produced, or its first step after idling; None: not seen).
    prefill_queue: int = 0
    prefill_queue_tokens: int = 0
    prefill_queue_s: float = 0.0
    decode_context_tokens: int = 0
    prefill_rate: float = 0.0   # prefill tokens per (emulated) second lately sent here
    step_age_s: float | None = None   # emulated seconds since the last step end the router saw there


class RouteRequest(msgspec.Struct):
    """What a policy may look at: the prompt's block hashes (lazy or a plain list) and its size."""
    blocks: Sequence[BlockHash]
    prompt_tokens: int
    policy: str | None = None   # per-request override of the policy name (experiments)
    short_key: int = 0          # ring key for prompts with no full block: hash of their partial block
    slo_ttft_s: float | None = None   # SLOs the request states (x-slo-ttft-ms / x-slo-tpot-ms); slo_aware
    slo_tpot_s: float | None = None   # refuses a request no worker is predicted to meet

    @classmethod
    def from_tokens(cls, tokens: Sequence[int] | np.ndarray, *, block_size: int = DEFAULT_BLOCK_SIZE,
                    salt: str | None = None, policy: str | None = None,
                    memo: BlockHashMemo | None = None) -> RouteRequest:
        blocks = LazyBlockHashes(tokens, block_size, salt, memo=memo)
        short = 0
        if len(blocks) == 0 and len(tokens):
            short = xxhash.xxh3_64_intdigest(token_bytes(tokens), root_hash(salt))
        return cls(blocks=blocks, prompt_tokens=len(tokens), policy=policy, short_key=short)


class Decision(msgspec.Struct):
    """Where a request goes, and why (fields for logs, metrics and the dashboard)."""
    worker: str                          # serves the request (the decode worker under P/D)
    policy: str
    prefill_worker: str | None = None    # P/D only: prefills remotely there; None means prefill on `worker`
    matched_blocks: int | None = None    # cached prefix blocks on `worker` per the KV index; None: unknown
    overflow_skips: int = 0              # bounded-load: workers passed over because they were at the cap
    score: float | None = None           # kv_aware: the winning score
    uncached_tokens: int | None = None   # P/D: prompt tokens the decode worker lacks
    predicted_ttft_s: float | None = None   # slo_aware: its predictions on `worker`
    predicted_itl_s: float | None = None
    prefill_work_s: float | None = None     # slo_aware: marginal prefill seconds it adds to `worker`'s queue
    prefill_tokens: int | None = None       # slo_aware: prompt tokens `worker` must compute
    line_full: str | None = None            # the policy's choice, passed over because its line was full

    @property
    def charged(self) -> tuple[str, ...]:
        """Workers whose in_flight the caller must increment now (and decrement when each part ends)."""
        if self.prefill_worker is None or self.prefill_worker == self.worker:
            return (self.worker,)
        return (self.worker, self.prefill_worker)


class Policy(Protocol):
    name: str
    # Leading blocks of the prompt that ``choose`` reads (None: all, as far as the KV index matches);
    # the router tokenizes only that much of a prompt (router.frontdoor.intake).
    prompt_blocks: int | None

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision: ...

    def add_worker(self, worker_id: str) -> None: ...

    def remove_worker(self, worker_id: str) -> None: ...


class StatelessPolicy:
    """Base for policies that keep no per-worker state: membership hooks do nothing."""
    name = "stateless"
    prompt_blocks: int | None = None

    def add_worker(self, worker_id: str) -> None:
        pass

    def remove_worker(self, worker_id: str) -> None:
        pass


def healthy(workers: Sequence[WorkerView]) -> list[WorkerView]:
    """The workers a policy may pick; raises when there are none."""
    alive = [w for w in workers if w.healthy]
    if not alive:
        raise NoWorkerAvailable("no healthy worker")
    return alive


def prefix_key(request: RouteRequest, prefix_blocks: int) -> int:
    """Ring key: the chained hash of the first `prefix_blocks` blocks, which already covers the whole
    prefix; shorter prompts key on the blocks they have, block-less prompts on their partial block."""
    n = len(request.blocks)
    if n == 0:
        return request.short_key
    return request.blocks[min(prefix_blocks, n) - 1]


def rendezvous(key: int, worker_id: str) -> int:
    """Deterministic per-(key, worker) weight: breaks ties the same way for the same prefix."""
    return xxhash.xxh3_64_intdigest(worker_id.encode(), key)
