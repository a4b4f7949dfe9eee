"""The KV-aware policy follows the workers' KV events (HTTP polling or ZMQ) into the router's index."""
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.router_fixtures import MODEL, start_router  # noqa: F401 (fixture)

SYSTEM = list(range(20_000, 20_000 + 160))   # ten full blocks shared by every request below


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("transport", ["http", "zmq"])
def test_kv_aware_routes_to_the_worker_whose_cache_holds_the_prefix(start_worker, start_router, transport):
    extra = (lambda: {"kv_events_endpoint": f"tcp://127.0.0.1:{free_port()}"}) if transport == "zmq" else dict
    workers = [start_worker(worker_id=f"w{i}", **extra()) for i in range(3)]
    router = start_router(workers, policy="kv_aware", kv_events=transport, kv_events_poll_s=0.02)
    index = router.router.policies.index

    def send(suffix):
        r = httpx.post(router.url + "/v1/completions", timeout=10,
                       json={"model": MODEL, "prompt": SYSTEM + [suffix], "max_tokens": 2})
        assert r.status_code == 200
        return r.headers["x-kvlab-worker"]

    if transport == "zmq":
        time.sleep(0.3)   # a SUB socket misses what is published before it has connected (ZMQ's slow joiner)
    home = send(1)
    assert wait_for(lambda: len(index) >= 10), "the router's index never saw the worker's stored blocks"
    assert {send(s) for s in range(2, 8)} == {home}   # the cached prefix wins over equal loads
    assert router.router.subscriber.batches > 0
    assert router.metric("kvlab_router_estimated_prefix_hit_tokens_total", policy="kv_aware") >= 6 * 160


def test_a_worker_that_goes_down_is_forgotten_by_the_index(start_worker, start_router):
    from tests.router_fixtures import kill
    workers = [start_worker(worker_id=f"w{i}") for i in range(2)]
    router = start_router(workers, policy="kv_aware", kv_events_poll_s=0.02)
    index = router.router.policies.index
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": SYSTEM, "max_tokens": 1})
    home = r.headers["x-kvlab-worker"]
    assert wait_for(lambda: index.block_count(home) >= 10)
    kill(next(w for w in workers if w.config.worker_id == home))
    assert wait_for(lambda: not router.workers()[home] and index.block_count(home) == 0)


def test_a_repeated_long_prefix_is_hashed_once_then_looked_up(start_worker, start_router):
    """kv_aware walks a cached prefix block by block; the router's memo hashes each 64-block run of
    it once, and later requests with that prefix look the runs up (exported as a counter)."""
    workers = [start_worker(worker_id=f"w{i}") for i in range(2)]
    router = start_router(workers, policy="kv_aware", kv_events_poll_s=0.02)
    document = list(range(30_000, 30_000 + 16 * 64 * 2))   # two memo runs
    index = router.router.policies.index

    def send(suffix):
        r = httpx.post(router.url + "/v1/completions", timeout=10,
                       json={"model": MODEL, "prompt": document + [suffix], "max_tokens": 1})
        assert r.status_code == 200

    send(1)
    assert wait_for(lambda: len(index) >= 128)
    send(2)    # the walk through the cached document hashes both runs
    misses = router.metric("kvlab_router_hash_memo_runs_total", result="miss")
    assert misses >= 2
    send(3)
    send(4)
    assert router.metric("kvlab_router_hash_memo_runs_total", result="hit") >= 4
    assert router.metric("kvlab_router_hash_memo_runs_total", result="miss") == misses


@pytest.mark.parametrize("transport", ["http", "zmq"])
def test_a_restarted_router_knows_every_cached_document_not_only_the_replay_buffer(start_worker, start_router,
                                                                                  transport):
    # A worker that keeps only 4 batches for replay: after 8 documents, most are out of its buffer.
    extra = (lambda: {"kv_events_endpoint": f"tcp://127.0.0.1:{free_port()}"}) if transport == "zmq" else dict
    workers = [start_worker(worker_id=f"w{i}", kv_events_buffer=4, **extra()) for i in range(2)]
    docs = [list(range(40_000 + 1000 * d, 40_000 + 1000 * d + 160)) for d in range(8)]
    for doc in docs:   # cached on w0 before the router (re)starts
        assert workers[0].http.post("/v1/completions", json={"model": MODEL, "prompt": doc, "max_tokens": 1}
                                    ).status_code == 200
    assert workers[0].runtime.events.first_seq > 0   # the early batches are gone from the buffer
    router = start_router(workers, policy="kv_aware", kv_events=transport, kv_events_poll_s=0.02)
    index = router.router.policies.index
    cached = len(workers[0].runtime.engine.blocks.cached_hashes())
    assert wait_for(lambda: index.block_count("w0") == cached)
    homes = [httpx.post(router.url + "/v1/completions", timeout=10, json={"model": MODEL, "prompt": doc,
                                                                         "max_tokens": 1}).headers["x-kvlab-worker"]
             for doc in docs]
    assert homes == ["w0"] * len(docs)
    assert router.router.subscriber.snapshots >= 1
    new = list(range(90_000, 90_160))   # and batches after the snapshot still arrive
    home = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": new, "max_tokens": 1}
                      ).headers["x-kvlab-worker"]
    assert wait_for(lambda: index.match(router.router.tokenizer.route_request(new, None, None).blocks).get(home, 0)
                    >= 10)
