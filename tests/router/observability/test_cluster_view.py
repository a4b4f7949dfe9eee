"""The cluster view's aggregation on hand-made inputs: windows, time scale, restarts, pools, router
counters, latency percentiles and the stream clock; and the /cluster and /dashboard routes."""
from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from router.config import RouterConfig
from router.forwarding.stream_timing import StreamTimings
from router.observability.cluster_view import ClusterView, LoadSnapshot, Member
from router.observability.sliding import SampleWindow, SnapshotWindow, percentiles
from router.server import create_app


def snap(emulated: float, prefill: float = 0.0, decode: float = 0.0, **fields) -> LoadSnapshot:
    return LoadSnapshot(emulated_now_s=emulated, busy_prefill_s=prefill, busy_decode_s=decode, **fields)


def test_utilization_is_emulated_busy_over_emulated_time_whatever_the_time_scale():
    for scale in (1.0, 20.0):
        view = ClusterView(window_s=100 * scale)
        # 10 emulated seconds take 10 x scale wall seconds; 3 s prefill and 5 s decode happened in them
        view.observe_load("w", 0.0, snap(0.0, time_scale=scale))
        view.observe_load("w", 10 * scale, snap(10.0, 3.0, 5.0, time_scale=scale))
        c = view.view(10 * scale, [Member(id="w")])["cluster"]
        assert (c["prefill_util"], c["decode_util"]) == pytest.approx((0.3, 0.5))
        assert c["ratio"] == pytest.approx(0.6) and c["prefill_share"] == pytest.approx(3 / 8)


def test_window_counts_only_recent_work():
    view = ClusterView(window_s=2.0)
    view.observe_load("w", 0.0, snap(0.0))
    view.observe_load("w", 5.0, snap(5.0, prefill=5.0))            # 5 s of pure prefill ...
    view.observe_load("w", 7.0, snap(7.0, prefill=5.0, decode=2.0))  # ... then 2 s of pure decode
    c = view.view(7.0, [Member(id="w")])["cluster"]
    assert (c["prefill_util"], c["decode_util"]) == pytest.approx((0.0, 1.0))


def test_a_restarted_worker_starts_a_new_series():
    view = ClusterView(window_s=100.0)
    view.observe_load("w", 0.0, snap(0.0))
    view.observe_load("w", 50.0, snap(50.0, decode=50.0))
    view.observe_load("w", 51.0, snap(0.5))                        # restarted: clock and counters reset
    view.observe_load("w", 52.0, snap(1.5, prefill=1.0))
    c = view.view(52.0, [Member(id="w")])["cluster"]
    assert (c["prefill_util"], c["decode_util"]) == pytest.approx((1.0, 0.0))


def test_pools_and_cluster_sum_their_workers():
    view = ClusterView(window_s=10.0)
    members = [Member(id="p0", role="prefill"), Member(id="d0", role="decode"), Member(id="d1", role="decode")]
    for m, (prefill, decode, usage) in zip(members, [(8.0, 0.0, 0.1), (0.0, 6.0, 0.5), (0.0, 2.0, 0.7)], strict=True):
        view.observe_load(m.id, 0.0, snap(0.0, role=m.role))
        view.observe_load(m.id, 10.0, snap(10.0, prefill, decode, kv_usage=usage, prefix_cache_queries=100,
                                           prefix_cache_hits=25))
    v = view.view(10.0, members)
    assert v["pools"]["prefill"]["prefill_util"] == pytest.approx(0.8)
    assert v["pools"]["decode"]["decode_util"] == pytest.approx(0.4)
    assert v["pools"]["decode"]["kv_usage"] == pytest.approx(0.6)
    assert v["cluster"]["ratio"] == pytest.approx(1.0) and v["cluster"]["hit_rate"] == pytest.approx(0.25)
    assert v["cluster"]["kv_usage_max"] == pytest.approx(0.7)


