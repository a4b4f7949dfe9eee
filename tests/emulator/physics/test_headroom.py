"""Headroom beyond busy time: decode batch occupancy, MBU and MFU, from the engine's steps to the
cluster view. At low load a worker is busy decoding a small batch nearly all the time; these figures say
how much of each step and of the GPU's datasheet roofline that work used."""
from __future__ import annotations

import pytest

from emulator.engine_config import EngineConfig
from emulator.physics import roofline as r
from emulator.physics.catalog import builtin_catalog
from router.observability.cluster_view import HIT_RATE_DEFINITION, ClusterView, LoadSnapshot, Member
from workers.core.engine import Engine
from workers.core.request import SamplingParams

CAT = builtin_catalog()
DEP = r.Deployment(model=CAT.model("Llama-3.1-8B"), gpu=CAT.gpu("H100-SXM"))


def decode_run(batch: int, *, until: float | None) -> tuple[list, float]:
    """`batch` short prompts decoding 200 tokens each: (results, emulated seconds)."""
    e = Engine(DEP, EngineConfig(max_num_seqs=64))
    for i in range(batch):
        e.add_request(f"r{i}", list(range(i * 1000, i * 1000 + 64)), SamplingParams(max_tokens=200), 0.0)
    results, now = [], 0.0
    while e.has_work():
        res = e.step(now, until=None if until is None else now + until, quiet_events=until is not None)
        results.append(res)
        now = res.end if res.duration else (res.next_wakeup or now)
    return results, now


def test_merged_and_fast_forwarded_steps_carry_the_roofline_terms_of_single_steps():
    single, t1 = decode_run(8, until=None)
    merged, t2 = decode_run(8, until=1e9)   # fast-forwards the steady batch
    assert len(merged) < len(single) and t2 == pytest.approx(t1)
    for field in ("flops", "hbm_bytes", "decode_steps", "decode_tokens"):
        assert sum(getattr(x, field) for x in merged) == pytest.approx(sum(getattr(x, field) for x in single))


def test_a_small_batch_is_busy_but_far_from_the_roofline_and_a_big_one_is_not():
    def figures(batch):
        results, elapsed = decode_run(batch, until=1e9)
        g = DEP.gpu
        mbu = sum(x.hbm_bytes for x in results) / (g.hbm_bytes_per_s * elapsed)
        mfu = sum(x.flops for x in results) / (g.peak_flops(DEP.weight_dtype) * elapsed)
        steps = sum(x.decode_steps for x in results)
        return mbu, mfu, sum(x.decode_tokens for x in results) / steps
    small, big = figures(2), figures(64)
    # decode of an 8B model is memory bound: most of a step's time is the weight read at any small batch
    assert 0.3 < small[0] < 1.0 and small[1] < 0.05
    assert big[1] > 10 * small[1]          # compute per step grows with the batch, the weight read does not
    assert small[2] == pytest.approx(2, rel=0.05) and big[2] == pytest.approx(64, rel=0.05)


def snap(emulated: float, **fields) -> LoadSnapshot:
    return LoadSnapshot(emulated_now_s=emulated, max_num_seqs=64, peak_hbm_bytes_per_s=3.35e12,
                        peak_flops=989e12, **fields)


def test_the_view_reports_occupancy_mbu_and_mfu_per_worker_pool_and_cluster():
    view = ClusterView(window_s=10.0)
    members = [Member(id="a"), Member(id="b")]
    view.observe_load("a", 0.0, snap(0.0))
    view.observe_load("b", 0.0, snap(0.0))
    # a: 100 decode steps of 4 sequences in 10 s, moving half its bandwidth and 1% of its FLOPs
    view.observe_load("a", 10.0, snap(10.0, busy_decode_s=9.5, decode_steps=100, decode_tokens=400,
                                      hbm_bytes=0.5 * 3.35e13, flops=0.01 * 989e13))
    # b: 50 steps of 32 sequences
    view.observe_load("b", 10.0, snap(10.0, busy_decode_s=9.5, decode_steps=50, decode_tokens=1600,
                                      hbm_bytes=0.7 * 3.35e13, flops=0.08 * 989e13))
    v = view.view(10.0, members)
    a, b = v["workers"]
    assert a["decode_util"] == pytest.approx(0.95) and a["decode_occupancy"] == pytest.approx(4 / 64)
    assert a["decode_batch"] == pytest.approx(4) and a["mbu"] == pytest.approx(0.5) and a["mfu"] == pytest.approx(0.01)
    assert b["decode_occupancy"] == pytest.approx(0.5)
    c = v["cluster"]
    assert c["decode_occupancy"] == pytest.approx(2000 / (150 * 64))   # sequences over slots, all steps
    assert c["mbu"] == pytest.approx(0.6) and c["mfu"] == pytest.approx(0.045)
    assert v["hit_rate_definition"] == HIT_RATE_DEFINITION and "prompt tokens" in HIT_RATE_DEFINITION
    point = view.record(10.0, 10.0, members)
    assert point["mbu"] == pytest.approx(0.6) and point["decode_occupancy"] == c["decode_occupancy"]


def test_workers_that_report_no_roofline_figures_show_none_not_zero():
    view = ClusterView(window_s=10.0)
    view.observe_load("old", 0.0, LoadSnapshot(emulated_now_s=0.0))
    view.observe_load("old", 5.0, LoadSnapshot(emulated_now_s=5.0, busy_decode_s=1.0))
    c = view.view(5.0, [Member(id="old")])["cluster"]
    assert c["mbu"] is None and c["mfu"] is None and c["decode_occupancy"] is None
