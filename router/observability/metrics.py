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

What every proxied request counts (its answer, decision, decision and added latency, prompt and cached
tokens, its worker's in-flight count) is batched: a method call per request adds to plain sums, and
those go into the Prometheus metrics when they are read (a first collector in the registry flushes them,
so every reader sees them, /metrics and tests alike) and, with several processes, every FLUSH_S, so a
scrape that a sibling process answers sees them that late at most. prometheus_client's own calls cost
about thirty Python calls a request (label lookup, checks, a lock per value); the exposition is the
same metrics, names and labels.
"""
from __future__ import annotations

import asyncio
import os
import threading
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

# Sub-millisecond buckets: the added latency target is < 1 ms at p50.
_ERROR_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
_LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 350e-6, 500e-6, 750e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0)
# Several processes: how often each adds its batched counts to the shared files. Well under Prometheus'
# default 15 s scrape interval, and one wake-up a second costs a process nothing.
FLUSH_S = 1.0


class RouterMetrics:
    def __init__(self, multiprocess: bool = False) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if multiprocess else None
        self.registry = CollectorRegistry()
        r = self.registry
        self._batch = _Batch()
        r.register(self._batch)   # first: a read of the registry flushes the batch before any metric is read
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

        self._batched = _fits(self.added_latency) and _fits(self.decision_time)
        self._fitting: dict[Histogram, bool] = {}   # observe()'s histograms, and whether each fits

    # -- what every proxied request counts (batched: see the module doc) ---------------------------
    def answered(self, endpoint: str, status: int) -> None:
        """kvlab_router_requests{endpoint, status} += 1."""
        with self._batch.lock:
            key = (self.requests, endpoint, status)
            self._batch.counts[key] = self._batch.counts.get(key, 0) + 1

    def decided(self, policy: str, worker: str, seconds: float | None) -> None:
        """A routing decision, and its time (tokenizing included) on a request's first attempt."""
        batch = self._batch
        with batch.lock:
            key = (self.decisions, policy, worker)
            batch.counts[key] = batch.counts.get(key, 0) + 1
            if seconds is not None and self._batched:
                bucket = (self.decision_time, bisect_left(self.decision_time._upper_bounds, seconds))
                batch.buckets[bucket] = batch.buckets.get(bucket, 0) + 1
                batch.sums[self.decision_time] = batch.sums.get(self.decision_time, 0.0) + seconds
        if seconds is not None and not self._batched:
            self.decision_time.observe(seconds)

    def sent(self, seconds: float) -> None:
        """A request's added latency (handler start to upstream send)."""
        if not self._batched:
            return self.added_latency.observe(seconds)
        batch = self._batch
        with batch.lock:
            bucket = (self.added_latency, bisect_left(self.added_latency._upper_bounds, seconds))
            batch.buckets[bucket] = batch.buckets.get(bucket, 0) + 1
            batch.sums[self.added_latency] = batch.sums.get(self.added_latency, 0.0) + seconds
        return None

    def served(self, policy: str, prompt_tokens: int, cached_tokens: int) -> None:
        """A request's prompt tokens, and those the worker reported as prefix-cache hits."""
        batch = self._batch
        with batch.lock:
            key = (self.prompt_tokens, policy)
            batch.counts[key] = batch.counts.get(key, 0) + prompt_tokens
            if cached_tokens:
                key = (self.cached_tokens, policy)
                batch.counts[key] = batch.counts.get(key, 0) + cached_tokens

    def in_flight_by(self, worker: str, change: int) -> None:
        """kvlab_router_in_flight{worker} += change (a request charged to the worker, or released)."""
        with self._batch.lock:
            key = (self.in_flight, worker)
            self._batch.counts[key] = self._batch.counts.get(key, 0) + change

    def observe(self, histogram: Histogram, value: float, n: int = 1) -> None:
        """`n` observations of `value` in an unlabelled histogram of this registry (the dashboard's
        TTFT and ITL: one or more a streamed token), batched where the histogram fits."""
        fits = self._fitting.get(histogram)
        if fits is None:
            fits = self._fitting[histogram] = _fits(histogram)
        if not fits:
            for _ in range(n):
                histogram.observe(value)
            return
        batch = self._batch
        with batch.lock:
            bucket = (histogram, bisect_left(histogram._upper_bounds, value))
            batch.buckets[bucket] = batch.buckets.get(bucket, 0) + n
            batch.sums[histogram] = batch.sums.get(histogram, 0.0) + value * n

    def flush(self) -> None:
        """Add the batched counts to the Prometheus metrics (done before every read)."""
        self._batch.flush()

    async def flush_every(self, seconds: float = FLUSH_S) -> None:
        """Flush periodically, for the scrapes that sibling processes answer (router.processes)."""
        while True:
            await asyncio.sleep(seconds)
            self.flush()

    def watch_hash_memo(self, memo) -> None:
        """Export a BlockHashMemo's hit and miss counts (read at scrape time; the memo stays pure)."""
        self.registry.register(_HashMemoCollector(memo))

    def render(self) -> bytes:
        self.flush()   # this process's own batch: its siblings flush theirs every FLUSH_S
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


class _Batch:
    """Counts since the last flush, under one lock (the registry may be read from another thread):
    counter and gauge increments by (metric, *label values), histogram observations by (histogram,
    bucket index) and their sums by histogram. A collector that yields nothing: collecting flushes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[tuple, float] = {}
        self.buckets: dict[tuple[Histogram, int], int] = {}
        self.sums: dict[Histogram, float] = {}

    def flush(self) -> None:
        with self.lock:
            counts, buckets, sums = self.counts, self.buckets, self.sums
            self.counts, self.buckets, self.sums = {}, {}, {}
        for (metric, *labels), amount in counts.items():   # a 0 too: the child is exported from then on
            metric.labels(*[str(v) for v in labels]).inc(amount)
        for histogram, total in sums.items():
            histogram._sum.inc(total)
        for (histogram, bucket), count in buckets.items():
            histogram._buckets[bucket].inc(count)

    def collect(self):
        self.flush()
        return iter(())


def _fits(histogram: Histogram) -> bool:
    """Whether an unlabelled histogram keeps its bounds, bucket values and sum as prometheus_client
    0.26 does (what _Batch adds its observations to); if not, observations go through observe()."""
    bounds = getattr(histogram, "_upper_bounds", None)
    values = getattr(histogram, "_buckets", None)
    return isinstance(bounds, list) and isinstance(values, list) and len(bounds) == len(values) \
        and all(hasattr(v, "inc") for v in values) and hasattr(getattr(histogram, "_sum", None), "inc")


class _HashMemoCollector:
    def __init__(self, memo) -> None:
        self.memo = memo

    def collect(self):
        runs = CounterMetricFamily("kvlab_router_hash_memo_runs",
                                   "64-block hash runs looked up in the router's memo, by result", labels=["result"])
        runs.add_metric(["hit"], self.memo.hits)
        runs.add_metric(["miss"], self.memo.misses)
        yield runs
