"""Tier-aware routing: the KV index keeps each block's medium, and kv_aware and prefix_bounded credit
host-held blocks by what onboarding them saves on the roofline (emulator.physics.steptime.host_hit_credit)."""
import msgspec
import pytest

from emulator.physics import steptime
from emulator.physics.catalog import builtin_catalog
from emulator.sim.simulator import Simulator
from emulator.spec import load_spec
from kvlab.wire.block_hash import block_hashes
from kvlab.wire.kv_events import BlockRemoved, BlockStored, KVEventBatch
from router.policies.base import RouteRequest, WorkerView
from router.policies.bounded_load import PrefixBounded
from router.policies.kv_aware import KvAware
from router.policies.kv_index import KvIndex
from router.policies.registry import host_credit

CAT = builtin_catalog()
PCIE5 = CAT.link("PCIe-Gen5")


def _chain(ids):
    return block_hashes([i for i in ids for _ in range(16)])


def _apply(index, worker, events):
    index.apply(worker, KVEventBatch(0.0, events))


def test_index_keeps_the_medium_of_each_block():
    index = KvIndex(host_credit=0.5)
    h = _chain([1, 2, 3, 4])
    _apply(index, "w0", [BlockStored(h[:2], None, [], 16)])
    _apply(index, "w0", [BlockStored(h[2:], None, [], 16, medium="CPU")])
    _apply(index, "w1", [BlockStored(h, None, [], 16)])
    assert index.match_tiers(h) == {"w0": (2, 2), "w1": (4, 0)}
    assert index.match(h) == {"w0": 2, "w1": 4}          # HBM-only questions are unchanged
    # demotion as the engine reports it: removed from HBM, stored on the CPU
    _apply(index, "w1", [BlockRemoved(h[1:], medium="GPU"), BlockStored(h[1:], None, [], 16, medium="CPU")])
    assert index.match_tiers(h)["w1"] == (1, 3)
    _apply(index, "w1", [BlockRemoved(h[1:], medium="CPU")])
    assert index.match_tiers(h)["w1"] == (1, 0)


def test_kv_aware_credits_host_blocks_by_their_onboarding_saving():
    h = _chain(range(1, 11))
    request = RouteRequest(blocks=h, prompt_tokens=160)
    workers = [WorkerView("w0"), WorkerView("w1")]
    for credit, winner in ((0.9, "w0"), (0.3, "w1")):
        index = KvIndex(host_credit=credit)
        _apply(index, "w0", [BlockStored(h[:2], None, [], 16), BlockStored(h[2:], None, [], 16, medium="CPU")])
        _apply(index, "w1", [BlockStored(h[:5], None, [], 16)])
        # w0: 2 + 8 x credit blocks; w1: 5 blocks in HBM
        decision = KvAware(index).choose(request, workers)
        assert decision.worker == winner
        assert decision.score == pytest.approx(max(2 + 8 * credit, 5) / 10)


def test_host_credit_comes_from_the_spec_roofline_only_with_a_host_tier():
    spec = load_spec("default")
    assert host_credit(spec) is None
    tiered = msgspec.structs.replace(spec, engine=msgspec.structs.replace(spec.engine, host_kv_gb=320.0))
    dep = tiered.deployment("both")
    assert host_credit(tiered) == pytest.approx(steptime.host_hit_credit(dep, PCIE5, 8192))
    index = Simulator(tiered, policy="kv_aware").policies.index
    assert index.host_credit == host_credit(tiered)


def test_prefix_bounded_follows_a_history_kept_in_host_memory():
    h = _chain(range(1, 21))
    request = RouteRequest(blocks=h, prompt_tokens=320)
    workers = [WorkerView("w0"), WorkerView("w1")]
    for credit, winner in ((0.9, "w0"), (None, "w1")):
        index = KvIndex(host_credit=credit)
        _apply(index, "w0", [BlockStored(h[:6], None, [], 16), BlockStored(h[6:], None, [], 16, medium="CPU")])
        _apply(index, "w1", [BlockStored(h[:10], None, [], 16)])
        policy = PrefixBounded(index=index, prefix_blocks=4)
        for w in workers:
            policy.add_worker(w.id)
        # w0: 6 + 14 x 0.9 = 18.6 credited blocks; w1: 10. Without a host tier the CPU events are ignored.
        assert policy.choose(request, workers).worker == winner
