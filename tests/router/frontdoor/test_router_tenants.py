"""Tenants through the router: per-tenant limits answer 429 without touching other tenants, token limits
count tokens, and salted tenants never share a KV block."""
import statistics
import threading
import time

import httpx
import pytest

from router.frontdoor.tenants import TenantConfig
from tests.router_fixtures import MODEL, module_cluster

TENANTS = [
    TenantConfig("flood", ["sk-flood"], requests_per_s=2.0),
    TenantConfig("steady", ["sk-steady"]),
    TenantConfig("tokens", ["sk-tokens"], tokens_per_s=10.0, tokens_burst=600.0),
    TenantConfig("salty-a", ["sk-a"], cache_salt=True),
    TenantConfig("salty-b", ["sk-b"], cache_salt=True),
    TenantConfig("plain", ["sk-plain"]),
]


@pytest.fixture(scope="module")
def cluster():
    with module_cluster([{"worker_id": "w0"}], tenants=TENANTS) as running:
        yield running


def post(router, key, body, timeout=30.0):
    return httpx.post(router.url + "/v1/completions", json={"model": MODEL, **body},
                      headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def latencies(router, key, n):
    out = []
    for i in range(n):
        started = time.perf_counter()
        assert post(router, key, {"prompt": f"steady request {i}", "max_tokens": 2}).status_code == 200
        out.append(time.perf_counter() - started)
    return out


def test_a_tenant_over_its_rate_gets_429_while_another_keeps_its_latency(cluster):
    router, _ = cluster
    baseline = statistics.median(latencies(router, "sk-steady", 10))
    answers: list[httpx.Response] = []

    def flood():
        with httpx.Client(timeout=30) as client:
            for i in range(40):
                answers.append(client.post(router.url + "/v1/completions", headers={"Authorization": "Bearer sk-flood"},
                                           json={"model": MODEL, "prompt": f"flood {i}", "max_tokens": 2}))

    flooder = threading.Thread(target=flood)
    flooder.start()
    during = statistics.median(latencies(router, "sk-steady", 10))
    flooder.join()
    refused = [r for r in answers if r.status_code == 429]
    assert len(refused) >= 30 and all(r.status_code in (200, 429) for r in answers)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert {r.json()["error"]["code"] for r in refused} == {"requests_per_s"}
    assert refused[0].json()["error"]["type"] == "rate_limit_error"
    assert during <= 1.5 * baseline + 0.02, (baseline, during)
    assert router.metric("kvlab_router_rejections_total", status="429", reason="requests_per_s", tenant="flood") >= 30


def test_token_limits_count_tokens_not_requests_and_settle_with_usage(cluster):
    router, _ = cluster
    # Ten small requests (~10 tokens each) fit a 600-token burst at once...
    assert all(post(router, "sk-tokens", {"prompt": [7, 8, 9, 10], "max_tokens": 5}).status_code == 200
               for _ in range(10))
    # ...one request reserving more than what is left does not, though it is a single request.
    big = post(router, "sk-tokens", {"prompt": [7, 8, 9, 10], "max_tokens": 550})
    assert big.status_code == 429 and big.json()["error"]["code"] == "tokens_per_s"
    assert int(big.headers["Retry-After"]) >= 1
    over_burst = post(router, "sk-tokens", {"prompt": [7, 8, 9, 10], "max_tokens": 700})
    assert over_burst.status_code == 429 and over_burst.json()["error"]["code"] == "tokens_exceed_burst"
    assert "Retry-After" not in over_burst.headers   # waiting cannot make it fit
    # ~510 tokens are left (10/s refill is negligible here). A 494-token reservation that stops after one
    # token (EOS) is refunded down to the 5 tokens it used, so a second one fits too.
    stop_early = {"prompt": [7, 8, 9, 10], "max_tokens": 490, "eos_probability": 1.0}
    first = post(router, "sk-tokens", stop_early)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 1
    assert post(router, "sk-tokens", stop_early).status_code == 200


def test_salted_tenants_share_no_blocks_even_with_the_same_prompt(cluster):
    router, worker = cluster[0], cluster[1][0]
    prompt = list(range(5000, 5000 + 96))   # six full blocks

    def cached(key, **extra):
        r = post(router, key, {"prompt": prompt, "max_tokens": 1, **extra})
        assert r.status_code == 200
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("sk-a") == 0
    assert cached("sk-a") == 80                      # its own prefix is reused (5 blocks; the last recomputed)
    hits_before = worker.metric("vllm:prefix_cache_hits_total")
    assert cached("sk-b") == 0                       # same prompt, other tenant: nothing shared
    assert cached("sk-plain") == 0                   # an unsalted tenant does not see it either...
    assert cached("sk-plain", cache_salt="salty-a") == 0   # ...even guessing the other tenant's salt
    assert worker.metric("vllm:prefix_cache_hits_total") == hits_before
