"""The router's Prometheus metrics, in a registry of their own (several routers can share a process).

Router-added latency (``kvlab_router_added_latency_seconds``) is defined as the wall time from the
moment the request handler starts (the HTTP request line and headers have been parsed) to the moment
the upstream request is handed to the HTTP client for sending. It covers reading the body, decoding
and validating it, tenant and admission checks, tokenization, block hashing, the policy decision and
building the upstream body; it excludes the network and everything the worker does. The end-to-end
difference (through the router minus direct) is measured by benchmarks/router_overhead.py.

Several router processes (router.processes) write their metrics to files in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, chosen by that variable when prometheus_client is imported);
``render`` and ``aggregate`` then sum every process's counters and histograms, in-flight gauges are
summed over live processes and health gauges show the latest probe. The hash-memo counts, read from
one process's memory, are left out of that aggregate.
"""
from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

# Sub-millisecond buckets: the added latency target is < 1 ms at p50.
_ERROR_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
_LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 350e-6, 500e-6, 750e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0)


class RouterMetrics:
    def __init__(self, multiprocess: bool = False) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if multiprocess else None
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("kvlab_router_decisions", "Routing decisions", ["policy", "worker"], registry=r)
        self.overflow = Counter("kvlab_router_overflow",
                                "Workers skipped because they were at the bounded-load cap", ["policy"], registry=r)
        self.line_full = Counter("kvlab_router_line_full",
                                 "Choices moved to another worker because the chosen one's line was full "
                                 "(the load shedder's places)", ["policy"], registry=r)
        self.in_flight = Gauge("kvlab_router_in_flight", "Requests routed to a worker and not yet finished",
                               ["worker"], registry=r, multiprocess_mode="livesum")
        self.healthy = Gauge("kvlab_router_worker_healthy", "1 if the worker takes traffic", ["worker"], registry=r,
                             multiprocess_mode="livemostrecent")
        self.prompt_tokens = Counter("kvlab_router_prompt_tokens", "Prompt tokens routed", ["policy"], registry=r)
        self.estimated_hit_tokens = Counter(
            "kvlab_router_estimated_prefix_hit_tokens",
            "Prompt tokens the router expects the chosen worker to have cached (KV index)", ["policy"], registry=r)
        self.cached_tokens = Counter("kvlab_router_reported_cached_tokens",
                                     "Prompt tokens the workers reported as prefix-cache hits (usage)",
                                     ["policy"], registry=r)
        self.rejections = Counter("kvlab_router_rejections", "Requests refused by the router",
                                  ["status", "reason", "tenant"], registry=r)
        self.requests = Counter("kvlab_router_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.retries = Counter("kvlab_router_retries",
                               "Upstream attempts after a failure: retry (before the first token) or migration",
                               ["kind"], registry=r)
        self.worker_failures = Counter("kvlab_router_worker_failures", "Upstream failures by worker",
                                       ["worker", "reason"], registry=r)
        self.added_latency = Histogram("kvlab_router_added_latency_seconds",
                                       "Handler start to upstream send (see module doc)",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.decision_time = Histogram("kvlab_router_decision_seconds", "Tokenize + hash + policy",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        # slo_aware's TTFT prediction: |predicted - actual| / actual per streamed request (policy: the
        # registry's names only, so the label set is bounded)
        self.ttft_prediction_error = Histogram("kvlab_router_ttft_prediction_error_ratio",
                                               "Relative error of the predicted TTFT", ["policy"],
                                               buckets=_ERROR_BUCKETS, registry=r)

        # The children every proxied request counts in, remembered by label values: labels() checks its
        # arguments and takes the metric's lock on every call (~2 us each, four to six a request).
        self.request_count = _Children(self.requests)
        self.decision_count = _Children(self.decisions)
        self.prompt_token_count = _Children(self.prompt_tokens)
        self.cached_token_count = _Children(self.cached_tokens)

    def watch_hash_memo(self, memo) -> None:
        """Export a BlockHashMemo's hit and miss counts (read at scrape time; the memo stays pure)."""
        self.registry.register(_HashMemoCollector(memo))

    def render(self) -> bytes:
        return generate_latest(self.aggregate())

    def aggregate(self) -> CollectorRegistry:
        """Every router process's metrics (one process: its own registry)."""
        if self.multiprocess_dir is None:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)
        return registry

    def reject(self, status: int, reason: str, tenant: str | None) -> None:
        self.rejections.labels(str(status), reason, tenant or "-").inc()


class _Children:
    """``metric.labels(*values)``, remembered per label values (a bounded set: endpoints, statuses,
    policies and workers, all named by the router, never by a client)."""
    __slots__ = ("metric", "known")
    LIMIT = 4096   # past this many label sets (a long-lived router with many worker changes), start over

    def __init__(self, metric) -> None:
        self.metric = metric
        self.known: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str):
        child = self.known.get(values)
        if child is None:
            if len(self.known) >= self.LIMIT:
                self.known.clear()
            child = self.known[values] = self.metric.labels(*values)
        return child


class _HashMemoCollector:
    def __init__(self, memo) -> None:
        self.memo = memo

    def collect(self):
        runs = CounterMetricFamily("kvlab_router_hash_memo_runs",
                                   "64-block hash runs looked up in the router's memo, by result", labels=["result"])
        runs.add_metric(["hit"], self.memo.hits)
        runs.add_metric(["miss"], self.memo.misses)
        yield runs
