"""Worker failures: retry before the first token, migration mid-stream, health removal and recovery."""
import time

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from router.config import HealthConfig
from tests.router_fixtures import MODEL, kill, sse_frames, start_router, stream_completion, stream_text  # noqa: F401 (fixture)

SLOW = {"time_scale": 4.0}   # ~30 ms a token on the wall clock: time to kill a worker mid-stream


def wait_for(condition, timeout=5.0, step=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def expected_text(worker, prompt, max_tokens):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    return httpx.post(worker.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]


def read_then_kill(router, workers, body, path, after_events=6):
    """Stream `body`, kill the serving worker after a few events, and return (events, killed id)."""
    by_id = {w.config.worker_id: w for w in workers}
    events, killed = [], None
    with httpx.stream("POST", router.url + path, json={**body, "stream": True}, timeout=30) as r:
        serving = r.headers["x-kvlab-worker"]
        for event in sse_frames(r):
            events.append(event)
            if len(events) == after_events and killed is None:
                kill(by_id[serving])
                killed = serving
    return events, killed


def decode_events(raw_events):
    import msgspec
    out = []
    for e in raw_events:
        data = e.removeprefix(b"data: ")
        out.append("[DONE]" if data == b"[DONE]" else msgspec.json.decode(data))
    return out


def test_a_worker_killed_mid_stream_is_migrated_and_the_client_gets_one_complete_stream(start_worker, start_router):
    workers = [start_worker(worker_id=f"w{i}", **SLOW) for i in range(3)]
    router = start_router(workers, policy="prefix_bounded")
    prompt = "Tell me a long story about a lighthouse keeper and the sea"
    raw, killed = read_then_kill(router, workers, {"model": MODEL, "prompt": prompt, "max_tokens": 30},
                                 "/v1/completions")
    events = decode_events(raw)
    survivor = next(w for w in workers if w.config.worker_id != killed)
    assert killed is not None
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert stream_text(events) == expected_text(survivor, prompt, 30)    # exactly the tokens it would have made
    assert len({e["id"] for e in events[:-1]}) == 1                       # one response id throughout
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]] == ["length"]
    assert router.metric("kvlab_router_retries_total", kind="migration") == 1
    assert router.workers()[killed] is False
    assert killed not in router.router.policies.get("prefix_bounded").ring.members


