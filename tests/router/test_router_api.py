"""The router's OpenAI surface over real HTTP, in front of real emulated workers on loopback."""
import httpx
import openai
import pytest

from tests.router_fixtures import MODEL, module_cluster, start_router, stream_completion  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def cluster():
    with module_cluster([{"worker_id": "w0"}, {"worker_id": "w1"}], policy="prefix_bounded") as running:
        yield running


@pytest.fixture
def client(cluster):
    router, _ = cluster
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=10)


def test_openai_sdk_completion_through_the_router_matches_the_worker(client, cluster):
    _, workers = cluster
    via_router = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6)
    direct = openai.OpenAI(base_url=workers[0].url + "/v1", api_key="x", max_retries=0).completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=6)
    assert via_router.choices[0].text == direct.choices[0].text       # deterministic emulated output
    assert via_router.usage.completion_tokens == 6 and via_router.choices[0].finish_reason == "length"


def test_openai_sdk_streams_a_completion_through_the_router(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(text.split()) == 5
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1


def test_openai_sdk_chat_streaming_with_usage_and_non_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len("".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split()) == 4
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens > 0
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert reply.choices[0].message.role == "assistant" and len(reply.choices[0].message.content.split()) == 3


def test_models_health_and_metrics(client, cluster):
    router, _ = cluster
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(router.url + "/health").json() == {"status": "ok", "workers_up": 2, "workers": 2}
    client.completions.create(model=MODEL, prompt="count me", max_tokens=2)
    text = httpx.get(router.url + "/metrics").text
    for name in ("kvlab_router_decisions_total", "kvlab_router_added_latency_seconds_bucket",
                 "kvlab_router_in_flight", "kvlab_router_decision_seconds_bucket"):
        assert name in text
    assert router.metric("kvlab_router_added_latency_seconds_count") >= 1


def test_the_response_names_the_worker_that_served_it(cluster):
    router, _ = cluster
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "who served me", "max_tokens": 1})
    assert r.headers["x-kvlab-worker"] in {"w0", "w1"}
    response, events = stream_completion(router.url, {"model": MODEL, "prompt": "and me", "max_tokens": 2})
    assert response.headers["x-kvlab-worker"] in {"w0", "w1"} and events[-1] == "[DONE]"


def test_admin_api_needs_the_token_and_registers_and_removes_workers(start_worker, start_router):
    router = start_router([start_worker(worker_id="w0"), start_worker(worker_id="w1")], admin_token="admin-secret")
    extra = start_worker(worker_id="w2")
    url = router.url + "/admin/workers"
    assert httpx.post(url, json={"url": extra.url, "id": "w2"}).status_code == 401
    assert httpx.post(url, json={"url": extra.url, "id": "w2"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": "Bearer admin-secret"}
    added = httpx.post(url, json={"url": extra.url, "id": "w2"}, headers=auth)
    assert added.status_code == 201 and added.json()["up"] is True
    assert httpx.post(url, json={"url": extra.url, "id": "w2"}, headers=auth).status_code == 409
    assert {w["id"] for w in httpx.get(url, headers=auth).json()} == {"w0", "w1", "w2"}
    assert httpx.delete(url + "/w2", headers=auth).status_code == 200
    assert httpx.delete(url + "/w2", headers=auth).status_code == 404
    assert router.workers() == {"w0": True, "w1": True}


def test_admin_api_is_disabled_without_a_token(start_worker, start_router):
    router = start_router([start_worker()])
    r = httpx.get(router.url + "/admin/workers", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


BAD_WORKERS = [
    ({"url": "not a url"}, 400, "url"),
    ({"url": "file:///etc/passwd"}, 400, "url"),
    ({"url": "http://[::1"}, 400, "url"),
    ({"url": "http://user:pw@127.0.0.1:9"}, 400, "url"),
    ({"url": "http://127.0.0.1:9/v1"}, 400, "url"),
    ({"url": "http://127.0.0.1:9", "role": "bogus"}, 400, "role"),
    ({"url": "http://127.0.0.1:9", "id": "a b{c}"}, 400, "id"),
    ({"url": "http://127.0.0.1:9", "kv_events": "ipc:///tmp/x"}, 400, "kv_events"),
]


def test_admin_input_is_validated_and_a_refusal_leaves_nothing_registered(start_worker, start_router):
    worker = start_worker(worker_id="w0")
    router = start_router([worker], admin_token="t")
    auth = {"Authorization": "Bearer t"}
    url = router.url + "/admin/workers"
    for body, status, field in BAD_WORKERS:
        r = httpx.post(url, json=body, headers=auth)
        assert r.status_code == status and r.json()["error"]["param"] == field, (body, r.text)
        assert "\n" not in r.json()["error"]["message"]
    # The same worker under a new id would double its routing share.
    r = httpx.post(url, json={"url": worker.url + "/", "id": "again"}, headers=auth)
    assert r.status_code == 409 and r.json()["error"]["param"] == "url"
    # The router itself, by a name other than the one it was started with.
    itself = router.url.replace("127.0.0.1", "localhost")
    r = httpx.post(url, json={"url": itself, "id": "loop"}, headers=auth)
    assert r.status_code == 400 and "this router" in r.json()["error"]["message"]
    assert {w["id"] for w in httpx.get(url, headers=auth).json()} == {"w0"}
    assert router.workers() == {"w0": True}


def test_metrics_and_cluster_view_need_the_metrics_token_when_one_is_set(start_worker, start_router):
    router = start_router([start_worker()], metrics_token="m")
    for path in ("/metrics", "/cluster"):
        assert httpx.get(router.url + path).status_code == 401
        assert httpx.get(router.url + path, headers={"Authorization": "Bearer m"}).status_code == 200
