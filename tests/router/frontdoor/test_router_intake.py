"""Admission before tokenizing, and tokenizing only what the routing policy reads.

A request is decoded and admitted (shedding, tenant limits) before its prompt is tokenized, so a
refused request costs no tokenizer time; a tenant's token bucket reserves an estimate from the body's
size and settles with the prompt tokens the worker reports. Routing then tokenizes only the leading
blocks its policy reads (none for round robin and least loaded).
"""
import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.wire.openai_api import ApiError
from kvlab.wire.tokenizer import SPECIALS, BuiltinTokenizer, load_tokenizer
from router.config import Limits, SheddingConfig
from router.frontdoor.gate import Gate
from router.frontdoor.intake import Intake
from router.frontdoor.tenants import TenantConfig
from router.frontdoor.tokenize import PromptTokenizer
from router.policies.registry import PolicySet
from tests.router_fixtures import MODEL, start_router  # noqa: F401 (fixture)

BLOCK = 16


def intake(policy: str = "round_robin", context: int = 8192) -> tuple[Intake, PolicySet]:
    policies = PolicySet(policy)
    tokenizer = PromptTokenizer(load_tokenizer(None), BLOCK)
    return Intake(Limits(), tokenizer, lambda: [], lambda: context, policies.prompt_blocks), policies


def body(**fields) -> bytes:
    return msgspec.json.encode({"model": MODEL, **fields})


LONG = " ".join(f"word{i % 97} n{i}" for i in range(1200))   # ~5,000 tokens


class CountingTokenizer(PromptTokenizer):
    """Counts the characters it is asked to tokenize."""

    def __init__(self):
        super().__init__(load_tokenizer(None), BLOCK)
        self.chars = 0

    def _encode(self, text):
        self.chars += len(text)
        return super()._encode(text)


# -- which policy reads how much of the prompt -------------------------------------------------------
def test_each_policy_says_how_many_leading_blocks_it_reads():
    policies = PolicySet("round_robin", {"prefix_bounded": {"kv_choice": False, "prefix_blocks": 3}})
    wanted = {"round_robin": 0, "least_loaded": 0, "prefix_ring": 4, "prefix_bounded": 3, "kv_aware": None,
              "pd_pair": None}
    for name, blocks in wanted.items():
        policies.get(name)
        assert policies.prompt_blocks(name) == blocks, name
    assert PolicySet("prefix_bounded").prompt_blocks(None) is None   # with the KV index it matches past the key


def test_prefix_bounded_without_a_kv_feed_reads_its_key_blocks_and_chooses_as_from_the_whole_prompt():
    from router.policies import WorkerView

    unfed = PolicySet("prefix_bounded", index_fed=False)
    unfed.get("prefix_bounded")
    assert unfed.prompt_blocks(None) == 4   # its index stays empty: a match past the key finds nothing
    for w in ("w0", "w1", "w2"):
        unfed.add_worker(w)
    tokenizer = PromptTokenizer(load_tokenizer(None), BLOCK)
    for i in range(30):
        ids = BuiltinTokenizer().encode(f"prompt {i % 7} " + LONG[: 400 + 37 * i])
        views = [WorkerView(f"w{k}", in_flight=(i + k) % 3) for k in range(3)]
        whole = unfed.choose(tokenizer.route_request(ids, None, None), views)
        head = unfed.choose(tokenizer.route_request(ids[: 4 * BLOCK], None, None), views)
        assert (head.worker, head.overflow_skips) == (whole.worker, whole.overflow_skips)


def test_round_robin_tokenizes_nothing_and_a_prefix_ring_only_its_key_blocks():
    for policy, head in (("round_robin", 0), ("prefix_ring", 4 * BLOCK), ("kv_aware", None)):
        take, _ = intake(policy, context=32_768)   # its characters fit: no count needed for the size checks
        counting = take.tokenizer = CountingTokenizer()
        job = take.job("completions", body(prompt=LONG), 0.0)
        take.tokenize(job)
        whole = list(BuiltinTokenizer().encode(LONG))
        if head is None:
            assert counting.chars >= len(LONG) and list(job.prompt_head) == whole
        else:
            assert counting.chars < 40 * (head + 1) and list(job.prompt_head) == whole[:head]
            assert len(job.route.blocks) == head // BLOCK
        assert list(job.prompt) == whole   # the whole prompt is still there when needed (migration)


def test_a_prompt_that_may_not_fit_the_context_is_tokenized_whole_and_refused():
    take, _ = intake("round_robin")
    counting = take.tokenizer = CountingTokenizer()
    job = take.job("completions", body(prompt=" ".join(["ab"] * 5000), max_tokens=10), 0.0)
    take.tokenize(job)   # 14,999 characters may be as many tokens: counted (5,000: " ab" is one piece)
    assert counting.chars == 14_999 and len(job.prompt_head) == len(job.prompt) == 5000
    job = take.job("completions", body(prompt=" ".join(["ab"] * 9000), max_tokens=10), 0.0)
    try:
        take.tokenize(job)
    except Exception as err:   # ApiError 400
        assert getattr(err, "status", None) == 400 and "8192" in str(err)
    else:
        raise AssertionError("a prompt over the context was admitted")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "bc", "defgh", "1", "2345", " ", "  ", "\n", "<", "|", ".", "é",
                                 *SPECIALS]), min_size=1, max_size=80),
       st.integers(min_value=1, max_value=60))
def test_the_head_of_a_prompt_is_exactly_the_first_ids_of_the_whole(pieces, n):
    tokenizer = PromptTokenizer(load_tokenizer(None), BLOCK)
    text = "".join(pieces)
    assert list(tokenizer.head(text, n)) == list(tokenizer.encode(text))[:n]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "bc", "defgh", "1", "2345", " ", "  ", "\n", " \t", "<", "|", ".", "é"]),
                min_size=1, max_size=80),
       st.integers(min_value=1, max_value=12))
