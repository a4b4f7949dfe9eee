"""Prometheus metrics of one worker, under vLLM's names (``vllm:``) plus kvlab's own (``kvlab:``).

Each app gets its own ``CollectorRegistry`` so several workers can live in one process (tests,
the embedded launcher). Engine state (running, waiting, KV usage, prefix-cache and preemption
totals) is read at scrape time by a collector; per-request latencies are observed from every
``StepResult`` the driver reports.

Latency histograms (TTFT, inter-token, end-to-end) are in **emulated seconds**: token times are
the emulated end of the step that produced them (``TokenOut.time``), relative to the request's
emulated arrival. At time scale 1 they match the wall clock up to host lag; at time scale k the
wall clock runs k times slower, the histograms do not. ``kvlab:step_lag_seconds`` is wall time.
On a decode worker of a P/D pair, "first token" is the first one it produces: the request's second.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.core.engine import Engine, StepResult

# Emulated seconds. TTFT spans a ~1 ms short prefill to long queues; decode steps of 8-70B models
# on one H100/H200 are a few to tens of ms, so ITL buckets are fine there.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5,
               1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LAG_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# vLLM reports only stop / length / abort; a prefill worker's "held" request stopped at its one
# token, which vLLM's prefill instance (max_tokens=1) reports as "length".
_REASON_LABEL = {"held": "length"}


def token_buckets(limit: int) -> tuple[float, ...]:
    """1-2-5 series up to the context limit, for token-count histograms."""
    out: list[int] = []
    scale = 1
    while scale <= limit:
        out.extend(v for v in (scale, 2 * scale, 5 * scale) if v <= limit)
        scale *= 10
    return tuple(float(v) for v in out)


class _Timing:
    __slots__ = ("arrival", "last", "prompt")

    def __init__(self, arrival: float, prompt: int):
        self.arrival = arrival
        self.last: float | None = None
        self.prompt = prompt


class WorkerMetrics:
    def __init__(self, engine: Engine, model_name: str, time_scale: float = 1.0):
        self.registry = CollectorRegistry(auto_describe=True)
        self._live: dict[str, _Timing] = {}
        self.busy_prefill_s = 0.0
        self.busy_decode_s = 0.0
        self.steps = 0
        self.decode_steps = 0          # steps that decoded, and the sequences they decoded: mean batch
        self.decode_tokens = 0
        self.flops = 0.0               # per GPU, every step's work (roofline.step_traffic): MFU and MBU
        self.hbm_bytes = 0.0
        self._gpu = engine.dep.gpu
        self._weight_dtype = engine.dep.weight_dtype
        self.registry.register(EngineCollector(engine, model_name))
        self._define_request_metrics(model_name, engine.max_model_len)
        self._define_kvlab_metrics()
        # Busy seconds are emulated: rate(kvlab:busy_seconds_total) x this = utilization (Grafana).
        Gauge("kvlab:time_scale", "Wall seconds per emulated second.", registry=self.registry).set(time_scale)

    def _define_request_metrics(self, model: str, max_len: int) -> None:
        reg, labels = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (emulated seconds).",
                              labels, registry=reg, buckets=TTFT_BUCKETS).labels(model)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency (emulated seconds).",
                             labels, registry=reg, buckets=ITL_BUCKETS).labels(model)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency (emulated seconds).",
                             labels, registry=reg, buckets=E2E_BUCKETS).labels(model)
        self.req_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                    labels, registry=reg, buckets=token_buckets(max_len)).labels(model)
        self.req_generation = Histogram("vllm:request_generation_tokens", "Generated tokens per finished request.",
                                        labels, registry=reg, buckets=token_buckets(max_len)).labels(model)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of requests that started generating.",
                                     labels, registry=reg).labels(model)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", labels,
                                         registry=reg).labels(model)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=reg)
        self._model = model

    def _define_kvlab_metrics(self) -> None:
        reg = self.registry
        self.lag = Histogram("kvlab:step_lag_seconds", "Wall-clock lateness of each busy engine step.",
                             registry=reg, buckets=LAG_BUCKETS)
        busy = Counter("kvlab:busy_seconds", "Emulated GPU busy time by phase.", ["phase"], registry=reg)
        self.busy_prefill, self.busy_decode = busy.labels("prefill"), busy.labels("decode")
        self.engine_steps = Counter("kvlab:engine_steps", "Busy engine steps executed.", registry=reg)

    # -- per request -------------------------------------------------------------------------
    def track(self, request_id: str, arrival: float, prompt_tokens: int) -> None:
        self._live[request_id] = _Timing(arrival, prompt_tokens)

    def aborted(self, request_id: str) -> None:
        if self._live.pop(request_id, None) is not None:
            self._success.labels(self._model, "abort").inc()

    # -- per step ----------------------------------------------------------------------------
    def on_step(self, result: StepResult, lag_s: float | None) -> None:
        if result.duration > 0:
            self.steps += 1
            self.engine_steps.inc()
            self._busy(result)
            if lag_s is not None:
                self.lag.observe(lag_s)
        if result.tokens:
            self._tokens(result)
        for fin in result.finished:
            self._finish(fin.request_id, fin.reason, fin.output_tokens, result.end)

    def _busy(self, result: StepResult) -> None:
        self.busy_prefill_s += result.prefill_s
        self.busy_decode_s += result.decode_s
        self.decode_steps += result.decode_steps
        self.decode_tokens += result.decode_tokens
        self.flops += result.flops
        self.hbm_bytes += result.hbm_bytes
        self.busy_prefill.inc(result.prefill_s)
        self.busy_decode.inc(result.decode_s)

    def roofline_figures(self) -> dict:
        """Per GPU, cumulative: FLOPs done and HBM bytes moved, and the datasheet peaks they divide by.
        A reader's MBU over a window is delta(hbm_bytes) / (peak_hbm_bytes_per_s x delta(emulated s)); MFU alike."""
        return {"hbm_bytes": self.hbm_bytes, "flops": self.flops,
                "peak_hbm_bytes_per_s": self._gpu.hbm_bytes_per_s,
                "peak_flops": self._gpu.peak_flops(self._weight_dtype),
                "decode_steps": self.decode_steps, "decode_tokens": self.decode_tokens}

    def _tokens(self, result: StepResult) -> None:
        t = result.end
        for request_id, _ in result.tokens:
            timing = self._live.get(request_id)
            if timing is None:
                continue
            if timing.last is None:
                self.ttft.observe(t - timing.arrival)
                self.prompt_tokens.inc(timing.prompt)
            else:
                self.itl.observe(t - timing.last)
            timing.last = t
        self.generation_tokens.inc(len(result.tokens))

    def _finish(self, request_id: str, reason: str, output_tokens: int, end: float) -> None:
        timing = self._live.pop(request_id, None)
        if timing is None:
            return
        self.e2e.observe(end - timing.arrival)
        self.req_prompt.observe(timing.prompt)
        self.req_generation.observe(output_tokens)
        self._success.labels(self._model, _REASON_LABEL.get(reason, reason)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Engine state read at scrape time: gauges, and counters the engine already totals."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        eng, blocks, labels = self.engine, self.engine.blocks, [self.model_name]
        yield _gauge("vllm:num_requests_running", "Requests in the running batch (KV arriving included).",
                     eng.num_running, labels)
        yield _gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", eng.num_waiting, labels)
        yield _gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", blocks.usage, labels)
        yield _counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                       blocks.prefix_queries, labels)
        yield _counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                       blocks.prefix_hits, labels)
        if blocks.host is not None:   # vLLM's KV-connector counters: here the connector is the host tier
            yield _counter("vllm:external_prefix_cache_queries", "Prompt tokens looked up in host memory.",
                           blocks.host_queries, labels)
            yield _counter("vllm:external_prefix_cache_hits", "Prompt tokens onboarded from host memory.",
                           blocks.host_hits, labels)
            yield _gauge("kvlab:host_kv_blocks", "KV blocks held in host memory.", len(blocks.host), labels)
            yield _counter("kvlab:host_kv_demotions", "KV blocks evicted from HBM and kept in host memory.",
                           blocks.demotions, labels)
        yield _counter("vllm:num_preemptions", "Preemptions of running requests.",
                       eng.scheduler.preemptions, labels)
        yield _gauge("kvlab:kv_blocks_total", "KV blocks in the pool.", blocks.num_blocks, labels)
        yield _gauge("kvlab:kv_blocks_free", "KV blocks free or holding only evictable cache.",
                     blocks.num_free, labels)
        yield _gauge("kvlab:requests_held", "Prefill role: requests whose KV awaits a decode worker.",
                     len(eng.held), labels)
        yield _counter("kvlab:prefix_cache_evictions", "Cached KV blocks evicted.", blocks.evictions, labels)


def _gauge(name: str, doc: str, value: float, labels: list[str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["model_name"])
    family.add_metric(labels, value)
    return family


def _counter(name: str, doc: str, value: float, labels: list[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["model_name"])
    family.add_metric(labels, value)
    return family

