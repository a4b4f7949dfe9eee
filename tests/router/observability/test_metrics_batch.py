"""The per-request counts the router batches (router.observability.metrics) expose exactly what
prometheus_client's own calls for the same observations expose, whenever the registry is read."""
from __future__ import annotations

import threading

from prometheus_client import Histogram

from router.observability.metrics import RouterMetrics

# On bucket bounds, between them and past the last one (prometheus_client puts a value on a bound in that bucket)
SECONDS = [3e-6, 25e-6, 26e-6, 1e-3, 0.3, 2.0, 50e-3, 0.0]


def _exposition(metrics: RouterMetrics) -> list[str]:
    """The text format without creation times, and histogram sums to 12 digits: the batch adds the
    seconds it summed, prometheus_client one at a time (the same sum, rounded in another order)."""
    lines = []
    for line in metrics.render().decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name.endswith("_sum"):
            line = f"{name} {float(value):.12g}"
        if "_created" not in name:
            lines.append(line)
    return lines


def _observe(batched: RouterMetrics, direct: RouterMetrics, i: int, seconds: float) -> None:
    status, worker = (200 if i % 3 else 429), f"w{i % 2}"
    batched.answered("completions", status)
    direct.requests.labels("completions", str(status)).inc()
    batched.decided("prefix_bounded", worker, seconds if i % 2 else None)
    direct.decisions.labels("prefix_bounded", worker).inc()
    if i % 2:
        direct.decision_time.observe(seconds)
    batched.sent(seconds)
    direct.added_latency.observe(seconds)
    batched.served("prefix_bounded", 10 * i, 5 * (i % 2))
    direct.prompt_tokens.labels("prefix_bounded").inc(10 * i)
    if i % 2:
        direct.cached_tokens.labels("prefix_bounded").inc(5)
    batched.in_flight_by(worker, 1)
    direct.in_flight.labels(worker).inc()
    if i % 4:
        batched.in_flight_by(worker, -1)
        direct.in_flight.labels(worker).dec()


def test_batched_counts_expose_what_prometheus_clients_own_calls_expose():
    batched, direct = RouterMetrics(), RouterMetrics()
    for i, seconds in enumerate(SECONDS[:4]):
        _observe(batched, direct, i, seconds)
    assert _exposition(batched) == _exposition(direct)   # read once midway: flushed, then counted on
    for i, seconds in enumerate(SECONDS[4:], start=4):
        _observe(batched, direct, i, seconds)
    assert _exposition(batched) == _exposition(direct)
    assert batched.registry.get_sample_value("kvlab_router_added_latency_seconds_count") == len(SECONDS)


def test_a_read_from_another_thread_loses_no_count():
    metrics = RouterMetrics()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            metrics.registry.get_sample_value("kvlab_router_requests_total", {"endpoint": "chat", "status": "200"})

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(20_000):
            metrics.answered("chat", 200)
    finally:
        done.set()
        reader.join()
    assert metrics.registry.get_sample_value("kvlab_router_requests_total",
                                             {"endpoint": "chat", "status": "200"}) == 20_000


def test_many_observations_at_once_expose_what_one_at_a_time_does():
    """RouterMetrics.observe (the dashboard's TTFT and ITL: a coalesced chunk's gaps, n at a time)."""
    one, many = RouterMetrics(), RouterMetrics()
    h1 = Histogram("gap_seconds", "gaps", registry=one.registry, buckets=(0.01, 0.1, 1.0))
    h2 = Histogram("gap_seconds", "gaps", registry=many.registry, buckets=(0.01, 0.1, 1.0))
    for value, n in ((0.005, 3), (0.1, 2), (0.5, 4), (7.0, 1)):
        for _ in range(n):
            h1.observe(value)
        many.observe(h2, value, n)
    assert _exposition(many) == _exposition(one)
    assert many.registry.get_sample_value("gap_seconds_bucket", {"le": "0.1"}) == 5
