"""A client that goes away mid-request frees its KV blocks: streaming, non-streaming and queued."""
import asyncio
import time

import httpx

MODEL = "Llama-3.1-8B"
LONG = {"model": MODEL, "prompt": list(range(3000, 3200)), "max_tokens": 2000}   # ~12 s of decode


def wait_until_idle(worker, timeout_s: float = 3.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        load = worker.load()
        if (load["running"], load["waiting"], load["kv_usage"]) == (0, 0, 0.0) or time.monotonic() > deadline:
            return load
        time.sleep(0.02)


def test_streaming_client_that_disconnects_frees_its_blocks(worker):
    with httpx.stream("POST", worker.url + "/v1/completions", json={**LONG, "stream": True}, timeout=10) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert worker.load()["kv_usage"] > 0
    load = wait_until_idle(worker)
    assert (load["running"], load["kv_usage"]) == (0, 0.0)
    assert 'finished_reason="abort"' in httpx.get(worker.url + "/metrics").text


def test_non_streaming_client_that_times_out_frees_its_blocks(worker):
    try:
        httpx.post(worker.url + "/v1/completions", json=LONG, timeout=0.3)
        raise AssertionError("the request should have outlived the client's timeout")
    except httpx.ReadTimeout:
        pass
    load = wait_until_idle(worker)
    assert (load["running"], load["kv_usage"]) == (0, 0.0)


async def test_queued_requests_of_a_cancelled_client_leave_the_queue(start_worker):
    w = start_worker(max_num_seqs=1)
    async with httpx.AsyncClient(base_url=w.url, timeout=10) as client:
        tasks = [asyncio.create_task(client.post("/v1/completions", json={**LONG, "stream": stream}))
                 for stream in (False, True, False)]
        await asyncio.sleep(0.3)
        assert w.load()["waiting"] == 2
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    load = await asyncio.to_thread(wait_until_idle, w)
    assert (load["running"], load["waiting"], load["kv_usage"]) == (0, 0, 0.0)
