"""Round robin, least loaded, prefix ring, kv_aware, pd_pair and the registry: behaviour pins."""
import pytest

from kvlab.wire.block_hash import block_hashes
from kvlab.wire.kv_events import BlockStored, KVEventBatch
from router.policies import KvIndex, NoWorkerAvailable, PolicySet, RouteRequest, WorkerView, build_policy
from router.policies.kv_aware import KvAware
from router.policies.least_loaded import LeastLoaded
from router.policies.pd_pair import PdPair
from router.policies.prefix_ring import PrefixRing
from router.policies.round_robin import RoundRobin


def views(n, **kw):
    return [WorkerView(f"w{i}", **kw) for i in range(n)]


def chain(ids):
    """Chained hashes of blocks whose 16 tokens all equal the given id: equal heads, equal hashes."""
    return block_hashes([i for i in ids for _ in range(16)])


def req(ids, policy=None):
    ids = list(ids)
    return RouteRequest(blocks=chain(ids), prompt_tokens=16 * len(ids), policy=policy)


def store(index, worker, ids):
    index.apply(worker, KVEventBatch(0.0, [BlockStored(chain(ids), None, [], 16)]))


def test_round_robin_cycles_over_healthy_workers():
    workers = views(3)
    workers[1].healthy = False
    policy = RoundRobin()
    assert [policy.choose(req([1]), workers).worker for _ in range(4)] == ["w0", "w2", "w0", "w2"]


def test_no_healthy_worker_raises():
    with pytest.raises(NoWorkerAvailable):
        RoundRobin().choose(req([1]), views(2, healthy=False))


def test_least_loaded_by_queue_and_by_kv_usage():
    workers = views(3)
    workers[0].running, workers[1].waiting, workers[2].running = 5, 2, 4
    assert LeastLoaded("queue").choose(req([1]), workers).worker == "w1"
    workers[0].kv_usage, workers[1].kv_usage, workers[2].kv_usage = 0.2, 0.9, 0.5
    assert LeastLoaded("kv_usage").choose(req([1]), workers).worker == "w0"


def test_least_loaded_spreads_ties_instead_of_piling_on_the_first():
    policy, workers = LeastLoaded("queue"), views(4)
    assert {policy.choose(req([1]), workers).worker for _ in range(4)} == {"w0", "w1", "w2", "w3"}


def test_least_loaded_rejects_an_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        LeastLoaded("gpu_temperature")


def test_prefix_ring_keys_on_the_first_k_blocks():
    policy, workers = PrefixRing(prefix_blocks=2), views(8)
    chosen = {policy.choose(req([11, 22, tail]), workers).worker for tail in range(50)}
    assert len(chosen) == 1
    spread = {policy.choose(req([head, 22]), workers).worker for head in range(50)}
    assert len(spread) > 4


def test_prefix_ring_short_prompts_key_on_what_they_have():
    policy, workers = PrefixRing(prefix_blocks=4), views(8)
    a = policy.choose(req([5]), workers).worker
    assert all(policy.choose(req([5]), workers).worker == a for _ in range(3))
    short = RouteRequest(blocks=[], prompt_tokens=3, short_key=99)
    assert policy.choose(short, workers).worker == policy.ring.owner(99)
    assert policy.choose(req([5, 6, 7, 8, 9]), workers).worker == policy.ring.owner(chain([5, 6, 7, 8])[-1])


def test_prefix_ring_keeps_keys_home_while_a_worker_is_briefly_unhealthy():
    policy, workers = PrefixRing(prefix_blocks=1), views(4)
    before = {k: policy.choose(req([k]), workers).worker for k in range(200)}
    workers[2].healthy = False
    during = {k: policy.choose(req([k]), workers).worker for k in range(200)}
    assert all(during[k] == before[k] for k in before if before[k] != "w2")
    workers[2].healthy = True
    assert {k: policy.choose(req([k]), workers).worker for k in range(200)} == before


def test_kv_aware_prefers_the_worker_holding_the_prefix():
    index = KvIndex()
    store(index, "w2", [1, 2, 3])
    store(index, "w1", [1])
    decision = KvAware(index).choose(req([1, 2, 3, 4]), views(4))
    assert (decision.worker, decision.matched_blocks) == ("w2", 3)
    assert decision.score == pytest.approx(0.75)


