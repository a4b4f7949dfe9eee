"""Every malformed or refused request gets the right 4xx with an OpenAI error body, and the router keeps serving."""
import httpx
import pytest

from router.config import Limits
from router.frontdoor.tenants import TenantConfig
from tests.router_fixtures import MODEL, module_cluster

KEY = {"Authorization": "Bearer sk-good"}


@pytest.fixture(scope="module")
def router():
    limits = Limits(max_body_bytes=64 * 1024, max_input_tokens=64, max_tokens_limit=100)
    tenants = [TenantConfig("t", ["sk-good"], choose_policy=True), TenantConfig("u", ["sk-plain"])]
    with module_cluster([{}], limits=limits, tenants=tenants) as (router, _):
        yield router


def post(router, body=None, content=None, headers=KEY, path="/v1/completions"):
    return httpx.post(router.url + path, json=body, content=content, headers=headers, timeout=10)


CASES = [
    ("malformed JSON", dict(content=b'{"model": "x", "prompt": '), 400, None),
    ("not an object", dict(content=b"[1, 2]"), 400, None),
    ("wrong type", dict(body={"model": MODEL, "prompt": "hi", "max_tokens": "ten"}), 400, "max_tokens"),
    ("missing prompt", dict(body={"model": MODEL}), 400, "prompt"),
    ("empty prompt", dict(body={"model": MODEL, "prompt": ""}), 400, "prompt"),
    ("empty token list", dict(body={"model": MODEL, "prompt": []}), 400, "prompt"),
    ("negative token id", dict(body={"model": MODEL, "prompt": [5, -2]}), 400, "prompt"),
    ("token id past int32", dict(body={"model": MODEL, "prompt": [5, 2**31]}), 400, "prompt"),
    ("empty chat", dict(body={"model": MODEL, "messages": []}, path="/v1/chat/completions"), 400, "messages"),
    ("prompt over the limit", dict(body={"model": MODEL, "prompt": list(range(1000, 1065))}), 400, "prompt"),
    ("max_tokens zero", dict(body={"model": MODEL, "prompt": "hi", "max_tokens": 0}), 400, "max_tokens"),
    ("max_tokens negative", dict(body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                       "max_completion_tokens": -3}, path="/v1/chat/completions"),
     400, "max_completion_tokens"),
    ("max_tokens over the limit", dict(body={"model": MODEL, "prompt": "hi", "max_tokens": 101}), 400, "max_tokens"),
    ("unknown model", dict(body={"model": "gpt-9", "prompt": "hi"}), 404, "model"),
    ("no API key", dict(body={"model": MODEL, "prompt": "hi"}, headers={}), 401, None),
    ("invalid API key", dict(body={"model": MODEL, "prompt": "hi"}, headers={"Authorization": "Bearer sk-bad"}),
     401, None),
    ("huge body", dict(content=b'{"model": "' + b"x" * 70_000 + b'", "prompt": "hi"}'), 413, None),
    ("JSON nested too deeply", dict(content=b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
     400, None),
    ("deep JSON in a chat", dict(content=b'{"model": "m", "messages": [], "kv_transfer_params": {"a": '
                                 + b"[" * 5000 + b"]" * 5000 + b"}}", path="/v1/chat/completions"), 400, None),
    ("client kv_transfer_params", dict(body={"model": MODEL, "prompt": "hi", "kv_transfer_params": {
        "do_remote_prefill": True, "remote_url": "http://169.254.169.254", "remote_request_id": "x",
        "first_token": 1}}), 400, "kv_transfer_params"),
    ("policy override without permission", dict(body={"model": MODEL, "prompt": "hi"}, headers={
        "Authorization": "Bearer sk-plain", "x-kvlab-policy": "round_robin"}), 403, "x-kvlab-policy"),
]


@pytest.mark.parametrize("name,kwargs,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_requests_get_an_openai_error_and_the_router_keeps_serving(router, name, kwargs, status, param):
    r = post(router, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    ok = post(router, {"model": MODEL, "prompt": "still there?", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_unknown_paths_and_methods_answer_in_openai_shape(router):
    r = httpx.get(router.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(router.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_an_unknown_policy_override_is_a_400(router):
    r = post(router, {"model": MODEL, "prompt": "hi"}, headers={**KEY, "x-kvlab-policy": "telepathy"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-kvlab-policy"


def test_a_permitted_tenant_may_choose_the_policy(router):
    r = post(router, {"model": MODEL, "prompt": "hi", "max_tokens": 1},
             headers={**KEY, "x-kvlab-policy": "round_robin"})
    assert r.status_code == 200


def test_refusal_metrics_have_a_closed_set_of_labels_whatever_the_requests_name(router):
    def series() -> int:
        text = httpx.get(router.url + "/metrics").text
        return sum(1 for line in text.splitlines() if line.startswith("kvlab_router_rejections_total{"))

    before = series()
    for i in range(40):   # each names a different JSON path as the field at fault
        messages = [{"role": "user", "content": "x"}] * i + [{"role": "user", "content": 5}]
        r = post(router, {"model": MODEL, "messages": messages}, path="/v1/chat/completions")
        assert r.status_code == 400
    text = httpx.get(router.url + "/metrics").text
    assert "messages[" not in text
    assert series() - before <= 1
