"""Load shedding against the TTFT SLO, and requests abandoned by their clients."""
import asyncio
import time

import httpx

from router.config import SheddingConfig
from tests.router_fixtures import MODEL, start_router  # noqa: F401 (fixture)

SLOW = {"time_scale": 5.0, "max_num_seqs": 1}   # one request at a time, ~35 ms a token: a queue builds


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


async def flood(url: str, n: int, seconds: float) -> None:
    """n long requests that the client gives up on after `seconds` (the router must abort them)."""
    async with httpx.AsyncClient(timeout=seconds) as client:
        async def one(i):
            try:
                await client.post(url + "/v1/completions",
                                  json={"model": MODEL, "prompt": f"long {i}", "max_tokens": 200})
            except httpx.TimeoutException:
                pass
        await asyncio.gather(*(one(i) for i in range(n)))


def test_a_queue_past_the_slo_sheds_new_requests_early_and_abandoned_requests_are_aborted(start_worker, start_router):
    import threading
    worker = start_worker(worker_id="w0", **SLOW)
    router = start_router([worker], shedding=SheddingConfig(enabled=True, ttft_slo_s=0.1))
    background = threading.Thread(target=lambda: asyncio.run(flood(router.url, 14, 3.0)))
    background.start()
    assert wait_for(lambda: router.router.queue_depth() > 8)   # the workers' waiting queues, via /load
    started = time.perf_counter()
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "one more", "max_tokens": 2})
    assert time.perf_counter() - started < 0.5                  # answered at once, not queued
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    assert int(r.headers["Retry-After"]) >= 1
    assert router.metric("kvlab_router_rejections_total", status="503", reason="overloaded", tenant="-") == 1
    background.join()
    # The flood's clients gave up: the router closed their upstream requests and the worker dropped them.
    assert wait_for(lambda: worker.load()["running"] + worker.load()["waiting"] == 0, timeout=5)
