"""Behaviour of the pure engine: batching, prefix reuse, preemption, roles, timing from the roofline."""
import pytest

from emulator.engine_config import EngineConfig
from emulator.physics import roofline as r
from emulator.physics.catalog import builtin_catalog
from workers.core.engine import Engine, EngineError, QueueFull
from workers.core.request import RemotePrefill, SamplingParams

CAT = builtin_catalog()
DEP = r.Deployment(model=CAT.model("Llama-3.1-8B"), gpu=CAT.gpu("H100-SXM"))


def engine(**kw) -> Engine:
    return Engine(DEP, EngineConfig(**kw), kv_link=CAT.link("InfiniBand-NDR"),
                  swap_link=CAT.link("PCIe-Gen5"))


def run(e: Engine, now: float = 0.0, limit: int = 100_000):
    """Step until idle; returns (results, end time)."""
    results = []
    for _ in range(limit):
        if not e.has_work():
            break
        res = e.step(now)
        results.append(res)
        now = res.end if res.duration else (res.next_wakeup or now)
    return results, now


def tokens_of(results, rid):
    return [t for res in results for (q, t) in res.tokens if q == rid]


def test_exactly_max_tokens_and_first_token_after_prefill_time():
    e = engine()
    e.add_request("a", list(range(3000)), SamplingParams(max_tokens=7), 0.0)
    results, _ = run(e)
    assert len(tokens_of(results, "a")) == 7
    assert results[0].duration == pytest.approx(r.prefill_time(DEP, 3000).seconds)
    assert results[-1].finished[0].reason == "length"


def test_chunked_prefill_respects_token_budget_and_batches_decodes():
    e = engine(max_num_batched_tokens=512)
    e.add_request("long", list(range(2000)), SamplingParams(max_tokens=2), 0.0)
    first = e.step(0.0)
    assert first.prefill_tokens == 512 and not first.tokens      # no token until the prompt is done
    e.add_request("short", list(range(5000, 5100)), SamplingParams(max_tokens=50), first.end)
    results, _ = run(e, first.end)
    assert all(res.prefill_tokens + res.decode_tokens <= 512 for res in results)
    mixed = [res for res in results if res.prefill_tokens and res.decode_tokens]
    assert mixed, "decodes of one request should share steps with the other's prefill chunks"


def test_shared_prefix_is_served_from_cache_and_is_faster():
    e = engine()
    prefix = list(range(2000))
    e.add_request("a", prefix + [7, 8, 9], SamplingParams(max_tokens=1), 0.0)
    first, now = run(e)
    e.add_request("b", prefix + [4, 5, 6], SamplingParams(max_tokens=1), now)
    second, _ = run(e, now)
    assert second[-1].finished[0].cached_tokens == 2000 // 16 * 16
    assert second[0].duration < first[0].duration / 5
    assert e.blocks.prefix_hits == 2000 // 16 * 16


def test_salted_requests_share_no_blocks():
    e = engine()
    e.add_request("a", list(range(2000)), SamplingParams(max_tokens=1), 0.0, salt="tenant-a")
    _, now = run(e)
    e.add_request("b", list(range(2000)), SamplingParams(max_tokens=1), now, salt="tenant-b")
    results, _ = run(e, now)
    assert results[-1].finished[0].cached_tokens == 0


def test_preemption_under_memory_pressure_and_everything_completes():
    e = engine(num_blocks=64)          # 1,024 tokens of KV
    for i in range(6):
        e.add_request(f"r{i}", list(range(i * 1000, i * 1000 + 200)), SamplingParams(max_tokens=150), 0.0)
    results, _ = run(e)
    assert e.scheduler.preemptions > 0
    done = {f.request_id: f for res in results for f in res.finished}
    assert len(done) == 6 and all(f.output_tokens == 150 for f in done.values())
    assert e.blocks.num_used == 0
    assert e.blocks.usage == 0.0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_output_is_identical_to_unpreempted(mode):
    alone = engine()
    alone.add_request("x", list(range(300)), SamplingParams(max_tokens=120), 0.0)
    reference = tokens_of(run(alone)[0], "x")
    tight = engine(num_blocks=40, preemption=mode)
    for i, rid in enumerate(["x", "y", "z"]):
        tight.add_request(rid, list(range(i * 300, i * 300 + 300)) if rid != "x" else list(range(300)),
                          SamplingParams(max_tokens=120), 0.0)
    results, _ = run(tight)
    assert tight.scheduler.preemptions > 0
    assert tokens_of(results, "x") == reference


