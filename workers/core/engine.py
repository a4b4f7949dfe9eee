"""The emulated engine: scheduler + KV blocks + roofline timing. Pure: time is an argument.

``step(now)`` schedules a batch, asks the roofline how long it takes on the configured GPU, advances
every scheduled request, and reports what happened. Drivers decide what "now" means: the asyncio
driver follows the wall clock, the simulator a virtual one.
"""
from __future__ import annotations

import math

import msgspec
import numpy as np

from emulator.engine_config import ROLES, EngineConfig
from emulator.physics import roofline, steptime
from emulator.physics.catalog import Link
from kvlab.wire.kv_events import KVEvent
from workers.core import output
from workers.core.block_manager import BlockManager, cache_computed_blocks
from workers.core.fast_forward import fast_forward
from workers.core.request import RemotePrefill, Request, SamplingParams, Status
from workers.core.scheduler import ScheduledChunk, Scheduler, SchedulerOutput


class EngineError(ValueError):
    """A request the engine can never serve (too long for the context or the whole KV pool)."""


class QueueFull(RuntimeError):
    """The bounded waiting queue is full; the caller should answer 503 and let the client retry."""


class Finished(msgspec.Struct, kw_only=True):
    request_id: str
    reason: str          # "length", "stop", "abort", or "held" (prefill role: KV awaits a pull)
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    host_cached_tokens: int = 0   # of cached_tokens, those onboarded from host memory


class StepResult(msgspec.Struct, kw_only=True):
    start: float
    duration: float                           # emulated seconds the GPU is busy (0: idle)
    bound: str = ""                           # "compute" or "memory"
    tokens: list[tuple[str, int]] = []        # (request id, token id) sampled this step
    finished: list[Finished] = []
    events: list[KVEvent] = []
    kv_ready: list[str] = []                  # decode role: requests whose remote KV arrived
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_s: float = 0.0                    # busy time attributed to prefill work
    decode_s: float = 0.0                     # busy time attributed to decode work
    preempted: int = 0
    decode_steps: int = 0                     # steps that decoded at least one sequence
    # The work itself, per GPU (roofline.step_traffic): over elapsed time and the datasheet peaks, MFU and MBU.
    flops: float = 0.0
    hbm_bytes: float = 0.0
    next_wakeup: float | None = None          # when idle: the next time something becomes ready
    steps: int = 1                            # engine steps in this result (merged: more than one)
    token_times: list[float] = []             # merged results: each token's own time (else all at end)

    @property
    def end(self) -> float:
        return self.start + self.duration


class _Merged:
    """Accumulates back-to-back steps into one StepResult with per-token times."""

    def __init__(self, first: StepResult):
        self.result = first
        if not first.token_times:
            first.token_times = [first.end] * len(first.tokens)

    def add(self, step: StepResult) -> None:
        r = self.result
        r.duration = step.end - r.start
        r.bound = step.bound
        r.tokens.extend(step.tokens)
        r.token_times.extend(step.token_times or [step.end] * len(step.tokens))
        r.finished, r.kv_ready = step.finished, step.kv_ready
        r.events.extend(step.events)
        r.prefill_tokens += step.prefill_tokens
        r.decode_tokens += step.decode_tokens
        r.prefill_s += step.prefill_s
        r.decode_s += step.decode_s
        r.preempted += step.preempted
        r.steps += step.steps
        r.decode_steps += step.decode_steps
        r.flops += step.flops
        r.hbm_bytes += step.hbm_bytes


