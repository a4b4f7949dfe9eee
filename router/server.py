"""The router's HTTP server: OpenAI-compatible endpoints in front of a pool of workers.

``create_app(config)`` builds a FastAPI app around a ``Router`` (everything one router process
holds). The two hot endpoints skip FastAPI's routing and middleware (RouterApp): the raw body is read
(bounded) and decoded with msgspec, with no per-request pydantic model or dependency injection; the
answer is the worker's
body (non-streaming) or a relayed stream. Every refusal is an OpenAI error body with the right status.

Endpoints
- POST /v1/completions, /v1/chat/completions   routed and proxied (x-kvlab-policy picks the policy, if permitted)
- GET  /v1/models, /health, /metrics            union of the workers' models, liveness, Prometheus
- GET/POST /admin/workers, DELETE /admin/workers/{id}   membership (router.admin)
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

import httpx
import msgspec
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from kvlab.wire.http_body import too_large
from kvlab.wire.http_errors import error_response, install_error_handlers
from kvlab.wire.http_server import HeaderDeadline, ServerLimits, uvicorn_settings
from kvlab.wire.openai_api import ApiError, models_body
from kvlab.wire.tokenizer import load_tokenizer
from router.admin import ROUTER_ID_HEADER, add_admin_routes, require_metrics_token
from router.config import RouterConfig
from router.forwarding.deadlines import Deadlines, Expiry
from router.forwarding.proxy import Proxy
from router.forwarding.streaming import CLIENT_GONE_KEY, RelayResponse, unless_client_leaves
from router.forwarding.transport import LeanTransport
from router.forwarding.upstream import Upstream, WorkerRefused
from router.frontdoor.gate import Gate
from router.frontdoor.intake import POLICY_HEADER, Intake
from router.frontdoor.job import Endpoint, Job
from router.frontdoor.slo_headers import parse_slo_headers
from router.frontdoor.tenants import Tenants
from router.frontdoor.tokenize import PromptTokenizer
from router.hot_cycle import HotRequest, fits, hot_endpoint, serve
from router.observability.dashboard import mount_dashboard
from router.observability.metrics import RouterMetrics
from router.policies.kv_index import KvIndex
from router.policies.registry import PolicySet
from router.pool.kv_subscriber import KvSubscriber
from router.pool.worker_pool import Worker, WorkerPool
from router.shared_state import ProcessShare

log = logging.getLogger("kvlab.router")


class _PolicyMembership:
    """Pool listener that keeps every policy's rings (and the KV index) in step with worker health."""

    def __init__(self, policies: PolicySet):
        self.policies = policies

    def worker_up(self, worker: Worker) -> None:
        self.policies.add_worker(worker.id)

    def worker_down(self, worker: Worker) -> None:
        self.policies.remove_worker(worker.id)

    def worker_removed(self, worker: Worker) -> None:
        pass   # already down

    def worker_suspect(self, worker: Worker) -> None:
        pass   # still routable: the rings keep it


