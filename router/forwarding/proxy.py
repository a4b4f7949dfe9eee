"""Forwarding a decided request to workers, and surviving them (streams: router.forwarding.stream_session).

- Before the first token reaches the client, a failed worker (refused, reset, 5xx, timed out) is
  simply replaced: the request is re-routed without it and sent again.
- After that, a failed stream is *migrated*: the request is re-sent as a continuation (prompt plus
  the tokens already generated, budget reduced; see router.frontdoor.job) and the relay stitches the new
  worker's tokens into the same client stream.
- Connection-level failures also take the worker out of routing at once (WorkerPool.report_failure).
- When attempts run out the stream ends with an OpenAI error event and [DONE]; nothing hangs,
  because every upstream wait has a timeout (router.forwarding.upstream).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
from starlette.responses import Response

from kvlab.wire.openai_api import ApiError
from router.config import RouterConfig
from router.forwarding import pd
from router.forwarding.relay import StreamRelay
from router.forwarding.slo_tracking import SloTracker
from router.forwarding.sse import Usage
from router.forwarding.stream_session import StreamSession
from router.forwarding.stream_sources import ColocatedSource, Source
from router.forwarding.stream_timing import StreamTimings
from router.forwarding.streaming import SSE_HEADERS, RelayResponse
from router.forwarding.upstream import Upstream, UpstreamFailure, exhausted
from router.frontdoor.job import Job
from router.frontdoor.tokenize import PromptTokenizer
from router.observability.metrics import RouterMetrics
from router.policies import routing
from router.policies.base import Decision, NoWorkerAvailable, RouteRequest
from router.policies.registry import PolicySet
from router.policies.routing import Lease
from router.policies.slo_aware import SloUnmet
from router.pool.worker_pool import Worker, WorkerPool

WORKER_HEADER = "x-kvlab-worker"
PREFILL_WORKER_HEADER = "x-kvlab-prefill-worker"


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


_usage_decoder = msgspec.json.Decoder(_UsageOnly)
Finisher = Callable[[Job, int, int], None]   # (job, completion tokens, cached tokens), after the answer


class Proxy:
    def __init__(self, config: RouterConfig, pool: WorkerPool, policies: PolicySet, upstream: Upstream,
                 metrics: RouterMetrics, tokenizer: PromptTokenizer, on_finish: Finisher | None = None,
                 line: int | None = None):
        self.config = config
        self.line = line   # the shedder's places per worker: a choice stays inside its worker's line
        self.pool = pool
        self.policies = policies
        self.upstream = upstream
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.on_finish = on_finish or (lambda job, completion, cached: None)
        self.estimate_hits = config.kv_events != "off"   # the KV index is fed, so it can estimate
        self._timings: StreamTimings | None = None   # TTFT/ITL of relayed streams, once someone watches
        self.slo = SloTracker(metrics, policies.table.time_scale if policies.table else 1.0)   # slo_aware's ledger

    def time_streams(self, timings: StreamTimings) -> None:
        """Give every stream from now on a clock from `timings` (the dashboard's TTFT/ITL feed)."""
        self._timings = timings

    # -- routing ---------------------------------------------------------------------------------
    def route(self, route: RouteRequest, exclude: set[str], job: Job | None = None) -> Decision:
        """The policy's decision among routable workers not in `exclude`. With `job` (its first
        attempt) the decision time, tokenizing included, goes to the metrics."""
        started = time.perf_counter()
        views = self.pool.views(queued=self.line is not None)
        if self.policies.reads_queues(route.policy):
            self.slo.fill(views)
        try:
            decision = routing.choose(self.policies, route, views, exclude, self.line)
        except SloUnmet as unmet:
            raise ApiError(429, f"SLO cannot be met: {unmet}", type_="rate_limit_error", code="slo_unattainable",
                           headers={"Retry-After": "1"}) from None
        except NoWorkerAvailable:
            reason = "no other worker is left to try" if exclude else "no healthy worker can take the request"
            raise ApiError(503, reason, type_="server_error", code="no_worker_available",
                           headers={"Retry-After": "1"}) from None
        self.metrics.decided(decision.policy, decision.worker,
                             None if job is None else job.tokenize_s + time.perf_counter() - started)
        if decision.overflow_skips:
            self.metrics.overflow.labels(decision.policy).inc(decision.overflow_skips)
        if decision.line_full is not None:
            self.metrics.line_full.labels(decision.policy).inc()
        return decision

    def _charge(self, decision: Decision) -> tuple[Lease[Worker], routing.Plan]:
        """The decision's charges, and its workers in order (chosen from the pool just now)."""
        return routing.charge(decision, self.pool.__getitem__), routing.plan(decision)

    def failed(self, failure: UpstreamFailure, exclude: set[str], started: bool) -> None:
        """Account for a failed attempt; a worker's own 4xx ends the request with its answer."""
        refusal = failure.refusal()
        if refusal is not None and not started:
            raise refusal
        if failure.dead:
            self.pool.report_failure(failure.worker_id, failure.reason)
        exclude.add(failure.worker_id)
        self.metrics.retries.labels("migration" if started else "retry").inc()

    def _sent_upstream(self, job: Job, decision: Decision, first: bool) -> None:
        if decision.predicted_ttft_s is not None or self.slo.ledger.entries:   # else the ledger has nothing to do
            self.slo.sent(slo_key(job), decision, lambda: len(job.prompt))
        if first:
            self.metrics.sent(time.perf_counter() - job.received)
            if decision.matched_blocks or self.estimate_hits:   # else there is no hit to count
                # After the request is on its way (call_soon runs once this task yields to send it),
                # so the estimate costs the request nothing, and before the worker's new KV events arrive.
                asyncio.get_running_loop().call_soon(self._estimate_hit, job, decision)

    def _estimate_hit(self, job: Job, decision: Decision) -> None:
        """Router-side prefix-hit estimate: the policy's own match, else the KV index's (when fed)."""
        matched = decision.matched_blocks
        if matched is None and self.estimate_hits:
            matched = self.policies.index.match(job.route.blocks).get(decision.worker, 0)
        if matched:
            hit = min(matched * self.tokenizer.block_size, job.prompt_tokens)
            self.metrics.estimated_hit_tokens.labels(decision.policy).inc(hit)

    # -- non-streaming ---------------------------------------------------------------------------
    async def complete(self, job: Job) -> Response:
        try:
            return await self._complete(job)
        finally:
            self._forget(job)

    async def _complete(self, job: Job) -> Response:
        exclude: set[str] = set()
        last: UpstreamFailure | None = None
        for attempt in range(self.config.limits.max_attempts):
            decision = self.route(job.route, exclude, job if attempt == 0 else None)
            try:
                content = await self._complete_once(job, decision, first=attempt == 0)
            except UpstreamFailure as failure:
                self.failed(failure, exclude, started=False)
                last = failure
                continue
            self._finish_body(job, decision, content)
            return Response(content, media_type="application/json", headers=worker_headers(decision))
        raise exhausted(last)

    async def _complete_once(self, job: Job, decision: Decision, first: bool) -> bytes:
        lease, steps = self._charge(decision)
        worker = self.pool[steps.first]
        try:
            body = job.body()
            self._sent_upstream(job, decision, first)
            if steps.decode is not None:
                return await self._complete_pd(job, lease, self.pool[steps.decode], worker, body)
            return await self.upstream.post(worker.id, worker.endpoint(job.path), body)
        finally:
            lease.release_all()

    async def _complete_pd(self, job: Job, lease: Lease[Worker], decode: Worker, prefill: Worker, body: bytes) -> bytes:
        try:
            answer, prefilled = await pd.prefill(self.upstream, prefill, job.path, body)
        finally:
            lease.release(prefill)
        if not pd.needs_decode(answer, job.max_tokens):
            await pd.release_held(self.upstream.client, answer, self.config.timeouts.health_s)
            return pd.merged_body(answer, prefilled, None)
        decoded = await self.upstream.post(decode.id, decode.endpoint(job.path), pd.decode_body(body, answer))
        return pd.merged_body(answer, prefilled, decoded)

    def _finish_body(self, job: Job, decision: Decision, content: bytes) -> None:
        try:
            usage = _usage_decoder.decode(content).usage
        except msgspec.MsgspecError:
            usage = None
        completion = usage.completion_tokens if usage else job.max_tokens
        cached = usage.cached_tokens if usage else 0
        if usage is not None:
            job.reported_prompt_tokens = usage.prompt_tokens
        self.account(job, decision.policy, completion, cached)

    def _forget(self, job: Job) -> None:
        """The job ended: out of slo_aware's ledger (which holds only requests with a predicted TTFT)."""
        if self.slo.ledger.entries:
            self.slo.ended(slo_key(job))

    def first_token(self, job: Job, worker_id: str, policy: str) -> None:
        """A stream's first token reached the client: settle its predicted TTFT against the actual."""
        scale = self._timings.scale_of(worker_id) if self._timings else None
        self.slo.first_token(slo_key(job), worker_id, job.received, policy, scale)

    def account(self, job: Job, policy: str, completion: int, cached: int) -> None:
        self._forget(job)
        self.metrics.served(policy, job.prompt_tokens, cached)
        self.on_finish(job, completion, cached)

    # -- streaming -------------------------------------------------------------------------------
    async def stream(self, job: Job) -> RelayResponse:
        """Open the first attempt before answering, so a refusal can still get its own status code."""
        clock = self._timings.start(job.received) if self._timings else None
        session = StreamSession(self, job, self.config.limits.max_attempts, clock)
        try:
            decision = await session.open()
        except BaseException:
            self._forget(job)
            raise
        headers = SSE_HEADERS + [(k.encode(), v.encode()) for k, v in worker_headers(decision).items()]
        return RelayResponse(session.events(), on_close=session.close, headers=headers, ended=session.ended)

    async def open_source(self, job: Job, decision: Decision, path: str, body: bytes, relay: StreamRelay,
                          first: bool) -> Source:
        lease, steps = self._charge(decision)
        worker = self.pool[steps.first]
        try:
            self._sent_upstream(job, decision, first)
            if steps.decode is not None:
                return await self._open_pd(lease, self.pool[steps.decode], worker, path, body, relay)
            worker.in_transit += 1   # until the worker answers with headers: it has queued the request
            try:
                stream = await self.upstream.open_stream(worker.id, worker.endpoint(path), body)
            finally:
                worker.in_transit -= 1
        except BaseException:
            lease.release_all()
            raise
        return ColocatedSource(stream, worker, rewrite=relay.started, release=lease.release)

    async def _open_pd(self, lease: Lease[Worker], decode: Worker, prefill: Worker, path: str, body: bytes,
                       relay: StreamRelay) -> Source:
        try:
            answer, _ = await pd.prefill(self.upstream, prefill, path, body)
        finally:
            lease.release(prefill)   # its part is over; the decode worker stays charged until the stream ends
        source = pd.DisaggregatedSource(self.upstream, decode, path, body, answer, self.tokenizer,
                                        lease.release, relay.remaining)
        if source.prefill_only:
            await pd.release_held(self.upstream.client, answer, self.config.timeouts.health_s)
        return source


def slo_key(job: Job) -> str:
    """The job's key in slo_aware's ledger: unique while the job is alive, and the ledger forgets it
    when the job ends."""
    return str(id(job))


def worker_headers(decision: Decision) -> dict[str, str]:
    """Which workers served the request (for clients, logs and tests); a migration may change it later."""
    headers = {WORKER_HEADER: decision.worker}
    if decision.prefill_worker and decision.prefill_worker != decision.worker:
        headers[PREFILL_WORKER_HEADER] = decision.prefill_worker
    return headers
