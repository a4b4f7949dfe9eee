"""A request sharing a long prefix with an earlier one skips that prefill: lower TTFT, prefix hits."""
import time

import httpx
import openai

from emulator.physics import roofline

MODEL = "Llama-3.1-8B"
PREFIX = list(range(2000, 4000))   # 2,000 tokens = 125 full blocks of 16


def ttft_and_usage(client: httpx.Client, prompt: list[int]) -> tuple[float, dict]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    first, usage = None, None
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"text":" ' in line:
                first = time.perf_counter() - start
            if '"usage"' in line:
                usage = httpx.Response(200, content=line[6:]).json()["usage"]
    return first, usage


def test_shared_2000_token_prefix_lowers_ttft_and_counts_prefix_hits(worker):
    before = worker.metrics()
    cold, cold_usage = ttft_and_usage(worker.http, PREFIX + [7, 8, 9])
    warm, warm_usage = ttft_and_usage(worker.http, PREFIX + [10, 11, 12])
    after = worker.metrics()
    assert cold_usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm_usage["prompt_tokens_details"]["cached_tokens"] == 2000
    dep = worker.runtime.engine.dep
    saving = roofline.prefill_time(dep, 2003).seconds - roofline.prefill_time(dep, 3, 2000).seconds
    assert cold - warm > 0.5 * saving, (cold, warm, saving)   # ~36 ms predicted
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    assert hits == 2000 and queries == 2 * 2003
    load = worker.load()
    assert load["prefix_cache_hits"] == 2000


def test_chat_requests_sharing_a_system_prompt_share_its_blocks(worker):
    client = openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0)
    system = {"role": "system", "content": "You are a careful assistant. " * 60}
    for question in ("What is KV caching?", "Why batch requests?"):
        reply = client.chat.completions.create(model=MODEL, max_tokens=2,
                                               messages=[system, {"role": "user", "content": question}])
    assert reply.usage.prompt_tokens_details.cached_tokens >= 16 * ((reply.usage.prompt_tokens - 40) // 16)