def test_kv_aware_trades_overlap_against_load():
    index = KvIndex()
    store(index, "w0", [1, 2])
    workers = views(2)
    workers[0].in_flight = 10
    # w0: 1.0 * 2/4 - 0.5 * 10/10 = 0.0; w1: 0 - 0 = 0.0 -> tie -> more matched blocks wins
    assert KvAware(index).choose(req([1, 2, 3, 4]), workers).worker == "w0"
    assert KvAware(index, load_weight=1.0).choose(req([1, 2, 3, 4]), workers).worker == "w1"


def test_kv_aware_breaks_cold_ties_by_prefix_not_by_position():
    policy, workers = KvAware(KvIndex()), views(4)
    first = {k: policy.choose(req([k, 9, 9, 9, 1]), workers).worker for k in range(40)}
    # same first 4 blocks (the tie-break key), another tail, workers listed in another order
    assert first == {k: policy.choose(req([k, 9, 9, 9, 2]), workers[::-1]).worker for k in range(40)}
    assert len(set(first.values())) == 4


def test_kv_aware_can_penalize_kv_usage():
    workers = views(2)
    workers[0].kv_usage = 0.95
    policy = KvAware(KvIndex(), kv_weight=1.0)
    assert all(policy.choose(req([k]), workers).worker == "w1" for k in range(20))


def pd_workers():
    return [WorkerView("p0", role="prefill"), WorkerView("p1", role="prefill"),
            WorkerView("d0", role="decode"), WorkerView("d1", role="decode")]


def test_pd_pair_disaggregates_long_uncached_prompts():
    index = KvIndex()
    policy = PdPair(RoundRobin(), KvAware(index), index, local_prefill_tokens=256)
    decision = policy.choose(req(range(1, 65)), pd_workers())
    assert decision.worker.startswith("d") and decision.prefill_worker.startswith("p")
    assert decision.uncached_tokens == 1024
    assert decision.charged == (decision.worker, decision.prefill_worker)


def test_pd_pair_prefills_locally_when_the_decode_worker_has_most_of_the_prompt():
    index = KvIndex()
    store(index, "d1", range(1, 61))
    decision = PdPair(RoundRobin(), KvAware(index), index, local_prefill_tokens=256).choose(
        req(range(1, 65)), pd_workers())
    assert decision.worker == "d1" and decision.prefill_worker is None
    assert decision.uncached_tokens == 64 and decision.charged == ("d1",)


def test_pd_pair_prefills_locally_when_no_prefill_worker_is_alive():
    workers = pd_workers()
    workers[0].healthy = workers[1].healthy = False
    decision = PdPair(RoundRobin(), RoundRobin(), local_prefill_tokens=0).choose(req(range(1, 65)), workers)
    assert decision.prefill_worker is None


def test_registry_builds_every_policy_by_name():
    for name in ["round_robin", "least_loaded", "prefix_ring", "prefix_bounded", "kv_aware", "pd_pair"]:
        policy = build_policy(name)
        assert policy.choose(req([1, 2]), views(3) + pd_workers()).policy == name


def test_registry_rejects_unknown_names_and_settings():
    with pytest.raises(ValueError, match="unknown routing policy"):
        build_policy("random_forest")
    with pytest.raises(ValueError, match="bad settings"):
        build_policy("prefix_bounded", {"epsilon": 0.1})


def test_policy_set_routes_per_request_overrides_and_shares_the_index():
    policies = PolicySet.from_settings({"policy": "round_robin", "policies": {"kv_aware": {"load_weight": 0}}})
    store(policies.index, "w3", [1, 2])
    workers = views(4)
    assert policies.choose(req([1, 2]), workers).policy == "round_robin"
    assert policies.choose(req([1, 2], policy="kv_aware"), workers).worker == "w3"
    with pytest.raises(ValueError):
        policies.choose(req([1], policy="nope"), workers)


def test_policy_set_removal_reaches_rings_and_index():
    policies = PolicySet("prefix_ring")
    for w in ["w0", "w1", "w2"]:
        policies.add_worker(w)
    store(policies.index, "w1", [5])
    policies.remove_worker("w1")
    assert "w1" not in policies.get("prefix_ring").ring and policies.index.match([5]) == {}
    assert "w1" not in policies.get("prefix_bounded").ring  # built later, with the current members