def test_a_long_text_tokenized_in_chunks_gives_the_ids_of_the_whole(pieces, size):
    from router.frontdoor.tokenize import _chunks
    text = "".join(pieces)
    chunks = _chunks(text, size)
    assert "".join(chunks) == text
    assert [i for chunk in chunks for i in BuiltinTokenizer().encode(chunk)] == BuiltinTokenizer().encode(text)


# -- admission before tokenizing ---------------------------------------------------------------------
def test_a_request_refused_by_its_tenant_is_never_tokenized(start_worker, start_router):
    worker = start_worker(worker_id="w0")
    router = start_router([worker], tenants=[TenantConfig("t", ["sk-t"], tokens_per_s=10.0, tokens_burst=500.0)])
    counting = CountingTokenizer()
    router.router.intake.tokenizer = counting
    headers = {"Authorization": "Bearer sk-t"}
    # ~3,500 estimated tokens: over the bucket's 500-token burst, refused at admission.
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": LONG, "max_tokens": 4},
                   headers=headers, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_exceed_burst"
    assert counting.chars == 0
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "a short one", "max_tokens": 4},
                   headers=headers, timeout=30)
    assert r.status_code == 200 and counting.chars > 0


def test_the_token_bucket_settles_the_body_size_estimate_with_the_workers_prompt_count():
    now = [100.0]
    gate = Gate([TenantConfig("t", ["sk-t"], tokens_per_s=1.0, tokens_burst=10_000.0)],
                SheddingConfig(), queue_depth=lambda: 0.0, clock=lambda: now[0])
    take, _ = intake("round_robin")
    raw = body(prompt="   ".join(["x"] * 400), max_tokens=5)   # 1,600 characters of mostly spaces
    job = take.job("completions", raw, 0.0, tenant="t")
    assert job.prompt_estimate == -(-len(raw) // 4)
    gate.admit(job)
    assert gate.tenants._state["t"].tokens.level(now[0]) == 10_000 - job.prompt_estimate - 5
    job.reported_prompt_tokens = 799   # what the worker counted
    gate.release(job, completion_tokens=5)
    assert gate.tenants._state["t"].tokens.level(now[0]) == 10_000 - 799 - 5


def test_a_request_refused_after_admission_is_refunded_whole():
    now = [100.0]
    gate = Gate([TenantConfig("t", ["sk-t"], tokens_per_s=1.0, tokens_burst=10_000.0)], SheddingConfig(),
                queue_depth=lambda: 0.0, clock=lambda: now[0])
    take, _ = intake("round_robin")
    job = take.job("completions", body(prompt="hello there", max_tokens=5), 0.0, tenant="t")
    gate.admit(job)
    gate.release(job, 0, served=False)
    assert gate.tenants._state["t"].tokens.level(now[0]) == 10_000


def test_a_stream_asks_its_worker_for_usage_and_the_client_gets_none_it_did_not_ask_for(start_worker,
                                                                                        start_router):
    from tests.router_fixtures import stream_completion
    worker = start_worker(worker_id="w0")
    router = start_router([worker], policy="round_robin")
    _, events = stream_completion(router.url, {"model": MODEL, "prompt": LONG[:3000], "max_tokens": 3})
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and e.get("usage") for e in events)
    prompt = len(BuiltinTokenizer().encode(LONG[:3000]))
    assert router.metric("kvlab_router_prompt_tokens_total", policy="round_robin") == prompt
    _, events = stream_completion(router.url, {"model": MODEL, "prompt": LONG[:3000], "max_tokens": 3,
                                               "stream_options": {"include_usage": True}})
    assert [e["usage"]["prompt_tokens"] for e in events if isinstance(e, dict) and e.get("usage")] == [prompt]


@pytest.mark.parametrize(("raw", "ids"), [
    (b'{"model": "m", "prompt": [1, 2, 3]}', True),
    (b'{"model": "m", "prompt" :\n [ 7 ]}', True),
    (b'{"model": "m", "prompt": "three words here"}', False),
    (b'{"model": "m", "prompt": [[1, 2]]}', False),   # a batch: looks like a list, the general decoder answers
])
def test_a_body_decodes_alike_whichever_decoder_is_tried_first(raw, ids):
    from kvlab.wire.openai_api import CompletionRequest, decode_request
    from router.frontdoor.intake import _decode, _prompt_is_list
    from router.frontdoor.tokenize import TokenIdsCompletion

    assert _prompt_is_list(raw) == raw.replace(b" ", b"").replace(b"\n", b"").startswith(b'{"model":"m","prompt":[')
    request = _decode(raw, "completions")
    assert isinstance(request, TokenIdsCompletion) == ids
    assert request.prompt == decode_request(raw, CompletionRequest).prompt


def test_each_request_is_checked_against_the_context_length_the_workers_report_now():
    context = [8192]
    policies = PolicySet("round_robin")
    take = Intake(Limits(), PromptTokenizer(load_tokenizer(None), BLOCK), lambda: [], lambda: context[0],
                  policies.prompt_blocks)
    raw = body(prompt=" ".join(["ab"] * 3000), max_tokens=10)   # 3,000 tokens
    take.tokenize(take.job("completions", raw, 0.0))
    context[0] = 2048   # the workers now report a shorter context
    with pytest.raises(ApiError) as refused:
        take.tokenize(take.job("completions", raw, 0.0))
    assert refused.value.status == 400
    take.limits = Limits(max_input_tokens=100)   # and limits set anew apply at once
    context[0] = 8192
    with pytest.raises(ApiError):
        take.tokenize(take.job("completions", raw, 0.0))