class Router:
    """One router process: pool, policies, KV feed, proxy and front door, built from a RouterConfig."""

    def __init__(self, config: RouterConfig, share: ProcessShare | None = None):
        self.config = config
        self.instance_id = secrets.token_hex(16)   # lets the admin API recognise this router's own URL
        self.metrics = RouterMetrics(multiprocess=share is not None)
        self._flusher: asyncio.Task | None = None
        # One client for every upstream call, on the lean keep-alive transport (see router.forwarding.transport);
        # trust_env=False: no proxy variables consulted on the hot path.
        self.transport = LeanTransport()
        self.client = httpx.AsyncClient(transport=self.transport, trust_env=False)
        index = KvIndex(**{"block_size": config.block_size, **config.kv_index})
        self.policies = PolicySet(config.policy, config.policies, index, config.slo_table,
                                  index_fed=config.kv_events != "off")
        self.pool = WorkerPool(self.client, config.health, config.timeouts, self.metrics, share)
        self.subscriber = KvSubscriber(index, self.client, config.kv_events, config.kv_events_poll_s,
                                       config.timeouts.health_s)
        self.pool.listeners += [_PolicyMembership(self.policies), self.subscriber]
        self.tokenizer = PromptTokenizer(load_tokenizer(config.tokenizer), config.block_size,
                                         config.hash_memo_runs)
        if self.tokenizer.hashes is not None:
            self.metrics.watch_hash_memo(self.tokenizer.hashes)
        self.gate = Gate(config.tenants, config.shedding, self.queue_depth, config.salt_secret,
                         prefill_workers=self.prefill_workers,
                         make_tenants=share.tenant_table if share is not None else Tenants)
        self.intake = Intake(config.limits, self.tokenizer, self.models, self.context_length,
                             self.policies.prompt_blocks)
        self._large_intake = ThreadPoolExecutor(1, thread_name_prefix="kvlab-intake")
        upstream = Upstream(self.client, self.transport, config.timeouts)
        self.pool.listeners.append(upstream)   # a worker going down fails its open streams: they migrate now
        self.proxy = Proxy(config, self.pool, self.policies, upstream, self.metrics, self.tokenizer,
                           on_finish=self._finished, line=self.gate.shedder.line() if self.gate.shedder else None)

    async def start(self) -> None:
        await asyncio.gather(*(self.pool.add(w) for w in self.config.workers))
        self.pool.start()
        if self.metrics.multiprocess_dir is not None:   # its siblings' scrapes read its batched counts
            self._flusher = asyncio.create_task(self.metrics.flush_every())

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        await self.pool.stop()
        await self.subscriber.stop()
        await self.client.aclose()
        self._large_intake.shutdown(wait=False, cancel_futures=True)
        self.metrics.flush()

    def context_length(self) -> int | None:
        return self.config.limits.max_model_len or self.pool.context_length()

    def models(self) -> list[str]:
        return self.config.models or self.pool.models()

    def queue_depth(self) -> float:
        """Cluster-wide waiting requests: the workers' last reports plus this router's traffic since."""
        return float(self.pool.queued())

    def prefill_workers(self) -> int:
        """Healthy workers that prefill (each drains its own queue, for shedding)."""
        return sum(1 for v in self.pool.views() if v.healthy and v.role != "decode")

    def _finished(self, job: Job, completion_tokens: int, cached_tokens: int) -> None:
        self.gate.release(job, completion_tokens)

    # -- the request path ------------------------------------------------------------------------
    async def handle(self, request: Request | HotRequest, endpoint: Endpoint) -> Response | RelayResponse:
        received = time.perf_counter()
        job = tenant = None
        limits = self.config.limits
        try:
            tenant = self.gate.tenant_of(request.headers.get("authorization"))
            self.gate.precheck(tenant)   # before the body is read or tokenized: a refused tenant costs ~nothing
            policy = request.headers.get(POLICY_HEADER)
            if policy is not None:
                policy = self._policy_override(policy, tenant)
            slo = parse_slo_headers(request.headers)   # x-slo-ttft-ms / x-slo-tpot-ms: a bad value is a 400 now
            raw = await _read_body(request, limits.max_body_bytes, limits.body_timeout_s)
            small = len(raw) < limits.offload_bytes   # decoded and tokenized right here, else on a thread
            salt = self.gate.salt(tenant)
            job = self.intake.job(endpoint, raw, received, policy, tenant, salt) if small else \
                await self._on_thread(self.intake.job, endpoint, raw, received, policy, tenant, salt)
            self.gate.admit(job)   # before tokenizing: a shed or over-limit request costs no tokenizer time
            if small:
                self.intake.tokenize(job)
            else:
                await self._on_thread(self.intake.tokenize, job)
            self.proxy.slo.targets(job.route, slo)
            self._force_priority(job, tenant)
            response: Response | RelayResponse
            if job.stream:
                response = await self.proxy.stream(job)
            else:
                response = await unless_client_leaves(request.receive, self.proxy.complete(job),
                                                      request.scope.get(CLIENT_GONE_KEY)) or CLIENT_GONE
        except ApiError as err:
            self._refused(endpoint, job, tenant, err.status, err.code or _GENERIC.get(err.status, "refused"))
            return error_response(err)
        except WorkerRefused as refused:
            self._refused(endpoint, job, tenant, refused.status, "worker_refused")
            return Response(refused.body, status_code=refused.status, media_type="application/json")
        except ClientDisconnect:   # left before its body was all in: the client's doing, not a failure
            log.debug("client left mid-body on POST %s", request.scope["path"])
            response = CLIENT_GONE
        except BaseException:
            self._refused(endpoint, job, tenant, 500, "internal_error")
            raise
        self.metrics.answered(endpoint, response.status_code)
        return response

    async def _on_thread(self, step, *args):
        """Run an intake step (decoding, tokenizing) of a large body on a thread, so the event loop
        (every other stream, /health) keeps running meanwhile. One thread: large prompts queue behind
        each other instead of taking every core."""
        return await asyncio.get_running_loop().run_in_executor(self._large_intake, step, *args)

    def _force_priority(self, job: Job, tenant: str | None) -> None:
        """The tenant's class sets the upstream `priority`, never the client: a batch tenant's requests
        carry its value, and a client's own non-zero priority is overwritten (it could jump the queue)."""
        priority = self.gate.tenants.priority_of(tenant)
        if priority or job.request.priority:
            job.fields["priority"] = priority

    def _policy_override(self, policy: str, tenant: str | None) -> str:
        """A request may pick the routing policy (`policy`: its header's) only where the config or its
        tenant allows it."""
        if self.config.policy_header or self.gate.tenants.may_choose_policy(tenant):
            return policy
        raise ApiError(403, f"this key may not choose the routing policy ({POLICY_HEADER})", param=POLICY_HEADER,
                       code="policy_override_forbidden")

    def _refused(self, endpoint: Endpoint, job: Job | None, tenant: str | None, status: int, reason: str) -> None:
        """Account a refused request."""
        if job is not None:
            self.gate.release(job, 0, served=False)   # admitted but never served: free its slot, refund its tokens
        self.metrics.answered(endpoint, status)
        self.metrics.reject(status, reason, tenant)