def _batch_shapes(chunks: list[ScheduledChunk]) -> tuple[roofline.BatchShape, roofline.BatchShape]:
    """The step's BatchShape and that of its decodes alone (chunks past the prompt), in one pass.

    BatchShape.add's sums, in local ints: this runs per sequence of every step. A decode counts as
    sampled in its own shape (as a decode-only step would sample it); in the whole step's shape a
    chunk samples when it reaches the end of its tokens."""
    prefill_new = prefill_context = prefill_pairs = 0
    decode_new = decode_context = decode_pairs = decodes = sampled = 0
    for chunk in chunks:
        req, n = chunk.request, chunk.num_new
        computed = req.num_computed
        pairs = n * computed + n * (n + 1) // 2   # deployment.causal_pairs(n, computed), without the call
        if computed + n >= len(req.tokens):
            sampled += 1
        if computed < req.num_prompt:
            prefill_new += n
            prefill_context += computed
            prefill_pairs += pairs
        else:
            decode_new += n
            decode_context += computed
            decode_pairs += pairs
            decodes += 1
    whole = roofline.BatchShape(new_tokens=prefill_new + decode_new, context_tokens=prefill_context + decode_context,
                                attention_pairs=prefill_pairs + decode_pairs, sampled=sampled)
    return whole, roofline.BatchShape(new_tokens=decode_new, context_tokens=decode_context,
                                      attention_pairs=decode_pairs, sampled=decodes)


