"""slo_aware behind the HTTP router: SLO headers enforced (400 on a bad value, 429 with the reason when
no worker is predicted to meet them) and the TTFT prediction's error exported per request."""
import httpx
import msgspec
import pytest

from emulator.spec import load_spec
from router.policies.slo_table import from_spec
from tests.router_fixtures import MODEL, module_cluster, stream_completion

# The test workers run the default spec's model and GPU at time scale 1.
TABLE = msgspec.structs.replace(from_spec(load_spec("default")), time_scale=1.0)
PROMPT = list(range(2000, 2600))


@pytest.fixture(scope="module")
def cluster():
    with module_cluster([{"worker_id": "w0"}, {"worker_id": "w1"}], policy="slo_aware", slo_table=TABLE) as (r, _):
        yield r


def post(url: str, headers: dict, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **body},
                      headers=headers, timeout=30)


def test_a_malformed_slo_header_is_a_400_naming_it(cluster):
    r = post(cluster.url, {"x-slo-tpot-ms": "fast"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "x-slo-tpot-ms" and "x-slo-tpot-ms" in error["message"]


def test_an_slo_no_worker_can_meet_is_refused_early_with_429_and_the_reason(cluster):
    before = cluster.metric("kvlab_router_decisions_total", policy="slo_aware", worker="w0") + \
        cluster.metric("kvlab_router_decisions_total", policy="slo_aware", worker="w1")
    r = post(cluster.url, {"x-slo-ttft-ms": "1"})
    assert r.status_code == 429
    error = r.json()["error"]
    assert error["code"] == "slo_unattainable" and error["type"] == "rate_limit_error"
    assert "first token within" in error["message"]
    after = cluster.metric("kvlab_router_decisions_total", policy="slo_aware", worker="w0") + \
        cluster.metric("kvlab_router_decisions_total", policy="slo_aware", worker="w1")
    assert after == before   # refused before any worker was charged
    assert cluster.metric("kvlab_router_rejections_total", status="429", reason="slo_unattainable", tenant="-") >= 1


def test_a_meetable_slo_is_served_and_its_prediction_error_exported(cluster):
    count = cluster.metric("kvlab_router_ttft_prediction_error_ratio_count", policy="slo_aware")
    r, events = stream_completion(cluster.url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 4},
                                  headers={"x-slo-ttft-ms": "5000", "x-slo-tpot-ms": "1000"})
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert cluster.metric("kvlab_router_ttft_prediction_error_ratio_count", policy="slo_aware") == count + 1
    assert len(cluster.router.proxy.slo.ledger) == 0   # settled and forgotten when the stream ended


def test_non_streamed_requests_leave_the_ledger_clean(cluster):
    assert post(cluster.url, {"x-slo-ttft-ms": "5000"}).status_code == 200
    assert len(cluster.router.proxy.slo.ledger) == 0
