"""Disaggregated serving through the router: prefill on one worker, decode on another, one client stream."""
import time

import httpx
import pytest

from tests.router_fixtures import MODEL, start_router, stream_completion, stream_text  # noqa: F401 (fixture)

PROMPT = "Summarize the history of the printing press in a few sentences, please, with dates."


@pytest.fixture
def pd_cluster(start_worker, start_router):
    prefill = start_worker(worker_id="p0", role="prefill")
    decode = start_worker(worker_id="d0", role="decode", peers=[prefill.url])
    reference = start_worker(worker_id="ref")   # colocated, outside the router: the expected output
    router = start_router([prefill, decode], policy="pd_pair", policies={"pd_pair": {"local_prefill_tokens": 0}})
    return router, prefill, decode, reference


def expected(reference, max_tokens, path="/v1/completions", **body):
    body = {"model": MODEL, "max_tokens": max_tokens, **({"prompt": PROMPT} if "messages" not in body else {}), **body}
    answer = httpx.post(reference.url + path, json=body, timeout=30).json()
    choice = answer["choices"][0]
    return choice.get("text") if "text" in choice else choice["message"]["content"]


def wait_released(worker, timeout=3.0):
    deadline = time.monotonic() + timeout
    while worker.load()["held"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_streamed_completion_is_prefilled_on_one_worker_and_decoded_on_the_other(pd_cluster):
    router, prefill, decode, reference = pd_cluster
    response, events = stream_completion(router.url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 12,
                                                      "stream_options": {"include_usage": True}})
    assert response.headers["x-kvlab-worker"] == "d0" and response.headers["x-kvlab-prefill-worker"] == "p0"
    assert events[-1] == "[DONE]" and len({e["id"] for e in events[:-1]}) == 1
    assert stream_text(events) == expected(reference, 12)
    assert events[-2]["usage"]["completion_tokens"] == 12
    assert prefill.metric("vllm:prompt_tokens_total") > 0 and decode.metric("vllm:generation_tokens_total") >= 11
    assert wait_released(prefill)   # the decode worker pulled the KV and released the hold


def test_non_streaming_and_chat_requests_are_disaggregated_too(pd_cluster):
    router, prefill, _, reference = pd_cluster
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8}, timeout=30)
    assert r.status_code == 200 and r.headers["x-kvlab-prefill-worker"] == "p0"
    assert r.json()["choices"][0]["text"] == expected(reference, 8)
    assert r.json()["usage"]["completion_tokens"] == 8
    messages = [{"role": "user", "content": PROMPT}]
    response, events = stream_completion(router.url, {"model": MODEL, "messages": messages, "max_tokens": 6},
                                         path="/v1/chat/completions")
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert stream_text(events) == expected(reference, 6, "/v1/chat/completions", messages=messages)
    assert wait_released(prefill)


def test_a_one_token_request_needs_no_decode_worker_and_frees_the_prefill_hold(pd_cluster):
    router, prefill, decode, reference = pd_cluster
    response, events = stream_completion(router.url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 1})
    assert stream_text(events) == expected(reference, 1) and events[-1] == "[DONE]"
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert wait_released(prefill)
    assert decode.metric("vllm:generation_tokens_total") == 0


def test_short_uncached_prompts_are_prefilled_locally_on_the_decode_worker(start_worker, start_router):
    prefill = start_worker(worker_id="p0", role="prefill")
    decode = start_worker(worker_id="d0", role="decode", peers=[prefill.url])
    router = start_router([prefill, decode], policy="pd_pair", policies={"pd_pair": {"local_prefill_tokens": 4096}})
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and r.headers["x-kvlab-worker"] == "d0"
    assert "x-kvlab-prefill-worker" not in r.headers
    assert r.json()["usage"]["completion_tokens"] == 5
    assert prefill.metric("vllm:prompt_tokens_total") == 0


def test_a_decode_worker_killed_mid_stream_is_migrated_through_a_new_prefill_decode_pair(start_worker, start_router):
    from tests.router_fixtures import kill
    prefill = start_worker(worker_id="p0", role="prefill")
    decoders = [start_worker(worker_id=f"d{i}", role="decode", time_scale=4.0, peers=[prefill.url]) for i in range(2)]
    reference = start_worker(worker_id="ref")
    router = start_router([prefill, *decoders], policy="pd_pair", policies={"pd_pair": {"local_prefill_tokens": 0}})
    events, killed = [], None
    with httpx.stream("POST", router.url + "/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "stream": True}) as r:
        serving = r.headers["x-kvlab-worker"]
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 6:
                    kill(next(d for d in decoders if d.config.worker_id == serving))
                    killed = serving
    import msgspec
    decoded = ["[DONE]" if e == "[DONE]" else msgspec.json.decode(e) for e in events]
    assert killed and decoded[-1] == "[DONE]" and not any("error" in e for e in decoded[:-1])
    assert stream_text(decoded) == expected(reference, 24)
    assert router.metric("kvlab_router_retries_total", kind="migration") == 1
    assert router.workers()[killed] is False