async def _read_body(request: Request | HotRequest, limit: int, timeout_s: float) -> bytes:
    """kvlab.wire.http_body.read_body (413 past `limit` bytes, 408 past `timeout_s`, the same answers),
    with its deadline on the router's tick (router.forwarding.deadlines) rather than a timer of its own."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    try:
        if isinstance(request, HotRequest):
            return await request.body(limit, timeout_s)
        with Expiry(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
    except TimeoutError:   # kvlab.wire.http_body's answer, word for word
        raise ApiError(408, f"request body not received within {timeout_s:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    return b"".join(chunks)


# Reason labels for refusals without a code of their own: by status, never from the request.
_GENERIC = {400: "invalid_request", 403: "forbidden", 404: "not_found", 408: "request_timeout",
            413: "request_too_large", 429: "rate_limited", 503: "unavailable"}


# nginx's "client closed request": nobody is listening, but the status shows up in logs and metrics.
CLIENT_GONE = Response(status_code=499)


def create_app(config: RouterConfig, share: ProcessShare | None = None) -> FastAPI:
    """The app of one router process; `share`: what it shares with its sibling processes (router.processes)."""
    router = Router(config, share)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = RouterApp(title="kvlab router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router
    app.hot_paths = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
    for path, endpoint in app.hot_paths.items():   # also routed: other methods get FastAPI's 405
        app.add_route(path, _handler(router, endpoint), methods=["POST"])
    _add_ops_routes(app, router)
    add_admin_routes(app, router)
    install_error_handlers(app, "router", log)
    mount_dashboard(app, router)   # GET /cluster, /dashboard
    return app


def _handler(router: Router, endpoint: Endpoint):
    async def handle(request: Request) -> Response | RelayResponse:
        return await router.handle(request, endpoint)
    return handle


class RouterApp(FastAPI):
    """FastAPI, with the two proxied endpoints dispatched before routing and the middleware stack.

    Every request to a proxied endpoint would otherwise pass through about eight ASGI layers
    (error and exception middleware, body limit, telemetry, exit stack, router, route, handler
    wrapper) that cost ~50-100 us and do nothing here: Router.handle reads the raw body itself and
    answers every error with an OpenAI body. Everything else (ops, admin, 404/405) is plain FastAPI.
    """
    hot_paths: dict[str, Endpoint] = {}

    async def __call__(self, scope, receive, send) -> None:
        endpoint = self.hot_paths.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            return await super().__call__(scope, receive, send)
        response: Response | RelayResponse
        try:
            response = await self.state.router.handle(Request(scope, receive), endpoint)
        except Exception:  # a bug, not a client error: still an OpenAI body, and the router keeps serving
            log.exception("unhandled error on POST %s", scope["path"])
            response = error_response(ApiError(500, "internal error in the router", type_="server_error"))
        await response(scope, receive, send)


class _RouterProtocol(HeaderDeadline):
    """HeaderDeadline for a router process, with per-request costs taken off:
    - its timers (the header deadline, armed at every request's first byte and disarmed at its last
      header; uvicorn's keep-alive deadline, armed after every response) are on the router's tick
      (router.forwarding.deadlines): a libuv timer each costs ~5 us a request;
    - the client's leaving is a future in the scope (CLIENT_GONE_KEY), so a proxied call or stream is cut
      short by a callback (router.forwarding.streaming.ClientWatch) rather than a watcher task per request;
    - a POST's answer with a Content-Length leaves in one write, head and body together (_OneWrite);
    - the two proxied endpoints run on uvicorn's cycle without the ASGI layer (router.hot_cycle).
    on_response_complete is uvicorn 0.55's, with the keep-alive deadline on the tick."""

    hot_cycle = False   # serve the proxied endpoints from uvicorn's cycle (router.hot_cycle), where it fits

    def connection_made(self, transport) -> None:
        self.client_gone: asyncio.Future[None] = self.loop.create_future()
        self._hot: tuple[object, tuple[Router, Endpoint] | None] = (None, None)   # (scope, its hot endpoint)
        self._deadlines = Deadlines.of(self.loop)   # looked up once a connection, not at every response
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.client_gone.done():
            self.client_gone.set_result(None)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[CLIENT_GONE_KEY] = self.client_gone  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle, scope = self.cycle, self.scope
        if scope["method"] == "POST" and cycle is not None and cycle.scope is scope \
                and self._hot_endpoint(scope) is None:   # the proxied endpoints answer in one write themselves
            cycle.transport = _OneWrite(self.transport)  # type: ignore[assignment]

    def _hot_endpoint(self, scope) -> tuple[Router, Endpoint] | None:
        """The (router, endpoint) a request goes to directly (router.hot_cycle), or None: looked up once
        a request, by _start_asgi_task (which uvicorn's on_headers_complete calls, unless pipelined)."""
        found, hot = self._hot
        if found is not scope:
            hot = hot_endpoint(self.app, scope) if self.hot_cycle else None
            self._hot = (scope, hot)
        return hot

    def _start_asgi_task(self, cycle, app) -> None:
        """A proxied endpoint's request runs router.hot_cycle.serve on uvicorn's task and cycle (its
        error handling included); every other request, the app."""
        hot = self._hot_endpoint(cycle.scope)
        if hot is not None and app is self.app:
            app = partial(serve, *hot, cycle)
        super()._start_asgi_task(cycle, app)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self._deadlines.after(  # type: ignore[assignment]
                self.header_timeout_s, self._headers_overdue)

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:   # pipelined requests: the next one starts
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self.timeout_keep_alive_task = self._deadlines.at(  # type: ignore[assignment]
                self.loop.time() + self.timeout_keep_alive, self.timeout_keep_alive_handler)


class _OneWrite:
    """A POST's transport as uvicorn's response cycle sees it: a response with a Content-Length has its
    head held back until its body follows (uvicorn writes them one after the other, with nothing in
    between), so both go out in one write: one syscall, and one segment for the client to wake up to.
    Streamed (chunked) heads go out at once."""
    __slots__ = ("_transport", "_head")

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif data.startswith(b"HTTP/1.1 ") and b"\r\ncontent-length: " in data:
            self._head = data
            return
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()


def uvicorn_options(limits: ServerLimits) -> dict:
    """uvicorn settings for a router process: kvlab.wire.http_server's limits, the header deadline on the
    tick, and no proxy-headers middleware (the router reads neither the client's address nor the scheme,
    and the layer would parse X-Forwarded-* on every request)."""
    settings = uvicorn_settings(limits)
    if _fits(settings["http"]):
        settings["http"] = type("RouterProtocol", (_RouterProtocol, settings["http"]), {"hot_cycle": fits()})
    settings["proxy_headers"] = False
    return settings


_BUILDS_ON = ("_unset_keepalive_if_required", "_start_asgi_task", "timeout_keep_alive_handler", "on_response_complete")


def _fits(protocol: type) -> bool:
    """Whether this uvicorn's protocol has the methods _RouterProtocol builds on (uvicorn 0.55's); a
    uvicorn without them serves through its own protocol, whose per-request timers and disconnect watcher
    cost more CPU but behave the same (streaming.ClientWatch falls back to watching `receive`)."""
    return all(callable(getattr(protocol, name, None)) for name in _BUILDS_ON)


def _add_ops_routes(app: FastAPI, router: Router) -> None:
    @app.get("/v1/models")
    async def models() -> Response:
        return _json(models_body(router.models()))

    @app.get("/health")
    async def health() -> Response:
        up = router.pool.up_count()
        body = {"status": "ok" if up else "no healthy worker", "workers_up": up,
                "workers": len(router.pool.views())}
        return Response(msgspec.json.encode(body), status_code=200 if up else 503, media_type="application/json",
                        headers={ROUTER_ID_HEADER: router.instance_id})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        require_metrics_token(request, router.config.metrics_token)
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _json(payload, status: int = 200) -> Response:
    return Response(msgspec.json.encode(payload), status_code=status, media_type="application/json")


