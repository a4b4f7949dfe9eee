"""One routing core (router.policies.routing): the router's proxy and the simulator route a request
sequence to the same workers, charge and release in-flight alike, and neither hands a prefill-role
worker to a colocated policy."""
import random

import httpx
import pytest

from emulator.sim.simulator import Simulator
from emulator.spec import load_spec
from router.config import HealthConfig, RouterConfig, Timeouts, WorkerConfig
from router.forwarding.proxy import Proxy
from router.observability.metrics import RouterMetrics
from router.policies import routing
from router.policies.base import Decision, RouteRequest, WorkerView
from router.policies.kv_index import KvIndex
from router.policies.registry import PolicySet
from router.pool.worker_pool import WorkerPool

COLOCATED = ["round_robin", "least_loaded", "prefix_ring", "prefix_bounded", "kv_aware"]


def _prompts(count: int, seed: int = 7) -> list[list[int]]:
    """Prompts of 50-2,000 tokens, half of them opening with one of three shared prefixes."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 30_000) for _ in range(rng.randrange(64, 600))] for _ in range(3)]
    prompts = []
    for _ in range(count):
        head = rng.choice(prefixes) if rng.random() < 0.5 else []
        prompts.append(head + [rng.randrange(1, 30_000) for _ in range(rng.randrange(50, 1400))])
    return prompts


async def _proxy(spec, policy: str, settings: dict) -> Proxy:
    """A router's proxy over the spec's workers; the pool's probes reach a stub that reports them idle."""
    stub = httpx.MockTransport(lambda r: httpx.Response(200, json={"data": []} if r.url.path == "/v1/models" else {}))
    metrics = RouterMetrics()
    pool = WorkerPool(httpx.AsyncClient(transport=stub), HealthConfig(), Timeouts(), metrics)
    policies = PolicySet(policy, {policy: settings}, KvIndex(block_size=spec.engine.block_size))
    for slot in spec.worker_list():
        await pool.add(WorkerConfig(url=f"http://{slot.id}", id=slot.id, role=slot.role))
        policies.add_worker(slot.id)
    assert pool.up_count() == len(spec.worker_list())
    return Proxy(RouterConfig(), pool, policies, upstream=None, metrics=metrics, tokenizer=None)


def _route_both(spec, policy: str, settings: dict, proxy: Proxy, count: int = 120):
    """Route the same prompts through both; every third request's leases end before the next one."""
    sim = Simulator(spec, policy=policy, settings=settings)
    by_proxy, by_sim = [], []
    for i, tokens in enumerate(_prompts(count)):
        decision = proxy.route(RouteRequest.from_tokens(tokens, block_size=spec.engine.block_size), set())
        lease, _ = proxy._charge(decision)
        simulated, sim_lease = sim.route(tokens)
        by_proxy.append((decision.worker, decision.prefill_worker))
        by_sim.append((simulated.worker, simulated.prefill_worker))
        if i % 3 == 0:
            lease.release_all()
            sim_lease.release_all()
    in_flight = {v.id: v.in_flight for v in proxy.pool.views()}
    assert in_flight == {w.id: w.view.in_flight for w in sim.workers.values()}
    return by_proxy, by_sim, sim


@pytest.mark.parametrize("policy", COLOCATED)
async def test_proxy_and_simulator_choose_alike_on_a_colocated_cluster(policy):
    spec = load_spec("colocated-8b-h100")
    by_proxy, by_sim, _ = _route_both(spec, policy, {}, await _proxy(spec, policy, {}))
    assert by_proxy == by_sim
    assert len({worker for worker, _ in by_sim}) > 1   # the sequence exercises the choice


@pytest.mark.parametrize("policy", ["pd_pair", *COLOCATED])
async def test_proxy_and_simulator_choose_alike_on_prefill_and_decode_pools(policy):
    spec = load_spec("disagg-70b-h100")
    settings = dict(spec.router.settings) if policy == spec.router.policy else {}
    by_proxy, by_sim, sim = _route_both(spec, policy, settings, await _proxy(spec, policy, settings))
    assert by_proxy == by_sim
    prefill = {w.id for w in sim.workers.values() if w.role == "prefill"}
    if policy == "pd_pair":
        assert any(p in prefill for _, p in by_sim)   # long prompts do go to a prefill worker
    else:
        assert not any(worker in prefill for worker, _ in by_sim)   # a colocated policy never gets one


