"""Bad input gets the right 4xx with an OpenAI error body, and the worker keeps serving."""
import httpx
import pytest

MODEL = "Llama-3.1-8B"
OK = {"model": MODEL, "prompt": "hello", "max_tokens": 2}


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


CASES = [
    ("malformed json", b'{"model": "Llama-3.1-8B", "prompt": ', 400, None),
    ("not an object", b'[1, 2, 3]', 400, None),
    ("model has wrong type", b'{"model": 7, "prompt": "x"}', 400, "model"),
    ("max_tokens has wrong type", b'{"model": "Llama-3.1-8B", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    ("prompt missing", b'{"model": "Llama-3.1-8B"}', 400, "prompt"),
    ("empty text prompt", b'{"model": "Llama-3.1-8B", "prompt": ""}', 400, "prompt"),
    ("empty token prompt", b'{"model": "Llama-3.1-8B", "prompt": []}', 400, "prompt"),
    ("negative token id", b'{"model": "Llama-3.1-8B", "prompt": [1, -2]}', 400, "prompt"),
    ("token id outside vocab", b'{"model": "Llama-3.1-8B", "prompt": [1, 999999]}', 400, "prompt"),
    ("max_tokens zero", b'{"model": "Llama-3.1-8B", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("max_tokens negative", b'{"model": "Llama-3.1-8B", "prompt": "x", "max_tokens": -5}', 400, "max_tokens"),
    ("n above one", b'{"model": "Llama-3.1-8B", "prompt": "x", "n": 2}', 400, "n"),
    ("unknown model", b'{"model": "gpt-4", "prompt": "x"}', 404, "model"),
    ("JSON nested too deeply", b'{"model": "Llama-3.1-8B", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
]


@pytest.mark.parametrize("name,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_completion_request_gets_openai_error(worker, name, body, status, param):
    err = _error(httpx.post(worker.url + "/v1/completions", content=body,
                            headers={"content-type": "application/json"}), status)
    assert err["param"] == param
    assert httpx.post(worker.url + "/v1/completions", json=OK).status_code == 200


def test_prompt_plus_max_tokens_over_the_context_limit_is_400(start_worker):
    w = start_worker(max_model_len=64)
    err = _error(httpx.post(w.url + "/v1/completions",
                            json={"model": MODEL, "prompt": list(range(1000, 1060)), "max_tokens": 10}), 400)
    assert "context length is 64" in err["message"]
    _error(httpx.post(w.url + "/v1/completions", json={"model": MODEL, "prompt": list(range(1000, 1070))}), 400)
    assert httpx.post(w.url + "/v1/completions", json=OK).status_code == 200


def test_request_larger_than_the_whole_kv_pool_is_400(start_worker):
    w = start_worker(num_blocks=4)   # 64 tokens of KV
    err = _error(httpx.post(w.url + "/v1/completions",
                            json={"model": MODEL, "prompt": list(range(1000, 1060)), "max_tokens": 10}), 400)
    assert "pool" in err["message"]


def test_chat_errors_empty_messages_and_wrong_types(worker):
    url = worker.url + "/v1/chat/completions"
    assert _error(httpx.post(url, json={"model": MODEL, "messages": []}), 400)["param"] == "messages"
    no_role = _error(httpx.post(url, json={"model": MODEL, "messages": [{"content": "x"}]}), 400)
    assert no_role["param"].startswith("messages[0]")
    assert _error(httpx.post(url, json={"model": MODEL, "messages": "hi"}), 400)["param"] == "messages"
    assert _error(httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                        "max_completion_tokens": 0}), 400)["param"] == "max_tokens"
    assert _error(httpx.post(url, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404)


def test_huge_body_is_413_and_the_server_keeps_serving(start_worker):
    w = start_worker(max_body_bytes=1 << 20)
    huge = b'{"model": "Llama-3.1-8B", "prompt": "' + b"a" * (2 << 20) + b'"}'
    err = _error(httpx.post(w.url + "/v1/completions", content=huge, headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large"
    # Without a Content-Length (chunked upload) the limit holds while reading.
    chunked = httpx.post(w.url + "/v1/completions", content=iter([huge[:1 << 19]] * 4))
    _error(chunked, 413)
    assert httpx.post(w.url + "/v1/completions", json=OK).status_code == 200


def test_unknown_route_and_wrong_method_are_openai_errors(worker):
    assert _error(httpx.get(worker.url + "/v1/nothing"), 404)["type"] == "not_found_error"
    r = httpx.get(worker.url + "/v1/completions")
    _error(r, 405)
    assert r.headers["allow"] == "POST"


def test_handoff_params_on_the_wrong_role_are_400(worker):
    body = {**OK, "kv_transfer_params": {"do_remote_decode": True}}
    err = _error(httpx.post(worker.url + "/v1/completions", json=body), 400)
    assert err["param"] == "kv_transfer_params.do_remote_decode"
    body = {**OK, "kv_transfer_params": {"do_remote_prefill": True, "remote_url": "http://x", "first_token": 1}}
    assert _error(httpx.post(worker.url + "/v1/completions", json=body), 400)["param"] == \
        "kv_transfer_params.remote_request_id"


def test_full_waiting_queue_answers_503_with_retry_after(start_worker):
    w = start_worker(max_waiting=0)
    r = httpx.post(w.url + "/v1/completions", json=OK)
    err = _error(r, 503)
    assert err["code"] == "queue_full" and r.headers["retry-after"] == "1"


def test_a_bug_in_the_worker_is_an_openai_500_not_a_crash(worker, monkeypatch):
    def broken():
        raise RuntimeError("boom")
    monkeypatch.setattr(worker.runtime, "load", broken)
    err = _error(httpx.get(worker.url + "/load"), 500)
    assert err["type"] == "server_error" and "boom" not in err["message"]
    assert httpx.post(worker.url + "/v1/completions", json=OK).status_code == 200
