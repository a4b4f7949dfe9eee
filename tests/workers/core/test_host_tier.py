"""The host-memory KV tier: demotion of evicted blocks, onboarding at the host link's bandwidth, KV events
with their medium, per-tier hit counters and metrics, and the router credit derived from the roofline."""
import msgspec
import pytest

from emulator.engine_config import EngineConfig
from emulator.physics import roofline as r
from emulator.physics import steptime
from emulator.physics.catalog import builtin_catalog
from emulator.sim.simulator import Simulator
from emulator.spec import load_spec
from kvlab.wire.kv_events import BlockRemoved, BlockStored, KVEventBatch, decode_batch, encode_batch
from workers.core.engine import Engine
from workers.core.request import SamplingParams
from workers.metrics import WorkerMetrics
from workers.spec_config import spec_engine

CAT = builtin_catalog()
DEP = r.Deployment(model=CAT.model("Llama-3.1-8B"), gpu=CAT.gpu("H100-SXM"))
PCIE5 = CAT.link("PCIe-Gen5")
A = list(range(1, 321))        # 20 blocks of 16
B = list(range(1001, 1321))


def tiered(num_blocks=24, host_kv_gb=0.1) -> Engine:
    return Engine(DEP, EngineConfig(num_blocks=num_blocks, host_kv_gb=host_kv_gb), swap_link=PCIE5)


def serve(e: Engine, rid: str, prompt: list[int], now: float):
    """Run one request alone to completion: (finished record, its TTFT, end time, events)."""
    e.add_request(rid, prompt, SamplingParams(max_tokens=2), now)
    arrival, first, fin, events = now, None, None, []
    while e.has_work():
        res = e.step(now)
        events += res.events
        if first is None and res.tokens:
            first = res.end
        fin = fin or next((f for f in res.finished if f.request_id == rid), None)
        now = res.end if res.duration else (res.next_wakeup or now)
    return fin, first - arrival, now, events


def test_default_spec_has_no_host_tier():
    spec = load_spec("default")
    assert spec_engine(spec, spec.worker_list()[0].id).blocks.host is None


def test_evicted_prefix_is_onboarded_from_host_not_recomputed():
    e = tiered()
    _, cold_ttft, now, _ = serve(e, "a", A, 0.0)
    _, _, now, events = serve(e, "b", B, now)          # pushes most of A out of HBM, into host memory
    demoted = [h for ev in events if isinstance(ev, BlockStored) and ev.medium == "CPU" for h in ev.block_hashes]
    assert demoted and all(h in e.blocks.host for h in demoted)
    fin, warm_ttft, _, events = serve(e, "a2", A, now)
    assert fin.host_cached_tokens > 0 and fin.cached_tokens == 19 * 16   # all usable blocks, some from host
    assert e.blocks.host_hits == fin.host_cached_tokens
    onboarded = [h for ev in events if isinstance(ev, BlockRemoved) and ev.medium == "CPU" for h in ev.block_hashes]
    assert len(onboarded) >= fin.host_cached_tokens // 16
    # The load delays only this prefill, by the host link's time; far less than recomputing the blocks.
    load = steptime.host_onboard_time(DEP, fin.host_cached_tokens, PCIE5)
    assert warm_ttft >= load
    assert warm_ttft < cold_ttft


def test_without_host_tier_the_same_prefix_is_recomputed():
    e = tiered(host_kv_gb=0.0)
    _, _, now, _ = serve(e, "a", A, 0.0)
    _, _, now, _ = serve(e, "b", B, now)
    fin, _, _, _ = serve(e, "a2", A, now)
    assert fin.host_cached_tokens == 0 and fin.cached_tokens < 19 * 16


def test_host_tier_capacity_follows_gb_and_kv_bytes():
    e = tiered(host_kv_gb=1.0)
    per_block = 16 * r.kv_bytes_per_token_per_gpu(DEP)
    assert e.blocks.host.capacity == int(1e9 // per_block)


def test_cpu_medium_survives_the_wire_format():
    events = [BlockStored(block_hashes=[7], parent_block_hash=None, token_ids=[], block_size=16, medium="CPU"),
              BlockRemoved(block_hashes=[7], medium="CPU"), BlockRemoved(block_hashes=[8])]
    back = decode_batch(encode_batch(KVEventBatch(ts=1.0, events=events))).events
    assert [e.medium for e in back] == ["CPU", "CPU", "GPU"]


def test_per_tier_hits_are_exported_under_vllm_connector_names():
    e = tiered()
    _, _, now, _ = serve(e, "a", A, 0.0)
    _, _, now, _ = serve(e, "b", B, now)
    serve(e, "a2", A, now)
    text = WorkerMetrics(e, "m").exposition().decode()
    line = next(x for x in text.splitlines() if x.startswith("vllm:external_prefix_cache_hits_total"))
    assert float(line.split()[-1]) == e.blocks.host_hits > 0
    assert "vllm:external_prefix_cache_queries_total" in text and "kvlab:host_kv_blocks" in text


def test_host_credit_is_between_zero_and_one_and_falls_with_a_slower_link():
    fast = steptime.host_hit_credit(DEP, PCIE5)
    slow = steptime.host_hit_credit(DEP, CAT.link("PCIe-Gen4"))
    assert 0.0 < slow < fast < 1.0


def test_merged_steps_give_the_numbers_of_single_steps_with_a_host_tier():
    from emulator import traces
    recs = [traces.TraceRecord(timestamp=300 * i, input_length=1024, output_length=20,
                               hash_ids=[i % 20, 100 + i]) for i in range(120)]
    spec = load_spec("default")
    spec = msgspec.structs.replace(spec, engine=msgspec.structs.replace(spec.engine, host_kv_gb=2.0))
    runs = [Simulator(spec, policy="kv_aware", num_blocks=100, merge_steps=m).run(traces.trace_requests(recs))
            for m in (False, True)]
    single, merged = (msgspec.to_builtins(s.summary()) for s in runs)
    assert single["host_hit_rate"] > 0
    for summary in (single, merged):   # KV usage is sampled at the end of merged runs: not comparable
        for worker in summary["workers"].values():
            worker.pop("kv_usage_mean")
    assert _close(merged, single)


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b