def test_routable_drops_prefill_workers_for_colocated_policies_and_excluded_workers():
    views = [WorkerView(id="p", role="prefill"), WorkerView(id="d", role="decode"), WorkerView(id="b")]
    assert [v.id for v in routing.routable(views, "least_loaded")] == ["d", "b"]
    assert [v.id for v in routing.routable(views, "pd_pair")] == ["p", "d", "b"]
    assert [v.id for v in routing.routable(views, "pd_pair", {"d"})] == ["p", "b"]
    both = [WorkerView(id="a"), WorkerView(id="b")]
    assert routing.routable(both, "round_robin") is both   # nothing to drop: no copy on the hot path


class _Counted:
    def __init__(self, worker_id: str):
        self.id, self.in_flight = worker_id, 0

    def charge(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def test_a_lease_charges_each_worker_once_and_releases_each_once():
    workers = {name: _Counted(name) for name in ("d", "p")}
    decision = Decision(worker="d", policy="pd_pair", prefill_worker="p")
    lease = routing.charge(decision, workers.__getitem__)
    assert (workers["d"].in_flight, workers["p"].in_flight) == (1, 1)
    lease.release(workers["p"])
    lease.release(workers["p"])   # a second release of the same part changes nothing
    lease.release_all()
    assert (workers["d"].in_flight, workers["p"].in_flight) == (0, 0)
    assert routing.plan(decision) == routing.Plan(first="p", decode="d")
    assert routing.plan(Decision(worker="d", policy="pd_pair", prefill_worker="d")) == routing.Plan("d", None)


def test_a_choice_whose_line_is_full_is_made_again_among_the_lines_with_room():
    views = [WorkerView(id="a", queued=4, in_flight=6), WorkerView(id="b", queued=3, in_flight=7),
             WorkerView(id="c", queued=3, in_flight=5), WorkerView(id="d", queued=1, healthy=False)]
    offered: list[list[str]] = []

    def again(room):   # the policy's second choice: here, the first worker it is offered
        offered.append([v.id for v in room])
        return Decision(worker=room[0].id, policy="kv_aware", matched_blocks=5)

    owner = Decision(worker="a", policy="kv_aware", matched_blocks=12, score=3.0)
    moved = routing.keep_in_line(owner, views, 4, again)
    assert offered == [["b", "c"]]                          # healthy lines with room only
    assert (moved.worker, moved.line_full, moved.matched_blocks) == ("b", "a", 5)
    assert routing.keep_in_line(owner, views, 5, again) is owner          # a still has room
    full = [WorkerView(id="a", queued=4), WorkerView(id="b", queued=4)]
    assert routing.keep_in_line(owner, full, 4, again) is owner           # nowhere to go: the shedder refuses next
    pair = Decision(worker="a", policy="pd_pair", prefill_worker="b")
    assert routing.keep_in_line(pair, views, 4, again) is pair            # P/D pairs keep their pair
    predicted = Decision(worker="a", policy="slo_aware", predicted_ttft_s=0.3)
    assert routing.keep_in_line(predicted, views, 4, again) is predicted  # slo_aware predicts its own TTFT
    assert len(offered) == 1


@pytest.mark.parametrize("policy", ["prefix_bounded", "kv_aware"])
def test_a_prefix_affine_policy_moved_off_a_full_line_still_routes_by_prefix(policy):
    spec = load_spec("colocated-8b-h100")
    policies = PolicySet(policy, {policy: {}}, KvIndex(block_size=spec.engine.block_size))
    views = [WorkerView(id=w.id) for w in spec.worker_list()]
    for view in views:
        policies.add_worker(view.id)
    request = RouteRequest.from_tokens([9] * 256, block_size=spec.engine.block_size)
    home = routing.choose(policies, request, views).worker
    next(v for v in views if v.id == home).queued = 2
    moved = routing.choose(policies, request, views, line=2)
    assert moved.line_full == home and moved.worker != home
    assert moved.worker == routing.choose(policies, request, [v for v in views if v.id != home]).worker