def test_router_counters_give_routed_load_hit_rates_and_rejections():
    view = ClusterView(window_s=10.0)
    view.observe_counters(0.0, {"decisions": {("kv_aware", "w0"): 10.0}, "prompt_tokens": {("kv_aware",): 1000.0},
                                "cached_tokens": {("kv_aware",): 0.0}})
    view.observe_counters(10.0, {
        "decisions": {("kv_aware", "w0"): 30.0, ("kv_aware", "w1"): 10.0},
        "overflow": {("kv_aware",): 5.0},
        "prompt_tokens": {("kv_aware",): 3000.0}, "cached_tokens": {("kv_aware",): 1500.0},
        "rejections": {("429", "tokens_per_s", "acme"): 4.0, ("401", "invalid_api_key", "-"): 1.0}})
    v = view.view(10.0, [Member(id="w0"), Member(id="w1")])
    policy = v["routing"]["kv_aware"]
    assert policy["routed_per_s"] == pytest.approx(3.0) and policy["overflow_per_s"] == pytest.approx(0.5)
    assert policy["hit_rate"] == pytest.approx(0.75) and policy["decisions_total"] == 40
    assert [w["routed_per_s"] for w in v["workers"]] == pytest.approx([2.0, 1.0])
    rejections = v["rejections"]
    assert rejections["total"] == 5 and rejections["per_s"] == pytest.approx(0.5)
    assert rejections["by"][0]["reason"] == "tokens_per_s" and rejections["by_tenant"] == {"acme": 4.0, "-": 1.0}


def test_latency_percentiles_cover_the_latency_window_only():
    view = ClusterView(latency_window_s=10.0)
    view.observe_ttft(0.0, 9.0)                      # too old by the time we look
    for i in range(100):
        view.observe_ttft(20.0, (i + 1) / 1000)
    ttft = view.view(25.0, [])["latency"]["ttft"]
    assert (ttft["p50"], ttft["p99"], ttft["n"]) == (0.05, 0.099, 100)
    assert view.view(25.0, [])["latency"]["itl"]["p50"] is None


def test_stream_clock_reports_emulated_ttft_and_itl():
    got = {"ttft": [], "itl": []}

    class Sink:
        def ttft(self, s): got["ttft"].append(s)
        def itl(self, s): got["itl"].append(s)

    now = [10.0]
    clock = StreamTimings(Sink(), scale_of=lambda worker: 4.0, clock=lambda: now[0]).start(received=9.0)
    for t, count in ((10.0, 1), (10.2, 1), (10.4, 2), (11.6, 4)):   # (10.2, 1): an event with no token
        now[0] = t
        clock.seen("w", count)
    assert got["ttft"] == pytest.approx([0.25])                 # 1 s of wall at time scale 4
    assert got["itl"] == pytest.approx([0.1, 0.15, 0.15])       # a 2-token event shares its gap


def test_history_is_a_bounded_ring_read_since_a_time():
    view = ClusterView(history_len=3)
    for t in range(5):
        view.record(float(t), float(t), [])
    assert [p["t"] for p in view.history_since(None)] == [2.0, 3.0, 4.0]
    assert [p["t"] for p in view.history_since(3.0)] == [4.0]


def test_snapshot_window_keeps_a_baseline_and_forgets_the_rest():
    window = SnapshotWindow(retain_s=5.0)
    for t in range(20):
        window.add(float(t), t)
    assert len(window._items) <= 7
    (t0, _), (t1, _) = window.span(19.0, 5.0)
    assert (t0, t1) == (14.0, 19.0)
    assert percentiles([4.0, 1.0, 3.0, 2.0], (0.5, 0.99)) == [2.0, 4.0] and percentiles([], (0.5,)) == [None]


def test_sample_window_is_a_bounded_ring():
    window = SampleWindow(max_samples=10)
    for t in range(25):
        window.add(float(t), float(t))
    assert sorted(window.values(24.0, 100.0)) == [float(t) for t in range(15, 25)]
    assert sorted(window.values(24.0, 2.0)) == [22.0, 23.0, 24.0]


def test_cluster_and_dashboard_routes():
    with TestClient(create_app(RouterConfig())) as client:
        body = client.get("/cluster").json()
        assert body["cluster"]["workers"] == 0 and isinstance(body["history"], list)
        assert client.get("/cluster", params={"window": 0}).status_code == 400
        page = client.get("/dashboard")
        assert page.status_code == 200 and "/dashboard/dashboard.js" in page.text
        assert client.get("/dashboard/dashboard.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/dashboard/..%2Fserver.py").status_code == 404
