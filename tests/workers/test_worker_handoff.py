"""Prefill -> decode handoff with vLLM-style kv_transfer_params, driven from the test as a router would."""
import time

import httpx
import pytest

from emulator.physics import roofline
from emulator.physics.catalog import builtin_catalog

MODEL = "Llama-3.1-8B"
PROMPT = list(range(6000, 8000))   # 2,000 tokens: 42 ms of prefill on an H100, 262 MB of bf16 KV
KV_LINK = "Ethernet-100G"          # slow enough (~21 ms for that KV) to stand out from HTTP noise


@pytest.fixture
def pair(start_worker):
    prefill = start_worker(role="prefill", worker_id="p0")
    decode = start_worker(role="decode", worker_id="d0", kv_link=KV_LINK, peers=[prefill.url])
    for w in (prefill, decode):   # first requests pay one-off costs (imports, decoder setup)
        w.http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2})
    return prefill, decode


def wait_for(predicate, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def decode_stream(client: httpx.Client, body: dict) -> tuple[float, list[str], dict]:
    """Seconds to the first token chunk, the token texts, and the usage of a streamed completion."""
    first, texts, usage = None, [], None
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first if first is not None else time.perf_counter() - start
                texts.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                usage = chunk["usage"]
    return first, texts, usage


def test_prefill_then_decode_hands_over_the_kv_and_releases_it(pair):
    prefill, decode = pair
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10}
    t0 = time.perf_counter()
    ask = {**body, "kv_transfer_params": {"do_remote_decode": True}}
    answer = prefill.http.post("/v1/completions", json=ask).json()
    prefill_elapsed = time.perf_counter() - t0
    params = answer["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_url"] == prefill.url and params["remote_worker_id"] == "p0"
    assert params["remote_request_id"] == answer["id"] and params["prompt_tokens"] == 2000
    assert answer["usage"]["completion_tokens"] == 1 and answer["choices"][0]["finish_reason"] == "length"
    assert prefill.load()["held"] == 1 and prefill.load()["kv_usage"] > 0

    second_token, texts, usage = decode_stream(decode.http, {**body, "kv_transfer_params": params})
    dep = prefill.runtime.engine.dep
    prefill_s = roofline.prefill_time(dep, 2000).seconds
    transfer_s = roofline.kv_transfer_time(2000 * roofline.kv_bytes_per_token(dep.model),
                                           builtin_catalog().link(KV_LINK))
    step_s = roofline.decode_time(dep, [2001]).seconds
    assert prefill_elapsed >= prefill_s
    assert second_token >= transfer_s + step_s   # physics: the KV crosses the link, then a decode step
    # ...and the decode worker did not prefill the prompt again: its emulated prefill time is the one
    # step that takes the KV in (a step's length, 6.9 ms here), not a whole prefill (46 ms). Read off the
    # engine, not the wall clock, which a busy host stretches (0.27 s seen against a 0.07 s bound).
    assert decode.runtime.metrics.busy_prefill_s < 0.5 * prefill_s
    assert len(texts) == 9 and usage["completion_tokens"] == 10
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0

    assert wait_for(lambda: prefill.load()["held"] == 0 and prefill.load()["kv_usage"] == 0.0)
    assert wait_for(lambda: decode.load()["kv_usage"] == 0.0)
    colocated = decode.http.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["text"] + "".join(texts) == colocated["choices"][0]["text"]


def test_chat_handoff_non_streaming_decode_returns_tokens_two_to_n(pair):
    prefill, decode = pair
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 4}
    answer = httpx.post(prefill.url + "/v1/chat/completions",
                        json={**body, "stream": True, "kv_transfer_params": {"do_remote_decode": True}}).json()
    assert answer["object"] == "chat.completion"   # a handoff answer is one JSON body even if stream was asked
    rest = httpx.post(decode.url + "/v1/chat/completions",
                      json={**body, "kv_transfer_params": answer["kv_transfer_params"]}).json()
    assert len(rest["choices"][0]["message"]["content"].split()) == 3
    assert rest["usage"]["completion_tokens"] == 4
    assert wait_for(lambda: prefill.load()["held"] == 0)


def test_held_kv_nobody_pulls_is_freed_by_release_or_timeout(start_worker):
    prefill = start_worker(role="prefill", hold_timeout_s=0.3)
    ask = {"model": MODEL, "prompt": PROMPT[:64], "max_tokens": 5, "kv_transfer_params": {"do_remote_decode": True}}
    first = httpx.post(prefill.url + "/v1/completions", json=ask).json()
    release = httpx.post(prefill.url + "/v1/kv/release", json={"request_id": first["id"]}).json()
    assert release == {"request_id": first["id"], "released": True}
    assert httpx.post(prefill.url + "/v1/kv/release", json={"request_id": first["id"]}).json()["released"] is False
    httpx.post(prefill.url + "/v1/completions", json=ask)
    assert prefill.load()["held"] == 1
    assert wait_for(lambda: prefill.load()["held"] == 0 and prefill.load()["kv_usage"] == 0.0)


def test_plain_request_on_a_prefill_worker_gets_one_token_and_holds_nothing(start_worker):
    prefill = start_worker(role="prefill")
    r = httpx.post(prefill.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5}).json()
    assert r["usage"]["completion_tokens"] == 1 and "kv_transfer_params" not in r
    assert prefill.load()["held"] == 0


def test_release_of_a_failed_prefill_worker_is_logged_not_raised(start_worker):
    decode = start_worker(role="decode", release_timeout_s=0.5, peers=["http://127.0.0.1:9"])
    params = {"do_remote_prefill": True, "remote_request_id": "cmpl-gone", "remote_url": "http://127.0.0.1:9",
              "first_token": 3}
    r = httpx.post(decode.url + "/v1/completions",
                   json={"model": MODEL, "prompt": PROMPT[:32], "max_tokens": 3, "kv_transfer_params": params})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert wait_for(lambda: decode.runtime.releaser.failures == 1)
    assert httpx.get(decode.url + "/health").status_code == 200


def test_a_decode_worker_never_calls_a_remote_url_outside_its_peers(start_worker):
    import socket
    trap = socket.socket()   # a listener standing for any host a client would like the worker to reach
    trap.bind(("127.0.0.1", 0))
    trap.listen(4)
    trap.settimeout(1.0)
    decode = start_worker(role="decode", release_timeout_s=0.5, peers=["http://127.0.0.1:9"])
    target = f"http://127.0.0.1:{trap.getsockname()[1]}"
    params = {"do_remote_prefill": True, "remote_request_id": "cmpl-x", "remote_url": target, "first_token": 3}
    r = httpx.post(decode.url + "/v1/completions",
                   json={"model": MODEL, "prompt": PROMPT[:32], "max_tokens": 3, "kv_transfer_params": params})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params.remote_url"
    try:
        trap.accept()
        called = True
    except TimeoutError:
        called = False
    finally:
        trap.close()
    assert not called
