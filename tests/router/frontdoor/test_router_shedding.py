"""Load shedding against the TTFT SLO, and requests abandoned by their clients."""
import asyncio
import time

import httpx

from router.config import HealthConfig, SheddingConfig
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
    # The queue fills to the limit (DrainLimit.min_queue = 8 places, a newcomer's own included) and no further.
    def flood_shed() -> float:
        return router.metric("kvlab_router_rejections_total", status="503", reason="overloaded", tenant="-")
    assert wait_for(lambda: router.router.queue_depth() >= 7)
    assert wait_for(lambda: sum(router.in_flight().values()) + flood_shed() == 14)   # every flood request placed
    shed = flood_shed()
    started = time.perf_counter()
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "one more", "max_tokens": 2})
    assert time.perf_counter() - started < 0.5                  # answered at once, not queued
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    assert int(r.headers["Retry-After"]) >= 1
    assert router.metric("kvlab_router_rejections_total", status="503", reason="overloaded", tenant="-") == shed + 1
    background.join()
    gave_up = time.monotonic()
    # The flood's clients gave up: the router closed their upstream requests and the worker dropped them.
    held = lambda: worker.load()["running"] + worker.load()["waiting"]   # noqa: E731
    assert wait_for(lambda: held() == 0, timeout=5), (   # what a failure needs to be told apart
        f"{time.monotonic() - gave_up:.1f} s after the clients left: worker {worker.load()}, "
        f"router in flight {router.in_flight()}")


def test_the_queue_estimate_counts_what_was_sent_since_the_last_load_report():
    from router.pool.worker_pool import waiting_now
    # A worker with a queue at the poll is saturated: every request sent since queues, every finish lets one in.
    assert waiting_now(waiting=3, running=2, slots=2, sent_since=5) == 8
    assert waiting_now(waiting=3, running=2, slots=2, sent_since=-2) == 1
    assert waiting_now(waiting=3, running=2, slots=2, sent_since=-9) == 0
    # Free slots take new requests before any waits.
    assert waiting_now(waiting=0, running=0, slots=2, sent_since=2) == 0
    assert waiting_now(waiting=0, running=1, slots=2, sent_since=4) == 3
    # Slots unknown (no /load from the worker): the poll is all there is.
    assert waiting_now(waiting=0, running=0, slots=None, sent_since=9) == 0


def test_a_stream_in_transit_when_a_load_report_is_read_still_counts_as_queued():
    from router.config import WorkerConfig
    from router.observability.metrics import RouterMetrics
    from router.pool.worker_pool import LoadReport, Worker
    worker = Worker(WorkerConfig(url="http://w", id="w"), RouterMetrics())
    worker.read_load(LoadReport(running=2, waiting=3, max_num_seqs=2))
    worker.charge()
    worker.in_transit += 1          # sent, no headers yet: the worker's next report cannot include it
    worker.read_load(LoadReport(running=2, waiting=3, max_num_seqs=2))
    assert worker.queued() == 4     # without the in-transit count the report would reset it to 3
    worker.in_transit -= 1          # headers came back: the next report includes it
    worker.read_load(LoadReport(running=2, waiting=4, max_num_seqs=2))
    assert worker.queued() == 4


def test_a_burst_between_two_load_polls_is_shed_at_the_limit_not_after_the_next_poll(start_worker, start_router):
    # One sequence slot; the limit is floor(1.0 s / 0.25 s) = 4 places: one running and three waiting are
    # admitted, then the queue is full. The poll never comes during the burst (every 60 s), so a shedder
    # that trusted it would see an idle worker and admit every request.
    worker = start_worker(worker_id="w0", time_scale=5.0, max_num_seqs=1)
    router = start_router([worker], health=HealthConfig(interval_s=60.0, failures_to_remove=1),
                          shedding=SheddingConfig(enabled=True, ttft_slo_s=1.0, prefill_s=0.0, drain_s=0.25))

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(i: int) -> int:
                r = await client.post(router.url + "/v1/completions",
                                      json={"model": MODEL, "prompt": f"burst {i}", "max_tokens": 8})
                return r.status_code
            return await asyncio.gather(*(one(i) for i in range(12)))

    statuses = asyncio.run(burst())
    assert sorted(statuses) == [200] * 5 + [503] * 7, statuses
    assert router.router.pool["w0"].view.waiting == 0   # no poll came: the refusals came from the estimate