def test_swap_preemption_costs_pcie_time():
    e = engine(num_blocks=40, preemption="swap")
    for i in range(3):
        e.add_request(f"r{i}", list(range(i * 300, i * 300 + 300)), SamplingParams(max_tokens=120), 0.0)
    results, _ = run(e)
    assert e.scheduler.preemptions > 0
    swap_steps = [res for res in results if res.preempted]
    assert swap_steps


def test_requests_that_can_never_run_are_rejected_clearly():
    e = engine(num_blocks=8)
    with pytest.raises(EngineError, match="pool holds"):
        e.add_request("big", list(range(200)), SamplingParams(max_tokens=10), 0.0)
    with pytest.raises(EngineError, match="maximum context length"):
        engine().add_request("long", [1] * 131_000, SamplingParams(max_tokens=1000), 0.0)
    with pytest.raises(EngineError, match="empty"):
        engine().add_request("empty", [], SamplingParams(), 0.0)


def test_bounded_waiting_queue():
    e = engine(max_waiting=2)
    e.add_request("a", [1, 2, 3], SamplingParams(), 0.0)
    e.add_request("b", [1, 2, 3], SamplingParams(), 0.0)
    with pytest.raises(QueueFull):
        e.add_request("c", [1, 2, 3], SamplingParams(), 0.0)


def test_abort_frees_blocks():
    e = engine()
    e.add_request("a", list(range(1000)), SamplingParams(max_tokens=100), 0.0)
    e.step(0.0)
    assert e.blocks.num_used > 0
    assert e.abort("a")
    assert e.blocks.num_used == 0 and not e.has_work()


def test_eos_distribution_and_min_tokens():
    e = engine()
    for i in range(40):
        e.add_request(f"r{i}", [i, i + 1, i + 2], SamplingParams(max_tokens=200, min_tokens=5,
                                                                  eos_probability=0.05), 0.0)
    results, _ = run(e)
    lengths = [f.output_tokens for res in results for f in res.finished]
    assert min(lengths) > 5 and any(f.reason == "stop" for res in results for f in res.finished)
    assert 10 < sum(lengths) / len(lengths) < 60      # geometric with mean ~ 1/0.05 = 20, after 5


def test_prefill_role_holds_kv_until_released():
    p = engine(role="prefill")
    p.add_request("a", list(range(1000)), SamplingParams(max_tokens=100), 0.0)
    results, _ = run(p)
    assert results[-1].finished[0].reason == "held" and len(tokens_of(results, "a")) == 1
    assert p.blocks.num_used == 1000 // 16 + 1
    assert p.release("a") and p.blocks.num_used == 0


def test_decode_role_pays_transfer_time_for_missing_blocks_only():
    d = engine(role="decode")
    prompt = list(range(2000))
    d.add_request("a", prompt, SamplingParams(max_tokens=3), 0.0, remote=RemotePrefill(first_token=5))
    results, _ = run(d)
    transfer = r.kv_transfer_time(2000 * r.kv_bytes_per_token(DEP.model), CAT.link("InfiniBand-NDR"))
    first_decode = next(res for res in results if res.tokens)
    assert first_decode.start == pytest.approx(transfer)
    assert len(tokens_of(results, "a")) == 2          # tokens 2 and 3; token 1 came from the prefill worker
    # the same prompt again: blocks are cached locally, only the partial tail block crosses the link
    d.add_request("b", prompt, SamplingParams(max_tokens=2), 10.0, remote=RemotePrefill(first_token=5))
    results, _ = run(d, 10.0)
    first_decode = next(res for res in results if res.tokens)
    assert first_decode.start - 10.0 < transfer / 10


def test_kv_events_report_stored_and_removed_blocks():
    e = engine(num_blocks=16)
    e.add_request("a", list(range(160)), SamplingParams(max_tokens=1), 0.0)
    results, now = run(e)
    stored = [ev for res in results for ev in res.events if type(ev).__name__ == "BlockStored"]
    hashes = [h for ev in stored for h in ev.block_hashes]
    assert len(hashes) == 10 and stored[0].parent_block_hash is None
    assert sum(len(ev.token_ids) for ev in stored) == 160
    e.add_request("b", list(range(1000, 1160)), SamplingParams(max_tokens=1), now)
    results, _ = run(e, now)
    removed = [ev for res in results for ev in res.events if type(ev).__name__ == "BlockRemoved"]
    assert removed, "a full pool evicts cached blocks and says so"
