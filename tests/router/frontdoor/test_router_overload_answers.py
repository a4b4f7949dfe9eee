"""One rule for overload answers: 503 + Retry-After when the cluster is overloaded, 429 when a tenant
is over its own limits (with Retry-After whenever waiting helps), 400 for a request too big to serve."""
import httpx

from router.forwarding.upstream import exhausted
from router.frontdoor.admission import STATUS
from router.frontdoor.tenants import TenantConfig
from tests.router_fixtures import MODEL, kill, start_router  # noqa: F401 (fixture)

TENANT_LIMITS = {"tokens_exceed_burst", "concurrency", "requests_per_s", "tokens_per_s"}


def test_every_refusal_reason_maps_by_the_rule():
    for reason, status in STATUS.items():
        expected = 503 if reason == "overloaded" else 429 if reason in TENANT_LIMITS else 400
        assert status == expected, reason
    assert exhausted(None).status == 503 and exhausted(None).headers["Retry-After"] == "1"


def test_a_cluster_with_no_worker_left_answers_503_with_retry_after(start_worker, start_router):
    worker = start_worker()
    router = start_router([worker])
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    kill(worker)
    answers = [httpx.post(router.url + "/v1/completions", json=body, timeout=10) for _ in range(2)]
    for r in answers:   # the first finds it dead and takes it out; the next finds nobody
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["type"] == "server_error"


def test_a_tenant_over_its_rate_answers_429_with_retry_after(start_worker, start_router):
    router = start_router([start_worker()], tenants=[TenantConfig("t", ["sk-t"], requests_per_s=0.01,
                                                                  requests_burst=1.0)])
    auth = {"Authorization": "Bearer sk-t"}
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    assert httpx.post(router.url + "/v1/completions", json=body, headers=auth, timeout=10).status_code == 200
    over = httpx.post(router.url + "/v1/completions", json=body, headers=auth, timeout=10)
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