class Engine:
    def __init__(self, deployment: roofline.Deployment, config: EngineConfig | None = None,
                 kv_link: Link | None = None, swap_link: Link | None = None):
        self.dep = deployment
        self.config = config or EngineConfig()
        if self.config.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        self.kv_link = kv_link        # decode role: where remote KV comes from
        self.swap_link = swap_link    # host <-> GPU copies: swap preemption and the host KV tier
        if self.config.host_kv_gb and swap_link is None:
            raise ValueError("a host KV tier needs the host link (swap_link)")
        self.max_model_len = self.config.max_model_len or deployment.model.max_context
        self.kv_per_token_gpu = roofline.kv_bytes_per_token_per_gpu(deployment)
        self.blocks = BlockManager(self._pool_blocks(), self.config.block_size, self.config.eviction,
                                   host_blocks=self._host_blocks())
        self.scheduler = Scheduler(self.config, self.blocks)
        self.requests: dict[str, Request] = {}
        self.held: dict[str, float] = {}     # prefill role: request id -> hold expiry
        self._link_free_at = 0.0             # decode role: transfers share one NIC per GPU, in order
        self._host_link_free_at = 0.0        # host tier: onboarding loads share the host link, in order
        # Each step's FLOPs and HBM bytes (roofline.step_traffic), the worker's MFU and MBU; a driver that
        # reads neither (the simulator) turns this off and the results carry zeros there.
        self.count_traffic = True

    def _pool_blocks(self) -> int:
        if self.config.num_blocks is not None:
            return self.config.num_blocks
        tokens = roofline.kv_capacity_tokens(self.dep, self.config.gpu_memory_utilization,
                                             self.config.activation_reserve_gb)
        if tokens < self.config.block_size:
            raise EngineError(f"{self.dep.model.name} does not fit on {self.dep.tp} x {self.dep.gpu.name}: "
                              "no HBM is left for the KV cache")
        return tokens // self.config.block_size

    def _host_blocks(self) -> int:
        """Blocks host memory holds: each GPU of the TP group keeps its own shard there."""
        per_block = self.config.block_size * self.kv_per_token_gpu * self.dep.tp
        return int(self.config.host_kv_gb * 1e9 // per_block)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int] | np.ndarray, params: SamplingParams, now: float,
                    priority: int = 0, salt: str | None = None, remote: RemotePrefill | None = None) -> Request:
        self._validate(prompt, params)
        if remote is not None and params.max_tokens < 2:
            raise EngineError("a remote-prefill request needs max_tokens >= 2: its first token came from "
                              "the prefill worker")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
        if params.eos_probability == 0.0 and self.config.eos_probability:
            params.eos_probability = self.config.eos_probability
        req = Request(request_id, prompt, params, now, priority, salt, remote)
        if remote is not None:
            req.tokens.append(remote.first_token)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def _validate(self, prompt: list[int] | np.ndarray, params: SamplingParams) -> None:
        if len(prompt) == 0:
            raise EngineError("the prompt is empty")
        if params.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1 (got {params.max_tokens})")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise EngineError(f"this model's maximum context length is {self.max_model_len} tokens; "
                              f"the request needs {len(prompt)} prompt + {params.max_tokens} output tokens")
        if math.ceil(total / self.blocks.block_size) > self.blocks.num_blocks:
            raise EngineError(f"the request needs {total} tokens of KV but the pool holds "
                              f"{self.blocks.num_blocks * self.blocks.block_size}")

    def abort(self, request_id: str) -> bool:
        """Stop a request (client gone) and free its blocks. False if it is unknown or done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req)
        self.held.pop(request_id, None)
        self._release_blocks(req)
        req.status = Status.FINISHED
        req.finish_reason = "abort"
        return True

    def release(self, request_id: str) -> bool:
        """Prefill role: a decode worker has pulled this request's KV; drop our hold."""
        if request_id not in self.held:
            return False
        return self.abort(request_id)

    def kv_transfer_bytes(self, req: Request) -> float:
        """Per-GPU bytes of the prompt's KV the decode worker lacks (one NIC per GPU, in parallel)."""
        lacking = max(0, req.num_prompt - req.num_cached_prompt)
        return lacking * self.kv_per_token_gpu

    # -- the step ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self, now: float, until: float | None = None, quiet_events: bool = False) -> StepResult:
        """One engine step starting at `now`.

        With `until`, back-to-back steps are merged into one result while nothing outside the engine
        could tell the difference: no request finished, no remote KV arrived, no KV event (unless
        `quiet_events`: the caller ignores them) and the next step starts before `until`, the caller's
        next outside event. A discrete-event driver uses this to skip per-step overhead; the numbers
        are those of single steps (token_times keeps each token's own time).
        """
        result = self._single_step(now) if until is None else self._fast_or_single(now, until, quiet_events)
        if until is None or result.duration == 0.0:
            return result
        merged = _Merged(result)
        while self._can_merge(result, quiet_events) and result.end < until:
            result = self._fast_or_single(result.end, until, quiet_events)
            if result.duration == 0.0:
                break   # unreachable with the guards in _can_merge; kept so a merge never hides idling
            merged.add(result)
        return merged.result

    def _fast_or_single(self, now: float, until: float, quiet_events: bool) -> StepResult:
        run = fast_forward(self, now, until) if quiet_events else None
        return run if run is not None else self._single_step(now)

    def _can_merge(self, result: StepResult, quiet_events: bool) -> bool:
        visible = result.finished or result.kv_ready or (result.events and not quiet_events)
        return not visible and not self.scheduler.receiving and not self.held and self.has_work()

    def _single_step(self, now: float) -> StepResult:
        self._expire_holds(now)
        sched = self.scheduler.schedule(now)
        self._start_transfers(now)
        if not sched.chunks:
            return StepResult(start=now, duration=0.0, events=self.blocks.take_events(),
                              kv_ready=[r.request_id for r in sched.kv_ready],
                              next_wakeup=self._next_wakeup(), preempted=len(sched.preempted))
        return self._execute(now, sched)

    def _execute(self, now: float, sched: SchedulerOutput) -> StepResult:
        shape, decodes = _batch_shapes(sched.chunks)
        timing = steptime.step_time(self.dep, shape)
        flops, hbm_bytes = roofline.step_traffic(self.dep, shape) if self.count_traffic else (0.0, 0.0)
        duration = timing.seconds + self._swap_time(sched)
        decode_tokens = decodes.new_tokens
        prefill_tokens = shape.new_tokens - decode_tokens
        decode_s = self._decode_share(decodes, duration) if prefill_tokens else duration
        result = StepResult(start=now, duration=duration, bound=timing.bound, tokens=[], finished=[],
                            prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                            prefill_s=duration - decode_s, decode_s=decode_s, decode_steps=int(decode_tokens > 0),
                            flops=flops, hbm_bytes=hbm_bytes,
                            preempted=len(sched.preempted), kv_ready=[r.request_id for r in sched.kv_ready])
        self._advance_all(sched.chunks, now + duration, result)
        result.events = self.blocks.take_events()
        return result

    def _decode_share(self, decodes: roofline.BatchShape, duration: float) -> float:
        """Busy time of a mixed step attributed to decode: what its decodes alone would take."""
        return min(steptime.step_time(self.dep, decodes).seconds, duration) if decodes.new_tokens else 0.0

    def _advance_all(self, chunks: list[ScheduledChunk], end: float, result: StepResult) -> None:
        """Advance every scheduled chunk, in batch order: its KV is computed, full blocks enter the prefix
        cache, and a chunk that reaches the end of its tokens samples the next one (and may finish).
        Per token of every running sequence, so what each iteration reads is bound once here."""
        blocks = self.blocks
        block_size = blocks.block_size
        caching = self.config.enable_prefix_caching
        prefill_role = self.config.role == "prefill"
        max_len = self.max_model_len
        sampled = result.tokens
        sample = output.sample
        for chunk in chunks:
            req = chunk.request
            computed = req.num_computed + chunk.num_new
            req.num_computed = computed
            # the prefix-cache call only when a block has filled up
            if caching and computed // block_size > req.num_cached_blocks:
                cache_computed_blocks(blocks, req)
            tokens = req.tokens
            length = len(tokens)
            if computed < length:
                continue  # a prefill chunk that did not reach the end of the prompt
            token, reason = sample(req)
            tokens.append(token)
            sampled.append((req.request_id, token))
            if req.first_token_time is None:
                req.first_token_time = end
            if reason is None and length + 1 >= max_len:   # len(tokens), with the new token
                reason = "length"
            if prefill_role and reason != "stop":
                reason = "held"  # the first token is ours; the rest is the decode worker's
            if reason is not None:
                self._finish(req, reason, end, result)

    def _finish(self, req: Request, reason: str, end: float, result: StepResult) -> None:
        self.scheduler.running.remove(req)
        req.finish_reason = reason
        if reason == "held":
            req.status = Status.HELD
            self.held[req.request_id] = end + self.config.hold_timeout_s
        else:
            req.status = Status.FINISHED
            self._release_blocks(req)
            del self.requests[req.request_id]
        result.finished.append(Finished(request_id=req.request_id, reason=reason, prompt_tokens=req.num_prompt,
                                        output_tokens=req.num_output, cached_tokens=req.num_cached_prompt,
                                        host_cached_tokens=req.num_onboarded))

    def _release_blocks(self, req: Request) -> None:
        if req.block_ids:
            self.blocks.free(req.block_ids)
            req.block_ids = []

    # -- time-dependent bookkeeping ----------------------------------------------------------
    def _start_transfers(self, now: float) -> None:
        """KV for newly admitted requests starts crossing its link, one at a time per link: remote KV
        (decode role) over the KV link, host-held blocks (host tier) over the host link."""
        for req in self.scheduler.receiving:
            if req.kv_ready_at is not None:
                continue
            if req.remote is None:
                self._start_onboarding(req, now)
                continue
            start = max(now, self._link_free_at)
            seconds = roofline.kv_transfer_time(self.kv_transfer_bytes(req), self.kv_link) if self.kv_link else 0.0
            req.kv_ready_at = start + seconds
            self._link_free_at = req.kv_ready_at
            req.num_computed = req.num_prompt

    def _start_onboarding(self, req: Request, now: float) -> None:
        assert self.swap_link is not None, "host-held blocks exist only with a host link"
        start = max(now, self._host_link_free_at)
        req.kv_ready_at = start + steptime.host_onboard_time(self.dep, req.loading_tokens, self.swap_link)
        self._host_link_free_at = req.kv_ready_at

    def _swap_time(self, sched: SchedulerOutput) -> float:
        tokens = sched.swapped_out_tokens + sched.swapped_in_tokens
        if not tokens or self.swap_link is None:
            return 0.0
        return roofline.kv_transfer_time(tokens * self.kv_per_token_gpu, self.swap_link)

    def _expire_holds(self, now: float) -> None:
        if not self.held:
            return
        for request_id in [r for r, expiry in self.held.items() if expiry <= now]:
            self.abort(request_id)

    def _next_wakeup(self) -> float | None:
        times = [r.kv_ready_at for r in self.scheduler.receiving if r.kv_ready_at is not None]
        times += list(self.held.values())
        return min(times) if times else None

    # -- state for metrics and routers -------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.receiving)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
