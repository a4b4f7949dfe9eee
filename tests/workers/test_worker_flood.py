"""Under a flood the KV pool fills, requests queue or get preempted, and every request still ends
cleanly: it completes, or it is refused with a 503 (bounded waiting queue). None hangs."""
import asyncio

import httpx

MODEL = "Llama-3.1-8B"
NUM_REQUESTS = 40
PROMPT, OUTPUT = 48, 48   # 6 blocks each when done; the pool of 40 blocks holds about 6 of them


async def one_request(client: httpx.AsyncClient, i: int) -> httpx.Response:
    prompt = [5000 + 100 * i + j for j in range(PROMPT)]   # distinct: no prefix sharing
    return await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": OUTPUT})


async def watch(url: str, seen: dict, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while not stop.is_set():
            load = (await client.get("/load")).json()
            seen["kv_usage"] = max(seen["kv_usage"], load["kv_usage"])
            seen["waiting"] = max(seen["waiting"], load["waiting"])
            await asyncio.sleep(0.002)


async def test_flood_fills_the_pool_and_every_request_completes_or_gets_503(start_worker):
    w = start_worker(num_blocks=40, max_waiting=12, time_scale=0.5)
    seen, stop = {"kv_usage": 0.0, "waiting": 0}, asyncio.Event()
    watcher = asyncio.create_task(watch(w.url, seen, stop))
    limits = httpx.Limits(max_connections=NUM_REQUESTS)
    async with httpx.AsyncClient(base_url=w.url, timeout=30, limits=limits) as client:
        responses = await asyncio.wait_for(
            asyncio.gather(*(one_request(client, i) for i in range(NUM_REQUESTS))), timeout=60)
    stop.set()
    await watcher

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 12 and statuses.count(503) >= 1
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == OUTPUT
        else:
            assert r.json()["error"]["code"] == "queue_full" and "retry-after" in r.headers

    load = w.load()
    assert seen["kv_usage"] >= 0.9          # the pool ran full ...
    assert load["preemptions"] > 0 or seen["waiting"] > 0   # ... so requests queued or were preempted
    assert w.metric("vllm:num_preemptions_total") == load["preemptions"]
    assert (load["running"], load["waiting"], load["kv_usage"]) == (0, 0, 0.0)