def test_a_migrated_chat_stream_keeps_its_format_and_usage(start_worker, start_router):
    workers = [start_worker(worker_id=f"w{i}", **SLOW) for i in range(2)]
    router = start_router(workers, policy="round_robin")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count slowly to twenty."}], "max_tokens": 20,
            "stream_options": {"include_usage": True}}
    raw, killed = read_then_kill(router, workers, body, "/v1/chat/completions", after_events=5)
    events = decode_events(raw)
    chunks = [e for e in events if isinstance(e, dict)]
    assert killed is not None and events[-1] == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len(stream_text(events).split()) == 20
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 20
    survivor = next(w for w in workers if w.config.worker_id != killed)
    direct = httpx.post(survivor.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30).json()
    assert usage["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert stream_text(events) == direct["choices"][0]["message"]["content"]


def test_a_dead_worker_is_retried_before_the_first_token_and_leaves_routing(start_worker, start_router):
    workers = [start_worker(worker_id=f"w{i}") for i in range(3)]
    # Probes far apart: only live traffic can discover the dead worker.
    router = start_router(workers, policy="prefix_ring", health=HealthConfig(interval_s=60, failures_to_remove=1))
    kill(workers[1])
    for i in range(12):
        body = {"model": MODEL, "prompt": f"request number {i} with its own prefix", "max_tokens": 3}
        assert httpx.post(router.url + "/v1/completions", json=body, timeout=10).status_code == 200
        response, events = stream_completion(router.url, body)
        assert response.status_code == 200 and events[-1] == "[DONE]" and len(stream_text(events).split()) == 3
    assert router.metric("kvlab_router_retries_total", kind="retry") >= 1
    assert router.workers() == {"w0": True, "w1": False, "w2": True}


def test_when_no_worker_is_left_the_stream_ends_with_an_error_event_then_done(start_worker, start_router):
    worker = start_worker(worker_id="only", **SLOW)
    router = start_router([worker])
    started = time.monotonic()
    raw, killed = read_then_kill(router, [worker], {"model": MODEL, "prompt": "doomed", "max_tokens": 30},
                                 "/v1/completions", after_events=3)
    events = decode_events(raw)
    assert killed == "only" and time.monotonic() - started < 10
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert set(events[-2]["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=5)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker_available"


class FlakyWorker:
    """A stand-in worker whose /load can be made to fail, to drive the router's health checks."""

    def __init__(self):
        self.ok = True
        self.probes = 0
        self.app = Starlette(routes=[Route("/load", self.load), Route("/health", self.load),
                                     Route("/v1/models", self.models)])

    async def load(self, request):
        self.probes += 1
        if not self.ok:
            return JSONResponse({"status": "sick"}, status_code=503)
        return JSONResponse({"worker_id": "flaky", "running": 0, "waiting": 0, "kv_usage": 0.0})

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [{"id": MODEL}]})


def test_after_start_up_the_next_probe_round_waits_a_whole_interval(start_router, serve):
    # Start-up probes every worker once; an immediate second round would race whatever a test (or an
    # operator) does to the workers right after start-up, e.g. take the discovery of a dead worker
    # away from live traffic.
    flaky = FlakyWorker()
    server = serve(flaky.app)

    class Declared:   # what router_app reads from a worker
        url = server.url
        config = type("C", (), {"worker_id": "flaky", "role": "both", "kv_events_endpoint": None})

    router = start_router([Declared], health=HealthConfig(interval_s=60, failures_to_remove=1))
    assert router.workers() == {"flaky": True}
    time.sleep(0.5)
    assert flaky.probes == 1


def test_health_checks_remove_a_sick_worker_from_the_ring_and_bring_it_back(start_worker, start_router, serve):
    flaky = FlakyWorker()
    server = serve(flaky.app)
    real = start_worker(worker_id="real")
    router = start_router([real], policy="prefix_bounded", admin_token="t",
                          health=HealthConfig(interval_s=0.05, failures_to_remove=2))
    assert httpx.post(router.url + "/admin/workers", json={"url": server.url, "id": "flaky"},
                      headers={"Authorization": "Bearer t"}).status_code == 201
    ring = lambda: router.router.policies.get("prefix_bounded").ring.members  # noqa: E731
    assert wait_for(lambda: ring() == {"real", "flaky"})
    flaky.ok = False
    assert wait_for(lambda: not router.workers()["flaky"] and ring() == {"real"})
    flaky.ok = True
    assert wait_for(lambda: router.workers()["flaky"] and ring() == {"real", "flaky"})


def test_streams_on_a_worker_the_probe_marks_down_migrate_at_once_not_after_the_idle_timeout(start_worker,
                                                                                             start_router):
    from router.config import Timeouts
    from tests.router_fixtures import freeze
    workers = [start_worker(worker_id=f"w{i}", **SLOW) for i in range(2)]
    freeze_s = 8.0
    router = start_router(workers, policy="prefix_bounded", timeouts=Timeouts(health_s=0.3, idle_s=30.0),
                          health=HealthConfig(interval_s=0.2, failures_to_remove=2))
    prompt = "Tell me a long story about a lighthouse keeper and the sea"
    by_id = {w.config.worker_id: w for w in workers}
    arrivals, frozen = [], None
    with httpx.stream("POST", router.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 60, "stream": True}) as r:
        serving = r.headers["x-kvlab-worker"]
        for event in sse_frames(r):
            arrivals.append((time.perf_counter(), event))
            if len(arrivals) == 5 and frozen is None:
                freeze(by_id[serving], freeze_s)   # hung, not dead: its connections stay open
                frozen = serving
    events = decode_events([e for _, e in arrivals])
    assert events[-1] == "[DONE]" and not any("error" in e for e in events if isinstance(e, dict))
    survivor = next(w for w in workers if w.config.worker_id != frozen)
    assert stream_text(events) == expected_text(survivor, prompt, 60)   # exactly the tokens, none twice
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
    # Migrated when the probe marked the worker down, well before the worker came back by itself.
    assert max(gaps) < freeze_s / 2, max(gaps)
    assert router.metric("kvlab_router_retries_total", kind="migration") >= 1


def test_a_stalled_stream_abandoned_twice_fails_once_cleanly():
    """Suspected after a failed probe, then marked down: the second abandon must not raise."""
    import asyncio

    from router.config import Timeouts
    from router.forwarding.upstream import UpstreamFailure, UpstreamStream

    class Silent:   # a worker response whose body never sends another byte
        stream = None

        async def aclose(self):
            pass

    async def never():
        await asyncio.sleep(3600)
        yield b""

    async def scenario():
        response = Silent()
        response.stream = never()
        stream = UpstreamStream("w0", response, Timeouts(idle_s=30.0))
        stream._started = True
        read = asyncio.ensure_future(stream.next_events())
        await asyncio.sleep(0.05)
        assert stream.silent_for() > 0
        stream.abandon("worker stalled")
        stream.abandon("worker marked down")
        try:
            await asyncio.wait_for(read, 5)
        except UpstreamFailure as failure:
            return failure
        return None

    failure = asyncio.run(scenario())
    assert failure is not None and failure.dead and failure.reason == "worker stalled"
