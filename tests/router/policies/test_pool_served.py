"""The pool's bookkeeping read on every request, kept current though it is not recomputed per request
(router.pool.worker_pool): what the up workers serve (models, context length) follows their health and
model reports; the in-flight gauge shows the counts when scraped."""
import httpx

from router.config import HealthConfig, Timeouts, WorkerConfig
from router.observability.metrics import RouterMetrics
from router.pool.worker_pool import Worker, WorkerPool

CARDS = {"a": [{"id": "m1", "max_model_len": 4096}], "b": [{"id": "m2", "max_model_len": 8192}, {"id": "m1"}]}


def _pool(alive: set[str]) -> WorkerPool:
    """Workers a and b; a probe of a worker not in `alive` fails."""
    def answer(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host not in alive:
            return httpx.Response(503)
        return httpx.Response(200, json={"data": CARDS[host]} if request.url.path == "/v1/models" else {})
    return WorkerPool(httpx.AsyncClient(transport=httpx.MockTransport(answer)),
                      HealthConfig(failures_to_remove=1), Timeouts(), RouterMetrics())


async def test_served_models_and_context_follow_workers_going_down_coming_back_and_leaving():
    alive = {"a", "b"}
    pool = _pool(alive)
    for worker_id in ("a", "b"):
        await pool.add(WorkerConfig(url=f"http://{worker_id}", id=worker_id))
    assert pool.models() == ["m1", "m2"] and pool.context_length() == 8192
    alive.discard("b")
    await pool.probe(pool["b"])
    assert pool.models() == ["m1"] and pool.context_length() == 4096
    pool.report_failure("a", "reset")
    assert pool.models() == [] and pool.context_length() is None
    alive.update({"a", "b"})
    await pool.probe(pool["b"])
    assert pool.models() == ["m2", "m1"] and pool.context_length() == 8192
    await pool.probe(pool["a"])
    pool.remove("b")
    assert pool.models() == ["m1"] and pool.context_length() == 4096


def test_the_in_flight_gauge_shows_each_workers_count_when_scraped():
    metrics = RouterMetrics()
    worker = Worker(WorkerConfig(url="http://a", id="a"), metrics)
    worker.charge()
    worker.charge()
    assert b'kvlab_router_in_flight{worker="a"} 2.0' in metrics.render()
    worker.release()
    assert b'kvlab_router_in_flight{worker="a"} 1.0' in metrics.render()
