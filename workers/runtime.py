"""One running worker: the engine, its real-time driver, and everything fed by its steps.

``WorkerRuntime`` is what the HTTP layer talks to. It owns the driver task, submits and aborts
requests, and on every ``StepResult`` updates the metrics, appends KV events to the log (and so to
the ZMQ publisher), tells prefill workers when their KV has landed here, and frees the KV of
prefill-role requests that nobody asked to hand over.
"""
from __future__ import annotations

import asyncio
import logging

from emulator.physics.catalog import Catalog
from kvlab.wire.tokenizer import load_tokenizer
from workers.config import WorkerConfig, build_engine
from workers.core.engine import StepResult
from workers.core.request import SamplingParams
from workers.driver import EngineDriver, RequestStream
from workers.handoff import Handoff, KvReleaser, RemoteSource
from workers.kv_publisher import KvEventLog, ZmqKvPublisher
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class WorkerRuntime:
    def __init__(self, cfg: WorkerConfig, catalog: Catalog | None = None):
        self.cfg = cfg
        self.engine = build_engine(cfg, catalog)
        self.driver = EngineDriver(self.engine, cfg.time_scale)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.metrics = WorkerMetrics(self.engine, cfg.model_name, cfg.time_scale)
        self.events = KvEventLog(cfg.kv_events_buffer)
        self.releaser = KvReleaser(cfg.release_timeout_s)
        self.publisher: ZmqKvPublisher | None = None
        self._sources: dict[str, RemoteSource] = {}   # decode role: KV still in flight from these
        self._handoffs: set[str] = set()               # prefill role: hold these for a decode worker
        self._task: asyncio.Task | None = None
        self.driver.step_hooks.append(self._on_step)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self.cfg.role == "decode":
            self.releaser.open()
        if self.cfg.kv_events_endpoint:
            self.publisher = ZmqKvPublisher(self.events, self.cfg.kv_events_endpoint,
                                            self.cfg.kv_events_replay_endpoint, self.cfg.kv_events_topic)
            self.publisher.start()
        # Our own task rather than driver.start(), so a crashed engine loop is noticed (see _died).
        self._task = asyncio.get_running_loop().create_task(self.driver.run(), name="engine-driver")
        self._task.add_done_callback(self._died)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.publisher is not None:
            await self.publisher.close()
        await self.releaser.aclose()

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    def _died(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        log.error("engine driver stopped: %r", task.exception(), exc_info=task.exception())
        for request_id in list(self.engine.requests):
            self.driver.abort(request_id)   # fail every open request rather than leave it hanging

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, handoff: Handoff,
               priority: int = 0, salt: str | None = None) -> RequestStream:
        """Raises EngineError (never servable) or QueueFull, before anything is recorded."""
        stream = self.driver.submit(request_id, prompt, params, priority, salt, handoff.remote)
        self.metrics.track(request_id, self.engine.requests[request_id].arrival, len(prompt))
        if handoff.source is not None:
            self._sources[request_id] = handoff.source
        if handoff.remote_decode:
            self._handoffs.add(request_id)
        return stream

    def abort(self, request_id: str) -> None:
        """The client is gone: free the request's blocks (held KV included)."""
        self.driver.abort(request_id)
        self.metrics.aborted(request_id)
        self._handoffs.discard(request_id)
        source = self._sources.pop(request_id, None)
        if source is not None:
            self.releaser.release(source)   # the prefill worker need not hold KV nobody will use

    def release(self, request_id: str) -> bool:
        """Prefill role: a decode worker has the KV of this held request."""
        released = self.engine.release(request_id)
        if released:
            self.driver.wake()   # freed blocks may admit a waiting request now
        return released

    # -- every step --------------------------------------------------------------------------
    def _on_step(self, result: StepResult) -> None:
        try:
            lag = self.driver.lag.last if result.duration > 0 else None
            self.metrics.on_step(result, lag)
            if result.events:
                self.events.append(result.events)
            for request_id in result.kv_ready:
                source = self._sources.pop(request_id, None)
                if source is not None:
                    self.releaser.release(source)
            for fin in result.finished:
                self._finished(fin.request_id, fin.reason)
        except Exception:  # a hook must never kill the engine loop
            log.exception("step hook failed")

    def _finished(self, request_id: str, reason: str) -> None:
        self._sources.pop(request_id, None)
        if reason == "held" and request_id not in self._handoffs:
            self.engine.release(request_id)   # a plain request on a prefill worker: nothing to hand over
        self._handoffs.discard(request_id)

    # -- state for routers -------------------------------------------------------------------
    def kv_snapshot(self) -> dict:
        """The prefix cache's whole content as of event sequence `seq`: a router applies it, then the
        batches from `seq` on. Events not yet in the log are appended first, so none is counted twice."""
        pending = self.engine.blocks.take_events()
        if pending:
            self.events.append(pending)
        return {"seq": self.events.next_seq, "block_size": self.engine.blocks.block_size,
                "block_hashes": self.engine.blocks.cached_hashes(),
                "host_block_hashes": self.engine.blocks.host_hashes()}

    def load(self) -> dict:
        eng, blocks, cfg = self.engine, self.engine.blocks, self.cfg
        return {
            "worker_id": cfg.worker_id, "role": cfg.role, "model": cfg.model_name, "healthy": self.healthy,
            "running": eng.num_running, "waiting": eng.num_waiting, "held": len(eng.held),
            "kv_usage": blocks.usage, "num_blocks": blocks.num_blocks, "free_blocks": blocks.num_free,
            "block_size": blocks.block_size,
            "prefix_cache_queries": blocks.prefix_queries, "prefix_cache_hits": blocks.prefix_hits,
            "host_cache_hits": blocks.host_hits,
            "preemptions": eng.scheduler.preemptions,
            "busy_prefill_s": self.metrics.busy_prefill_s, "busy_decode_s": self.metrics.busy_decode_s,
            "engine_steps": self.metrics.steps, **self.metrics.roofline_figures(),
            "max_num_seqs": eng.scheduler.config.max_num_seqs,
            "lag_p99_s": self.driver.lag.p99(), "lag_max_s": self.driver.lag.max,
            "time_scale": self.driver.time_scale, "emulated_now_s": self.driver.emulated_now(),
            "max_model_len": eng.max_model_len,
            "kv_events_endpoint": cfg.kv_events_endpoint, "kv_events_next_seq": self.events.next_seq,
        }
