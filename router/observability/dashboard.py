"""The router's live cluster view: ``GET /cluster`` (JSON) and ``GET /dashboard`` (a page polling it).

``mount_dashboard(app, router)`` wires three feeds into one ``ClusterView`` (router.observability.cluster_view):
- every ``/load`` body the pool's health probe reads (``WorkerPool.load_hooks``): no extra polling;
- the router's own Prometheus counters, sampled at most once per ``interval_s``;
- TTFT/ITL of relayed streams (``Proxy.time_streams``), also exported as router histograms so Grafana can
  show what clients see next to what the workers measure.

A history point is recorded when a probe or a ``/cluster`` request finds the last one
``interval_s`` old, so nothing runs in the background of its own.

GET /cluster?since=T&window=W   current view; history points after T (all when omitted); rate window W s
GET /dashboard                  the page (router/observability/static/dashboard.html, .js, .css; no build step)
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import msgspec
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, Histogram
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from router.admin import require_metrics_token
from router.forwarding.stream_timing import StreamTimings
from router.observability.cluster_view import ClusterView, Counters, Member, decode_load

log = logging.getLogger("kvlab.router.dashboard")

STATIC = Path(__file__).parent / "static"
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}

# Router counter families the view reads, and the labels that key their samples.
COUNTER_FAMILIES = {
    "kvlab_router_decisions": ("decisions", ("policy", "worker")),
    "kvlab_router_overflow": ("overflow", ("policy",)),
    "kvlab_router_prompt_tokens": ("prompt_tokens", ("policy",)),
    "kvlab_router_reported_cached_tokens": ("cached_tokens", ("policy",)),
    "kvlab_router_estimated_prefix_hit_tokens": ("estimated_hit_tokens", ("policy",)),
    "kvlab_router_rejections": ("rejections", ("status", "reason", "tenant")),
}

# Emulated seconds, as the workers' vLLM histograms (workers.metrics), so the two compare bucket by bucket.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


def read_counters(registry: CollectorRegistry) -> Counters:
    out: Counters = {family: {} for family, _ in COUNTER_FAMILIES.values()}
    for metric in registry.collect():
        known = COUNTER_FAMILIES.get(metric.name)
        if known is None:
            continue
        family, labels = known
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[family][tuple(sample.labels.get(label, "") for label in labels)] = sample.value
    return out


class Observatory:
    """Feeds one router's ClusterView and answers for it."""

    def __init__(self, router, view: ClusterView | None = None, interval_s: float = 1.0,
                 clock=time.perf_counter):
        self.router = router
        self.view = view or ClusterView()
        self.interval_s = interval_s
        self.clock = clock
        self.t0 = clock()
        self._last_point = float("-inf")
        registry = router.metrics.registry
        self._ttft = Histogram("kvlab_router_time_to_first_token_seconds",
                               "TTFT of relayed streams as clients see them (emulated seconds)",
                               buckets=TTFT_BUCKETS, registry=registry)
        self._itl = Histogram("kvlab_router_inter_token_latency_seconds",
                              "Inter-token latency of relayed streams (emulated seconds)",
                              buckets=ITL_BUCKETS, registry=registry)
        router.pool.load_hooks.append(self.on_load)
        router.proxy.time_streams(StreamTimings(self, self.view.time_scale))

    # -- feeds -----------------------------------------------------------------------------------
    def on_load(self, worker_id: str, body: bytes) -> None:
        try:
            self.view.observe_load(worker_id, self.clock(), decode_load(body))
            self.tick()
        except Exception:   # observing must never fail the health probe that called us
            log.exception("cluster view: could not take the /load of %s", worker_id)

    def ttft(self, seconds: float) -> None:
        self.view.observe_ttft(self.clock(), seconds)
        self.router.metrics.observe(self._ttft, seconds)   # batched with the router's own counts

    def itl(self, seconds: float) -> None:
        self.view.observe_itl(self.clock(), seconds)
        self.router.metrics.observe(self._itl, seconds)

    def itls(self, gaps: list[float]) -> None:
        """Many gaps at once (a coalesced chunk's tokens, mostly one decode step's length each): one
        histogram update per distinct value rather than per token."""
        now = self.clock()
        for value, n in Counter(gaps).items():
            self.view.observe_itl(now, value, n)
            self.router.metrics.observe(self._itl, value, n)

    # -- answers ---------------------------------------------------------------------------------
    def members(self) -> list[Member]:
        return [Member(id=v.id, role=v.role, up=v.healthy, in_flight=v.in_flight) for v in self.router.pool.views()]

    def tick(self) -> None:
        """Sample the router's counters and record a history point, at most once per interval."""
        now = self.clock()
        if now - self._last_point < self.interval_s:
            return
        self._last_point = now
        members = self.members()
        self.view.forget({m.id for m in members})
        self.view.observe_counters(now, read_counters(self.router.metrics.aggregate()))   # every process's
        self.view.record(now - self.t0, now, members)

    def cluster(self, since: float | None = None, window_s: float | None = None) -> dict:
        self.tick()
        now = self.clock()
        body = self.view.view(now, self.members(), window_s)
        body.update(t=round(now - self.t0, 3), policy=self.router.config.policy,
                    interval_s=self.interval_s, history=self.view.history_since(since))
        return body


def dashboard_routes(observatory: Observatory) -> APIRouter:
    api = APIRouter()

    @api.get("/cluster")
    async def cluster(request: Request, since: float | None = None, window: float | None = None) -> Response:
        require_metrics_token(request, observatory.router.config.metrics_token)
        if window is not None and not 0 < window <= observatory.view.retain_s:
            raise HTTPException(400, f"window must be in (0, {observatory.view.retain_s:g}] seconds")
        body = observatory.cluster(since, window)
        return Response(msgspec.json.encode(body), media_type="application/json",
                        headers={"cache-control": "no-store"})

    @api.get("/dashboard")
    async def page() -> Response:
        return Response((STATIC / "dashboard.html").read_bytes(), media_type="text/html")

    @api.get("/dashboard/{name}")
    async def asset(name: str) -> Response:
        if name not in _ASSETS:   # a fixed list: no path ever reaches the file system from the URL
            raise HTTPException(404, f"no dashboard asset {name!r}")
        return Response((STATIC / name).read_bytes(), media_type=_ASSETS[name])

    return api


def mount_dashboard(app: FastAPI, router, **settings) -> Observatory:
    """Attach the cluster view to a router app; `settings` go to Observatory (interval_s, view)."""
    observatory = Observatory(router, **settings)
    app.state.observatory = observatory
    app.include_router(dashboard_routes(observatory))
    return observatory
