"""The Locust measurement helper times TTFT and inter-token gaps as a client sees them.

Against a stub with exact timing, then against a real kvlab worker on loopback, whose emulated
latencies come from the roofline (so the expected numbers are known in advance).
"""
from __future__ import annotations

import statistics

import httpx
import pytest

from emulator.physics import roofline
from loadtests.fake_openai import FakeOpenAI
from loadtests.fast_http import FastClient
from loadtests.llm_measure import StreamResult, fire_locust_events, record, stream_request


@pytest.fixture
def fake():
    servers = []

    def _start(**kw) -> FakeOpenAI:
        servers.append(FakeOpenAI(**kw).start())
        return servers[-1]

    yield _start
    for s in servers:
        s.stop()


CLIENTS = {"httpx": lambda url: httpx.Client(base_url=url),
           "fast": lambda url: FastClient(url, max_connections=8, timeout_s=5)}   # the load generator's


@pytest.mark.parametrize("kind", CLIENTS)
def test_ttft_and_gaps_match_a_server_with_known_timing(fake, kind):
    server = fake(ttft_s=0.08, gap_s=0.02)
    with CLIENTS[kind](server.url) as client:
        result = stream_request(client, "/v1/chat/completions",
                                {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12})
    assert result.ok and result.status == 200
    # The first token, not the stream's end: 11 gaps of 0.02 s still follow it (no wall-clock ceiling).
    assert result.ttft_s >= 0.075 and result.e2e_s - result.ttft_s >= 11 * 0.02 * 0.9
    assert len(result.gaps_s) == 11 and result.output_tokens == 12 and result.chunks == 12
    assert statistics.median(result.gaps_s) == pytest.approx(0.02, abs=0.005)
    assert result.e2e_s >= result.ttft_s + sum(result.gaps_s) - 1e-6
    assert result.text == " tok" * 12
    body = server.received[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("kind", CLIENTS)
def test_completions_api_is_timed_the_same_way(fake, kind):
    server = fake(ttft_s=0.03, gap_s=0.01)
    with CLIENTS[kind](server.url) as client:
        results = [stream_request(client, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 5})
                   for _ in range(3)]   # one after another: a kept-alive connection serves the next whole
    assert all(r.ok and r.output_tokens == 5 and len(r.gaps_s) == 4 for r in results)
    assert len(server.received) == 3


@pytest.mark.parametrize("kind", CLIENTS)
def test_http_errors_and_refused_connections_are_results_not_exceptions(fake, kind):
    server = fake(status=429)
    with CLIENTS[kind](server.url) as client:
        refused = stream_request(client, "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
    assert not refused.ok and refused.status == 429 and "HTTP 429" in refused.error and "refused" in refused.error
    with CLIENTS[kind]("http://127.0.0.1:9") as client:   # discard port: nothing listens
        down = stream_request(client, "/v1/completions", {"model": "m", "prompt": "x"}, timeout=2)
    assert not down.ok and down.status == 0 and down.error


class _Hook:
    def __init__(self):
        self.calls = []

    def fire(self, **kw):
        self.calls.append(kw)


class _Events:
    def __init__(self):
        self.request = _Hook()


def test_locust_rows_for_ttft_itl_e2e_and_tokens():
    result = StreamResult(sent_at=0.0, status=200, ttft_s=0.1, e2e_s=0.5, gaps_s=[0.1, 0.2, 0.1], chunks=4,
                          usage={"completion_tokens": 4})
    events = _Events()
    fire_locust_events(events, result, "chat")
    rows = [(c["request_type"], c["response_time"]) for c in events.request.calls]
    assert rows == [("TTFT", 100.0), ("ITL", 100.0), ("ITL", 200.0), ("ITL", 100.0), ("E2E", 500.0), ("TOKENS", 4)]
    assert all(c["exception"] is None and c["name"] == "chat" for c in events.request.calls)
    events = _Events()
    fire_locust_events(events, result, "chat", per_gap=False)
    assert [c["response_time"] for c in events.request.calls if c["request_type"] == "ITL"] == [pytest.approx(400 / 3)]


def test_locust_rows_are_in_the_servers_time():
    """Against an emulated cluster at time scale 10, 1 s of wall time is 100 emulated ms."""
    result = StreamResult(sent_at=0.0, status=200, ttft_s=1.0, e2e_s=5.0, gaps_s=[2.0], chunks=2,
                          usage={"completion_tokens": 2})
    events = _Events()
    fire_locust_events(events, result, "chat", time_scale=10.0)
    rows = [(c["request_type"], c["response_time"]) for c in events.request.calls]
    assert rows == [("TTFT", 100.0), ("ITL", 200.0), ("E2E", 500.0), ("TOKENS", 2)]


def test_a_failed_request_is_one_failed_e2e_row():
    events = _Events()
    fire_locust_events(events, StreamResult(sent_at=0.0, status=503, e2e_s=0.01, error="HTTP 503: busy"), "rag")
    (call,) = events.request.calls
    assert call["request_type"] == "E2E" and "503" in str(call["exception"])


def test_record_is_json_ready_with_raw_gaps():
    r = record(StreamResult(sent_at=1.0, status=200, ttft_s=0.1, e2e_s=0.3, gaps_s=[0.1234567], chunks=2,
                            usage={"prompt_tokens": 7, "completion_tokens": 2,
                                   "prompt_tokens_details": {"cached_tokens": 5}}), id="r1", stage=3)
    assert r["gaps"] == [0.123457] and r["tokens"] == 2 and r["cached_tokens"] == 5 and r["stage"] == 3


@pytest.mark.slow
@pytest.mark.solo
def test_a_real_worker_measures_as_the_roofline_predicts(start_worker):
    """A time scale of 5 makes each emulated step 5x longer on the wall clock, so the client's TTFT and
    ITL divided by 5 must land on the roofline's prefill and decode times (HTTP adds a few wall ms)."""
    scale, prompt, output = 5.0, 4000, 40
    worker = start_worker(time_scale=scale)
    stream_request(worker.http, "/v1/completions", {"model": "Llama-3.1-8B", "prompt": [7] * 64, "max_tokens": 2})
    results = []
    for i in range(3):   # distinct prompts: no prefix-cache hits
        body = {"model": "Llama-3.1-8B", "prompt": [1000 + i] * prompt, "max_tokens": output, "ignore_eos": True}
        results.append(stream_request(worker.http, "/v1/completions", body))
    assert all(r.ok and r.output_tokens == output and len(r.gaps_s) == output - 1 for r in results)
    dep = worker.runtime.engine.dep
    prefill = roofline.prefill_time(dep, prompt).seconds
    decode = roofline.decode_time(dep, [prompt + output // 2]).seconds
    assert statistics.median(r.ttft_s for r in results) / scale == pytest.approx(prefill, rel=0.10)
    assert statistics.median(g for r in results for g in r.gaps_s) / scale == pytest.approx(decode, rel=0.10)
