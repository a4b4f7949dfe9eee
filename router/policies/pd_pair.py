"""Prefill/decode pairs for disaggregated pools, with conditional disaggregation.

The decode worker is chosen first (it holds the request for its whole decode, and under a KV-aware
inner policy it is where the prefix already lives). If the prompt tokens it lacks, per the KV index,
are fewer than `local_prefill_tokens`, shipping KV from a prefill worker costs more than it saves and
the decode worker prefills locally (as Dynamo's conditional disaggregation does); otherwise a prefill
worker is chosen from the prefill pool. "both" workers belong to both pools.
"""
from __future__ import annotations

from collections.abc import Sequence

from kvlab.wire.block_hash import DEFAULT_BLOCK_SIZE
from router.policies.base import Decision, NoWorkerAvailable, Policy, RouteRequest, WorkerView
from router.policies.kv_index import KvIndex

DEFAULT_LOCAL_PREFILL_TOKENS = 512  # a setting; calibrate with the roofline's prefill vs transfer times


class PdPair:
    name = "pd_pair"
    prompt_blocks: int | None = None   # the whole prompt: its uncached tokens choose local or remote prefill

    def __init__(self, prefill: Policy, decode: Policy, index: KvIndex | None = None,
                 local_prefill_tokens: int = DEFAULT_LOCAL_PREFILL_TOKENS,
                 block_size: int | None = None) -> None:
        self.prefill = prefill
        self.decode = decode
        self.index = index
        self.local_prefill_tokens = local_prefill_tokens
        # Matched blocks become tokens at the index's block size, the one the hashes were made with.
        self.block_size = block_size or (index.block_size if index else DEFAULT_BLOCK_SIZE)

    def add_worker(self, worker_id: str) -> None:
        self.prefill.add_worker(worker_id)
        self.decode.add_worker(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        self.prefill.remove_worker(worker_id)
        self.decode.remove_worker(worker_id)

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> Decision:
        decode = self.decode.choose(request, [w for w in workers if w.role != "prefill"])
        matched = decode.matched_blocks
        if matched is None:
            matched = self.index.match(request.blocks).get(decode.worker, 0) if self.index else 0
        uncached = max(0, request.prompt_tokens - matched * self.block_size)
        local = Decision(worker=decode.worker, policy=self.name, matched_blocks=matched,
                         overflow_skips=decode.overflow_skips, uncached_tokens=uncached)
        if uncached < self.local_prefill_tokens:
            return local
        try:
            prefill = self.prefill.choose(request, [w for w in workers if w.role != "decode"])
        except NoWorkerAvailable:
            return local  # no prefill worker alive: the decode worker can still prefill itself
        if prefill.worker == decode.worker:
            return local
        local.prefill_worker = prefill.worker
        local.overflow_skips += prefill.overflow_skips
        return local
