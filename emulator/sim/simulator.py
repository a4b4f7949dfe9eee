"""Discrete-event simulator: the live cluster's engines and routing policy under a virtual clock.

Every worker is the same pure ``workers.core.engine.Engine`` the HTTP workers run, and routing is the same
``router.policies`` object the HTTP router holds; only the clock differs. A worker's step runs at
its start time and its results (tokens, finished requests, KV events) take effect at its end, exactly
as the asyncio driver delivers them, so the live cluster and the simulator give the same numbers.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable

import msgspec

from emulator.engine_config import Role
from emulator.sim.report import LatencyLog, Summary
from emulator.spec import ClusterSpec
from kvlab.wire.kv_events import KVEventBatch
from kvlab.wire.openai_api import PRIORITY_CLASSES
from router.config import shedding_config, tenant_configs
from router.frontdoor.admission import Admission
from router.frontdoor.gate import DrainLimit
from router.frontdoor.tenants import Tenants
from router.policies import routing
from router.policies.base import Decision, NoWorkerAvailable, RouteRequest, WorkerView
from router.policies.hash_memo import BlockHashMemo
from router.policies.kv_index import KvIndex
from router.policies.registry import NEEDS_TABLE, PolicySet, host_credit
from router.policies.routing import Lease
from router.policies.slo_ledger import PrefillLedger
from router.policies.slo_table import from_spec as slo_table
from workers.core.engine import EngineError, QueueFull, StepResult
from workers.core.request import RemotePrefill, SamplingParams
from workers.spec_config import spec_engine

INDEX_POLICIES = ("kv_aware", "pd_pair", "prefix_bounded", "slo_aware")


class SimRequest(msgspec.Struct, kw_only=True):
    """What the simulator needs of a request (emulator.workload.Request and trace requests fit)."""
    request_id: str
    arrival_s: float
    tokens: object        # prompt token ids (list or int32 array)
    max_tokens: int
    tenant: str = "default"


class SimWorker:
    __slots__ = ("id", "role", "engine", "view", "scheduled", "routed", "busy_prefill", "busy_decode",
                 "usage_time", "steps")

    def __init__(self, worker_id: str, role: Role, engine):
        self.id = worker_id
        self.role = role
        self.engine = engine
        self.view = WorkerView(id=worker_id, role=role)
        self.scheduled = False   # a step or wake-up event is pending
        self.routed = 0
        self.busy_prefill = 0.0
        self.busy_decode = 0.0
        self.usage_time = 0.0    # integral of KV usage over busy time
        self.steps = 0

    def charge(self) -> None:   # routing.Lease: the router-side in-flight count the policies read
        self.view.in_flight += 1

    def release(self) -> None:
        self.view.in_flight -= 1


class Simulator:
    def __init__(self, spec: ClusterSpec, policy: str | None = None, settings: dict | None = None,
                 num_blocks: int | None = None, merge_steps: bool = True):
        self.spec = spec
        name = policy or spec.router.policy
        opts = settings if settings is not None else (dict(spec.router.settings) if name == spec.router.policy else {})
        self.block_size = spec.engine.block_size
        index = KvIndex(block_size=self.block_size, host_credit=host_credit(spec))
        self.policies = PolicySet(name, {name: opts}, index, slo_table(spec) if name in NEEDS_TABLE else None)
        self.ledger = PrefillLedger()   # slo_aware's queue figures, as the HTTP router keeps them
        self.ttft_predictions: list[tuple[float, float]] = []   # (predicted, actual) TTFT per request
        self.hash_memo = BlockHashMemo(self.block_size)   # as the router: repeated prefixes are looked up
        self._feed_index = name in INDEX_POLICIES   # others never read the KV index: skip its upkeep
        self.workers: dict[str, SimWorker] = {}
        for slot in spec.worker_list():
            engine = spec_engine(spec, slot.id, num_blocks)
            engine.count_traffic = False   # MFU and MBU are the live worker's metrics: no step here reads them
            self.workers[slot.id] = SimWorker(slot.id, slot.role, engine)
            self.policies.add_worker(slot.id)
        self._views = [w.view for w in self.workers.values()]
        self.salts = {t.name: t.name for t in spec.tenants if t.cache_salt}
        self.priorities = {t.name: PRIORITY_CLASSES[t.priority] for t in spec.tenants}   # as the router forces
        self.tenants = Tenants(tenant_configs(spec))   # the router's own limits, on the simulated clock
        self._tickets: dict[str, Admission] = {}       # admitted requests of a tenant, until they end
        shedding = shedding_config(spec, time_scale=1.0)  # the router's shedder, on the emulated clock
        prefilling = sum(1 for w in self.workers.values() if w.role != "decode")
        self.shedder = DrainLimit(shedding, lambda: prefilling, 0.0) if shedding.enabled else None
        self.line = self.shedder.line() if self.shedder is not None else None   # as the router's proxy keeps
        self._priority: dict[str, int] = {}   # requests of a non-zero priority class, until they finish
        self.log = LatencyLog()
        self._events: list = []
        self._seq = itertools.count()
        self._pending_decode: dict[str, tuple[str, SamplingParams, list[int], str | None]] = {}
        self._prefill_of: dict[str, str] = {}   # P/D: request -> prefill worker holding its KV
        self._remote_prefilled: set[str] = set()   # P/D: requests whose hit came from a prefill worker
        self._leases: dict[str, Lease[SimWorker]] = {}   # request -> its in-flight charges, as the proxy holds
        self.now = 0.0
        self.overflow_skips = 0
        self._next_arrival = None
        self.merge_steps = merge_steps   # off: one event per engine step (slower; same numbers)

    # -- the event loop ----------------------------------------------------------------------
    def run(self, requests: Iterable) -> Simulator:
        """Replay requests (in arrival order; an iterator is consumed lazily) until every one is done."""
        arrivals = iter(requests)
        self._next_arrival = next(arrivals, None)
        while self._next_arrival is not None or self._events:
            req = self._next_arrival
            if req is not None and (not self._events or req.arrival_s <= self._events[0][0]):
                self._next_arrival = next(arrivals, None)
                if self._next_arrival is not None and self._next_arrival.arrival_s < req.arrival_s:
                    raise ValueError("requests must come in arrival order")
                self.now = req.arrival_s
                self._arrive(req)
                continue
            self.now, _, kind, payload = heapq.heappop(self._events)
            if kind == "step":
                self._step(self.workers[payload])
            else:
                self._finish_step(*payload)
        return self

    def _horizon(self) -> float:
        """The next outside event that could change a worker's course: an arrival (it is routed);
        with P/D pools also any other worker's event (hand-offs and KV releases cross workers)."""
        t = self._next_arrival.arrival_s if self._next_arrival is not None else float("inf")
        if self.spec.disaggregated and self._events:
            t = min(t, self._events[0][0])
        return t

    def _push(self, time: float, kind: str, payload) -> None:
        heapq.heappush(self._events, (time, next(self._seq), kind, payload))

    def _wake(self, worker: SimWorker, time: float) -> None:
        if not worker.scheduled:
            worker.scheduled = True
            self._push(time, "step", worker.id)

    # -- routing -----------------------------------------------------------------------------
    def _arrive(self, req) -> None:
        tokens = req.tokens   # a list or an int32 array; the engine and the router hash arrays directly
        record = self.log.arrive(req.request_id, req.arrival_s, len(tokens))
        if not self._admit(req, len(tokens), record):
            return
        salt = self.salts.get(req.tenant)
        try:
            decision, self._leases[req.request_id] = self.route(tokens, salt)
        except NoWorkerAvailable:
            record.error = "no_worker"
            if self.shedder is not None:
                self.shedder.finished(self.now)   # as the router releases every admitted request
            self._settle(req.request_id)
            return
        steps = routing.plan(decision)
        params = SamplingParams(max_tokens=req.max_tokens)
        if self.priorities.get(req.tenant):
            self._priority[req.request_id] = self.priorities[req.tenant]
        if steps.decode is not None:
            self._pending_decode[req.request_id] = (steps.decode, params, tokens, salt)
        record.worker = decision.worker
        self._submit(self.workers[steps.first], req.request_id, tokens, params, salt, None, record)
        if record.error is None:
            self.ledger.sent(req.request_id, decision, len(tokens), self.now)

    def _admit(self, req, prompt_tokens: int, record) -> bool:
        """The router's front door: its load shedder (503 once the queues hold what the TTFT SLO allows),
        then a tenant's limits (requests and tokens per second, concurrency); a tenant's reservation is
        the prompt and max_tokens, settled when the request ends."""
        if self.shedder is not None:
            waiting = sum(w.engine.num_waiting for w in self.workers.values())   # what pool.queued() tracks
            if not self.shedder.check(waiting, self.now).ok:
                record.error = "overloaded"
                return False
        if req.tenant not in self.priorities:   # no such tenant in the spec: nothing limits it
            return True
        admission = self.tenants.admit(req.tenant, prompt_tokens + req.max_tokens, self.now)
        if not admission.ok:
            record.error = admission.reason or "tenant_limit"
            return False
        self._tickets[req.request_id] = admission
        return True

    def _settle(self, request_id: str) -> None:
        ticket = self._tickets.pop(request_id, None)
        if ticket is not None:
            record = self.log.records[request_id]
            self.tenants.release(ticket, record.prompt_tokens + record.tokens, self.now)

    def route(self, tokens, salt: str | None = None) -> tuple[Decision, Lease[SimWorker]]:
        """Choose a worker for a prompt and charge it, as the router's proxy does (router.policies.routing),
        from the engines' load now; raises NoWorkerAvailable. The lease ends with each worker's part."""
        for w in self.workers.values():
            view, engine = w.view, w.engine
            view.running, view.waiting, view.kv_usage = engine.num_running, engine.num_waiting, engine.blocks.usage
            view.queued = engine.num_waiting   # what the router's pool.queued() tracks
        route = RouteRequest.from_tokens(tokens, block_size=self.block_size, salt=salt, memo=self.hash_memo)
        if self.policies.reads_queues(route.policy):
            self.ledger.fill(self._views, self.now)
        decision = routing.choose(self.policies, route, self._views, line=self.line)
        self.overflow_skips += decision.overflow_skips
        return decision, routing.charge(decision, self.workers.__getitem__)

    def _submit(self, worker: SimWorker, request_id: str, tokens: list[int], params: SamplingParams,
                salt: str | None, remote: RemotePrefill | None, record) -> None:
        try:
            worker.engine.add_request(request_id, tokens, params, self.now, self._priority.get(request_id, 0),
                                      salt=salt, remote=remote)
        except (QueueFull, EngineError) as exc:
            record.error = type(exc).__name__
            self._pending_decode.pop(request_id, None)
            self._leases.pop(request_id).release_all()
            self._settle(request_id)
            return
        worker.routed += 1
        self._wake(worker, self.now)

    # -- workers -----------------------------------------------------------------------------
    def _step(self, worker: SimWorker) -> None:
        until = self._horizon() if self.merge_steps else None
        result = worker.engine.step(self.now, until=until, quiet_events=not self._feed_index)
        if result.duration > 0:
            self._push(result.end, "end", (worker.id, result))
            return
        self._deliver(worker, result)
        worker.scheduled = False
        if worker.engine.has_work() and result.next_wakeup is not None:
            self._wake(worker, max(self.now, result.next_wakeup))
        elif worker.engine.has_work() and not result.kv_ready:
            self._wake(worker, self.now)   # defensive: a runnable engine never sleeps without a wake-up

    def _finish_step(self, worker_id: str, result: StepResult) -> None:
        worker = self.workers[worker_id]
        worker.steps += result.steps
        worker.busy_prefill += result.prefill_s
        worker.busy_decode += result.decode_s
        worker.usage_time += worker.engine.blocks.usage * result.duration   # merged steps: end-of-run usage
        self._deliver(worker, result)
        worker.scheduled = False
        self._wake(worker, self.now)

    def _deliver(self, worker: SimWorker, result: StepResult) -> None:
        times = result.token_times or [result.end] * len(result.tokens)
        if len(self.ledger) > 0:   # slo_aware's ledger hears each first token
            for (request_id, _token), time in zip(result.tokens, times, strict=True):
                if self.log.records[request_id].first is None:
                    self._first_token(request_id, time)
                self.log.token(request_id, time)
        else:
            self.log.tokens(result.tokens, times)
        for fin in result.finished:
            self._on_finished(worker, fin, result)
        for request_id in result.kv_ready:
            prefill = self._prefill_of.pop(request_id, None)
            if prefill is not None:
                self.workers[prefill].engine.release(request_id)
        if result.events and self._feed_index:
            self.policies.index.apply(worker.id, KVEventBatch(ts=result.end, events=result.events))

    def _first_token(self, request_id: str, time: float) -> None:
        pair = self.ledger.first_token(request_id, time - self.log.records[request_id].arrival)
        if pair is not None:
            self.ttft_predictions.append(pair)

    def _on_finished(self, worker: SimWorker, fin, result: StepResult) -> None:
        self._leases[fin.request_id].release(worker)   # this worker's part is over
        self.ledger.ended(fin.request_id)
        record = self.log.records[fin.request_id]
        if fin.reason == "held":
            # P/D: the prefill worker's hit is the request's, as the router's answer reports it
            # (router.forwarding.pd); the decode worker's own hit only shortens the KV pull
            record.cached_tokens, record.host_cached_tokens = fin.cached_tokens, fin.host_cached_tokens
            self._remote_prefilled.add(fin.request_id)
            self._hand_off(worker, fin.request_id, result)
            return
        self._done(fin.request_id)
        if fin.request_id in self._remote_prefilled:
            self._remote_prefilled.discard(fin.request_id)
            return
        record.cached_tokens = max(record.cached_tokens, fin.cached_tokens)
        record.host_cached_tokens = max(record.host_cached_tokens, fin.host_cached_tokens)

    def _hand_off(self, prefill: SimWorker, request_id: str, result: StepResult) -> None:
        """P/D: the prefill worker produced the first token; the decode worker pulls the KV."""
        decode_id, params, tokens, salt = self._pending_decode.pop(request_id)
        first_token = next(t for rid, t in result.tokens if rid == request_id)
        if params.max_tokens <= 1:
            prefill.engine.release(request_id)
            self._remote_prefilled.discard(request_id)
            self._done(request_id)
            return
        self._prefill_of[request_id] = prefill.id
        self._submit(self.workers[decode_id], request_id, tokens, params, salt,
                     RemotePrefill(first_token=first_token), self.log.records[request_id])

    def _done(self, request_id: str) -> None:
        """The request is answered: any charge left (a decode the first token made unneeded) ends."""
        self.log.records[request_id].done = True
        if self.shedder is not None:
            self.shedder.finished(self.now)
        self._settle(request_id)
        self._priority.pop(request_id, None)
        self._pending_decode.pop(request_id, None)
        self._leases.pop(request_id).release_all()

    # -- results -----------------------------------------------------------------------------
    def summary(self, window: tuple[float, float] | None = None) -> Summary:
        if window is None:   # the engines' own counters (vLLM's hit rate: hits / queried tokens)
            queries = sum(w.engine.blocks.prefix_queries for w in self.workers.values())
            host = sum(w.engine.blocks.host_hits for w in self.workers.values())
            hits = sum(w.engine.blocks.prefix_hits for w in self.workers.values()) + host
        else:                # the finished prompts that arrived in the window: warm-up misses stay out
            inside = [r for r in self.log.records.values() if r.done and window[0] <= r.arrival < window[1]]
            queries = sum(r.prompt_tokens for r in inside)
            hits = sum(r.cached_tokens for r in inside)
            host = sum(r.host_cached_tokens for r in inside)
        horizon = self.now or 1.0
        workers = {w.id: {"role": w.role, "routed": w.routed, "steps": w.steps,
                          "prefill_busy": w.busy_prefill / horizon, "decode_busy": w.busy_decode / horizon,
                          "kv_usage_mean": w.usage_time / horizon, "preemptions": w.engine.scheduler.preemptions}
                   for w in self.workers.values()}
        return self.log.summarize(self.spec.slo.ttft_p99_s, self.spec.slo.itl_p99_s, window,
                                  prefix_hit_rate=hits / queries if queries else 0.0,
                                  host_hit_rate=host / queries if queries else 0.0,
                                  preemptions=sum(w.engine.scheduler.preemptions for w in self.workers.values()),
                                  workers=workers)
