"""Iteration-level continuous batching with chunked prefill (vLLM V1 style).

Each step: running requests first (one token for a decode, a chunk for an unfinished prefill),
then waiting requests FCFS (or by priority) while the token budget, the sequence cap and free KV
blocks allow. When a running request cannot get a block, the lowest-priority running request is
preempted (recompute: drop its KV; swap: copy it to host memory) and resumes before new requests.
"""
from __future__ import annotations

import bisect
import math

import msgspec

from emulator.engine_config import EngineConfig
from workers.core.block_manager import BlockManager
from workers.core.request import Request, Status


class ScheduledChunk(msgspec.Struct):
    request: Request
    num_new: int


class SchedulerOutput(msgspec.Struct, kw_only=True):
    chunks: list[ScheduledChunk]
    preempted: list[Request]
    swapped_out_tokens: int = 0   # KV tokens copied to host this step (swap preemption)
    swapped_in_tokens: int = 0    # KV tokens copied back
    kv_ready: list[Request] = []  # decode role: requests whose remote KV arrived


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.receiving: list[Request] = []   # decode role: KV in flight
        self.preemptions = 0

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        if self.config.scheduling_policy == "priority":
            keys = [(r.priority, r.arrival) for r in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, (req.priority, req.arrival)), req)
        else:
            self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.receiving)

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput(chunks=[], preempted=[])
        self._collect_arrived_kv(now, out)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    # -- running -----------------------------------------------------------------------------
    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        block = self.blocks.block_size
        running, append = self.running, out.chunks.append
        count = len(running)   # _grow's preemptions shorten `running`: read again after each call
        while i < count and budget > 0:
            req = running[i]
            computed = req.num_computed
            num_new = len(req.tokens) - computed
            if num_new > budget:   # min(), without the call: this loop runs per sequence of every step
                num_new = budget
            # most steps a decode stays inside its last block: no call to _grow for it
            if -(-(computed + num_new) // block) > len(req.block_ids):
                grown = self._grow(req, computed + num_new, out)
                count = len(running)
                if not grown:
                    if req.status is Status.PREEMPTED:
                        break  # it preempted itself: nothing lower-priority was left
                    continue
            append(ScheduledChunk(req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _grow(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give `req` blocks for `num_tokens`, preempting from the back of the batch if needed."""
        need = -(-num_tokens // self.blocks.block_size) - len(req.block_ids)
        while need > 0:
            new = self.blocks.allocate(need)
            if new is not None:
                req.block_ids.extend(new)
                return True
            victim = self._victim()
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def _victim(self) -> Request:
        return self.running[-1]  # running is kept in priority order: the back is the lowest

    def _enter_running(self, req: Request) -> None:
        req.status = Status.RUNNING
        if self.config.scheduling_policy == "priority":
            keys = [(r.priority, r.arrival) for r in self.running]
            self.running.insert(bisect.bisect_right(keys, (req.priority, req.arrival)), req)
        else:
            self.running.append(req)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        if self.config.preemption == "swap":
            out.swapped_out_tokens += req.num_computed
            req.swapped = True
        else:
            req.num_computed = 0
            req.num_cached_blocks = 0
        self.blocks.free(req.block_ids)
        req.block_ids = []
        req.status = Status.PREEMPTED
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.insert(0, req)  # preempted requests resume first
        out.preempted.append(req)

    # -- waiting -----------------------------------------------------------------------------
    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and self._seqs() < self.config.max_num_seqs:
            req = self.waiting[0]
            num_new = self._admit(req, budget, out)
            if num_new is None:
                break  # head of line does not fit: FCFS keeps order
            self.waiting.pop(0)
            if req.status is Status.WAITING_FOR_KV:
                continue
            self._enter_running(req)
            out.chunks.append(ScheduledChunk(req, num_new))
            budget -= num_new

    def _seqs(self) -> int:
        return len(self.running) + len(self.receiving)

    def _admit(self, req: Request, budget: int, out: SchedulerOutput) -> int | None:
        """Allocate blocks for the request's first chunk; None if the pool cannot hold it."""
        if req.swapped:
            return self._admit_swapped(req, budget, out)
        if req.remote is not None and req.kv_ready_at is None:
            return self._admit_remote(req)
        # A hit may cover at most num_tokens - 1 tokens: the last one must run to give logits.
        usable = (req.num_tokens - 1) // self.block_size
        hit_ids = self._cached_ids(req.hashes[:usable])
        gpu_hit = len(hit_ids)
        host_hit = self.blocks.host_prefix_length(req.hashes[gpu_hit:usable])   # continues the GPU prefix
        computed = (gpu_hit + host_hit) * self.block_size
        num_new = min(req.num_tokens - computed, budget)
        need = self._blocks_for(computed + num_new) - gpu_hit
        if need > self.blocks.num_free - self._evictable_among(hit_ids):
            return None
        req.block_ids = self.blocks.acquire_cached(req.hashes[:gpu_hit], req.num_tokens)
        if host_hit:
            req.block_ids.extend(self._onboard(req, gpu_hit, host_hit))
        req.block_ids.extend(self._allocate_checked(need - host_hit))
        req.num_computed = computed
        req.num_cached_blocks = gpu_hit + host_hit
        if req.preemptions == 0:
            req.num_cached_prompt = computed
            req.num_onboarded = host_hit * self.block_size
        if host_hit:   # the prefill waits for its blocks, outside the batch (vLLM: WAITING_FOR_REMOTE_KVS)
            req.loading_tokens = host_hit * self.block_size
            req.kv_ready_at = None
            req.status = Status.WAITING_FOR_KV
            self.receiving.append(req)
            return 0
        return num_new

    def _onboard(self, req: Request, start: int, count: int) -> list[int]:
        """GPU blocks for the `count` host-held blocks after the first `start`, moved into the GPU cache."""
        bs = self.block_size
        ids = self.blocks.onboard(req.hashes[start:start + count], req.hashes[start - 1] if start else None,
                                  req.tokens[start * bs:(start + count) * bs])
        assert ids is not None, "onboarding after a capacity check failed"
        return ids

    def _allocate_checked(self, count: int) -> list[int]:
        """`count` blocks that the caller already checked the pool can supply."""
        ids = self.blocks.allocate(count)
        assert ids is not None, "allocation after a capacity check failed"
        return ids

    def _admit_swapped(self, req: Request, budget: int, out: SchedulerOutput) -> int | None:
        num_new = min(req.num_tokens - req.num_computed, budget)
        new = self.blocks.allocate(self._blocks_for(req.num_computed + num_new))
        if new is None:
            return None
        req.block_ids = new
        req.swapped = False
        out.swapped_in_tokens += req.num_computed
        return num_new

    def _admit_remote(self, req: Request) -> int | None:
        """Decode role: hold blocks for the prompt and the first token; the KV arrives later."""
        hit_ids = self._cached_ids(req.hashes)
        need = self._blocks_for(req.num_prompt + 1) - len(hit_ids)
        if need > self.blocks.num_free - self._evictable_among(hit_ids):
            return None
        req.block_ids = self.blocks.acquire_cached(req.hashes[:len(hit_ids)], req.num_prompt)
        req.block_ids.extend(self._allocate_checked(need))
        req.num_cached_prompt = len(hit_ids) * self.block_size
        req.num_cached_blocks = len(hit_ids)
        req.status = Status.WAITING_FOR_KV
        self.receiving.append(req)
        return 0

    def _collect_arrived_kv(self, now: float, out: SchedulerOutput) -> None:
        arrived = [r for r in self.receiving if r.kv_ready_at is not None and r.kv_ready_at <= now]
        for req in arrived:
            self.receiving.remove(req)
            self._enter_running(req)
            out.kv_ready.append(req)

    # -- helpers -----------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def _cached_ids(self, hashes) -> list[int]:
        n = self.blocks.cached_prefix_length(hashes)
        return [self.blocks.block_of(h) for h in hashes[:n]]

    def _evictable_among(self, block_ids: list[int]) -> int:
        """Cached blocks that count as free now but stop being free once this request holds them."""
        return sum(1 for b in block_ids if self.blocks.blocks[b].ref_count == 0)

    def remove(self, req: Request) -> None:
        for queue in (self.waiting, self.running, self.receiving):
            if req in queue:
                queue.remove(req)
