"""The worker's OpenAI-compatible surface over real HTTP, driven by the `openai` SDK and raw httpx."""
import httpx
import openai
import pytest

MODEL = "Llama-3.1-8B"


@pytest.fixture
def client(worker):
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0, timeout=10)


def test_openai_sdk_streams_a_chat_completion_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(text.split()) == 6
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens > 0


def test_openai_sdk_streams_a_completion(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len("".join(texts).split()) == 5
    assert chunks[-1].choices[0].finish_reason == "length"


def test_non_streaming_completion_reports_usage_and_deterministic_text(client):
    first = client.completions.create(model=MODEL, prompt=[11, 12, 13, 14], max_tokens=4)
    again = client.completions.create(model=MODEL, prompt=[11, 12, 13, 14], max_tokens=4)
    assert first.choices[0].text == again.choices[0].text
    assert first.usage.prompt_tokens == 4 and first.usage.completion_tokens == 4
    assert first.usage.total_tokens == 8
    assert first.usage.prompt_tokens_details.cached_tokens == 0


def test_prompt_forms_text_list_of_text_and_list_of_ids_are_accepted(worker):
    for prompt in ("hello there", ["hello there"], [5, 6, 7], [[5, 6, 7]]):
        r = httpx.post(worker.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200, (prompt, r.text)
        assert r.json()["usage"]["completion_tokens"] == 2


def test_chat_non_streaming_and_models_and_health(client, worker):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.choices[0].message.role == "assistant"
    assert len(reply.choices[0].message.content.split()) == 3
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(worker.url + "/health").json() == {"status": "ok"}


def test_served_model_name_and_aliases_are_accepted(start_worker):
    w = start_worker(served_model_name="meta-llama/Llama-3.1-8B-Instruct", model_aliases=["llama"])
    for name in ("meta-llama/Llama-3.1-8B-Instruct", "llama", MODEL):
        r = httpx.post(w.url + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == name
    ids = [m["id"] for m in httpx.get(w.url + "/v1/models").json()["data"]]
    assert ids[0] == "meta-llama/Llama-3.1-8B-Instruct" and set(ids) >= {"llama", MODEL}


def test_load_snapshot_has_the_fields_routers_read(worker):
    httpx.post(worker.url + "/v1/completions", json={"model": MODEL, "prompt": list(range(100, 140)), "max_tokens": 2})
    load = worker.load()
    for key in ("worker_id", "role", "running", "waiting", "kv_usage", "num_blocks", "free_blocks",
                "prefix_cache_queries", "prefix_cache_hits", "preemptions", "busy_prefill_s", "busy_decode_s",
                "lag_p99_s", "lag_max_s", "time_scale"):
        assert key in load, key
    assert load["role"] == "both" and load["num_blocks"] == 256 and load["time_scale"] == 1.0
    assert load["busy_prefill_s"] > 0 and load["busy_decode_s"] > 0
    assert load["prefix_cache_queries"] == 40


def test_metrics_use_vllm_names_and_count_tokens_and_successes(worker):
    httpx.post(worker.url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3})
    m = worker.metrics()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "kvlab:step_lag_seconds_count",
                 "kvlab:busy_seconds_total", "kvlab:engine_steps_total"):
        assert name in m, name
    assert m["vllm:prompt_tokens_total"] == 3
    assert m["vllm:generation_tokens_total"] == 3
    assert m["vllm:request_success_total"] == 1
    assert m["vllm:time_to_first_token_seconds_count"] == 1
    assert m["vllm:inter_token_latency_seconds_count"] == 2
    assert 'finished_reason="length"' in httpx.get(worker.url + "/metrics").text
