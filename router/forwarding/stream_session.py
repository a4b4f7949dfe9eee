"""One streaming request through the router: its attempts, the current source, and the relay.

The first attempt is opened before the client gets its response headers, so a refusal still gets
its own status code. After that every failure is handled inside the stream: retried while the client
has seen nothing, migrated once it has (router.frontdoor.job.Job.continuation), or ended with an OpenAI error
event and [DONE] when no attempt is left.
"""
from __future__ import annotations

from typing import Protocol

from kvlab.wire.openai_api import ApiError
from router.forwarding.relay import BadEvent, StreamRelay
from router.forwarding.stream_sources import Source
from router.forwarding.stream_timing import StreamClock
from router.forwarding.upstream import UpstreamFailure, WorkerRefused, exhausted
from router.frontdoor.job import PATHS, Job
from router.frontdoor.tokenize import PromptTokenizer
from router.policies.base import Decision, RouteRequest


class Attempts(Protocol):
    """What a session asks of the forwarder that opened it (router.forwarding.proxy.Proxy)."""
    tokenizer: PromptTokenizer

    def route(self, route: RouteRequest, exclude: set[str], job: Job | None = None) -> Decision: ...

    async def open_source(self, job: Job, decision: Decision, path: str, body: bytes, relay: StreamRelay,
                          first: bool) -> Source: ...

    def failed(self, failure: UpstreamFailure, exclude: set[str], started: bool) -> None: ...

    def first_token(self, job: Job, worker_id: str, policy: str) -> None: ...

    def account(self, job: Job, policy: str, completion: int, cached: int) -> None: ...


class StreamSession:
    """One streaming request: its attempts, the current source, and the relay that stitches them."""

    def __init__(self, proxy: Attempts, job: Job, max_attempts: int, clock: StreamClock | None = None):
        self.proxy = proxy
        self.job = job
        self.relay = StreamRelay(job, proxy.tokenizer)
        self.clock = clock   # the stream's TTFT/ITL for the dashboard, when one watches
        self.limit = max_attempts
        self.used = 0
        self.exclude: set[str] = set()
        self.last: UpstreamFailure | None = None
        self.decision: Decision | None = None
        self.source: Source | None = None
        self._closed = False
        self._first = False

    @property
    def current(self) -> Source:
        """The open attempt's source; events flow only after open() succeeded, so there is one."""
        source = self.source
        assert source is not None, "no attempt is open"
        return source

    async def open(self) -> Decision:
        """Start an attempt (the first, a retry, or a migration); raises ApiError when none is left."""
        proxy, relay = self.proxy, self.relay
        while self.used < self.limit:
            first = self.used == 0
            self.used += 1
            route, path, body = self._attempt_request()
            decision = self.decision = proxy.route(route, self.exclude, self.job if first else None)
            try:
                self.source = await proxy.open_source(self.job, decision, path, body, relay, first)
                return decision
            except UpstreamFailure as failure:
                proxy.failed(failure, self.exclude, relay.started)
                self.last = failure
        raise exhausted(self.last)

    def _attempt_request(self) -> tuple[RouteRequest, str, bytes]:
        job, relay = self.job, self.relay
        if not relay.started:
            return job.route, job.path, job.body()
        route = self.proxy.tokenizer.route_request(job.tokens_after(relay.generated), job.salt, job.route.policy)
        return route, PATHS["completions"], job.continuation(relay.generated)

    def ended(self) -> bool:
        """Whether the stream has ended: the events' last chunk carried [DONE] (or what ends it)."""
        return self.relay.done

    async def events(self):
        relay = self.relay
        while not relay.done:
            out = await self._step()
            if self.clock is not None and self.source is not None:
                self.clock.seen(self.source.worker_id, relay.streamed, relay.take_gaps() if relay.gaps else None)
            if not self._first and self.source is not None and self.decision is not None and relay.streamed:
                self._first = True   # slo_aware: predicted against actual TTFT
                self.proxy.first_token(self.job, self.source.worker_id, self.decision.policy)
            if out:
                yield out

    async def _step(self) -> bytes | None:
        """Bytes for the client from the events that have arrived (waiting for some). Events that came
        in the same read go out in one write: each send is a syscall for the router, and the client,
        which would get them back to back, loses nothing."""
        out: list[bytes] = []
        source = self.current
        try:
            events = await source.next_events()
            if events:
                self.relay.take(events, source.rewrite, out)
            elif self.relay.finish_reason is not None:
                out.append(self.relay.finish_done())
            else:
                raise UpstreamFailure(source.worker_id, "stream ended before [DONE]", dead=True)
        except (UpstreamFailure, BadEvent) as exc:
            if (after := await self._recover(exc)) is not None:
                out.append(after)
        return b"".join(out) if out else None

    async def _recover(self, exc: Exception) -> bytes | None:
        """After a failed source: finish, migrate, or end the stream with an error event."""
        relay = self.relay
        source = self.current
        await source.aclose()
        failure = exc if isinstance(exc, UpstreamFailure) else UpstreamFailure(source.worker_id, str(exc), dead=False)
        if relay.finish_reason is not None:       # every token arrived; only [DONE] was lost
            return relay.finish_done()
        if relay.started and relay.remaining <= 0:
            return relay.finish("length")
        try:
            self.proxy.failed(failure, self.exclude, relay.started)
            await self.open()
        except ApiError as err:
            return relay.error(err)
        except WorkerRefused as refused:
            return relay.error(ApiError(refused.status, "a worker refused the continued request",
                                        type_="server_error"))
        return None

    async def close(self) -> None:
        """Always runs (RelayResponse.on_close), even if the stream never started: free everything."""
        if self._closed:
            return
        self._closed = True
        if self.source is not None:
            await self.source.aclose()
        policy = self.decision.policy if self.decision else "-"
        self.proxy.account(self.job, policy, self.relay.completion_tokens, self.relay.cached_tokens)
