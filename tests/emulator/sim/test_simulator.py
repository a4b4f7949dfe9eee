"""The discrete-event simulator runs the live engine and policies under a virtual clock."""
import msgspec
import pytest

from emulator import workload
from emulator.physics import roofline as r
from emulator.sim.simulator import SimRequest, Simulator
from emulator.spec import example_spec_path, load_spec, parse_spec

TINY = load_spec(example_spec_path("tiny-test"))
DISAGG = load_spec(example_spec_path("disagg-70b-h100"))


def one(prompt_len: int, max_tokens: int, rid="a", t=0.0, base=0) -> SimRequest:
    return SimRequest(request_id=rid, arrival_s=t, tokens=list(range(base, base + prompt_len)), max_tokens=max_tokens)


def test_a_lone_request_takes_exactly_the_roofline_times():
    sim = Simulator(TINY).run([one(3000, 11)])
    rec = sim.log.records["a"]
    dep = TINY.deployment("both")
    # max_num_batched_tokens = 2048: two prefill chunks, the second over 2048 cached tokens;
    # only the last one samples a token (pays the lm head)
    first_chunk = r.step_time(dep, r.BatchShape().add(2048, 0, samples=False)).seconds
    prefill = first_chunk + r.step_time(dep, r.BatchShape().add(952, 2048)).seconds
    assert rec.first - rec.arrival == pytest.approx(prefill, rel=1e-9)
    decode = sum(r.decode_time(dep, [3000 + i]).seconds for i in range(10))
    assert rec.last - rec.first == pytest.approx(decode, rel=1e-9)
    assert rec.tokens == 11 and rec.done


def test_same_workload_same_numbers():
    reqs = workload.from_spec(TINY, 4.0, num_requests=150)
    a = Simulator(TINY).run(reqs).summary()
    b = Simulator(TINY).run(workload.from_spec(TINY, 4.0, num_requests=150)).summary()
    assert msgspec.json.encode(a) == msgspec.json.encode(b)
    assert a.completed == 150 and a.prefix_hit_rate > 0.3


def test_prefix_routing_beats_round_robin_on_shared_system_prompts():
    spec = load_spec(example_spec_path("colocated-8b-h100"))
    reqs = workload.generate(6.0, num_requests=300, mix={"chat": 1.0}, seed=3)
    rates = {p: Simulator(spec, policy=p).run(reqs).summary().prefix_hit_rate
             for p in ("round_robin", "prefix_bounded", "kv_aware")}
    assert rates["prefix_bounded"] > rates["round_robin"]
    assert rates["kv_aware"] > rates["round_robin"]


def test_routing_hashes_blocks_of_the_engines_block_size():
    """kv_aware's index matches the engines' KV events only if the router hashes their block size."""
    engine = msgspec.structs.replace(TINY.engine, block_size=32)
    spec = msgspec.structs.replace(TINY, engine=engine)
    sim = Simulator(spec, policy="kv_aware").run(workload.from_spec(spec, 4.0, num_requests=100))
    summary = sim.summary()
    assert summary.completed == 100 and summary.prefix_hit_rate > 0.3


def test_disaggregated_first_token_from_prefill_then_transfer_then_decode():
    spec = parse_spec(open(example_spec_path("disagg-70b-h100")).read().replace(
        "local_prefill_tokens = 512", "local_prefill_tokens = 0"))
    sim = Simulator(spec).run([one(4000, 3)])
    rec = sim.log.records["a"]
    dep = spec.deployment("prefill")
    assert rec.first == pytest.approx(r.prefill_time(dep, 4000).seconds, rel=1e-9)
    transfer = r.kv_transfer_time(4000 * r.kv_bytes_per_token_per_gpu(dep), spec.kv_transfer_link())
    second_token = rec.first + transfer + r.decode_time(spec.deployment("decode"), [4000]).seconds
    decode_step = r.decode_time(spec.deployment("decode"), [4001]).seconds
    assert rec.last == pytest.approx(second_token + decode_step, rel=1e-6)
    routed = {w: v["routed"] for w, v in sim.summary().workers.items()}
    assert sum(v for w, v in routed.items() if w.startswith("prefill")) == 1
    assert sum(v for w, v in routed.items() if w.startswith("decode")) == 1
    assert all(w.engine.blocks.num_used == 0 for w in sim.workers.values())   # held KV was released


def test_a_disaggregated_requests_hit_is_its_prefill_workers():
    # The prefill worker computes the prompt's last token, so it reuses whole blocks before it only;
    # the decode worker holding the first answer's 4,000 prompt tokens would count all 250 blocks.
    spec = parse_spec(open(example_spec_path("disagg-70b-h100")).read().replace(
        "local_prefill_tokens = 512", "local_prefill_tokens = 0"))
    sim = Simulator(spec).run([one(4000, 3, rid="a"), one(4000, 3, rid="b", t=5.0)])
    assert sim.log.records["a"].cached_tokens == 0
    assert sim.log.records["b"].cached_tokens == 3984   # as router.forwarding.pd answers the client


def test_overload_queues_or_rejects_but_accounts_for_every_request():
    spec = parse_spec(open(example_spec_path("tiny-test")).read().replace("max_waiting = 256", "max_waiting = 4"))
    reqs = [one(2000, 200, rid=f"r{i}", t=i * 0.001, base=i * 10_000) for i in range(200)]
    s = Simulator(spec).run(reqs).summary()
    assert s.rejected > 0
    assert s.completed + s.rejected == s.requests == 200


@pytest.mark.parametrize("policy", ["prefix_bounded", "kv_aware"])
def test_merged_and_fast_forwarded_steps_give_the_numbers_of_single_steps(policy):
    reqs = workload.generate(3.0, num_requests=120, mix={"chat": 0.6, "agentic": 0.4}, seed=5)
    fast = Simulator(TINY, policy=policy).run(reqs)
    slow = Simulator(TINY, policy=policy, merge_steps=False).run(reqs)
    assert sum(w.steps for w in fast.workers.values()) == sum(w.steps for w in slow.workers.values())
    a, b = msgspec.to_builtins(fast.summary()), msgspec.to_builtins(slow.summary())
    for w in a["workers"]:            # the KV-usage integral samples usage at the end of merged runs
        a["workers"][w].pop("kv_usage_mean"), b["workers"][w].pop("kv_usage_mean")
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():  # equal up to float summation order (cumsum vs step by step)
        if isinstance(value, str):
            assert value == flat_b[key], key
        else:
            assert value == pytest.approx(flat_b[key], rel=1e-9, abs=1e-12), key


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_a_windowed_hit_rate_leaves_the_warm_up_misses_out():
    reqs = workload.from_spec(TINY, 4.0, num_requests=300)
    sim = Simulator(TINY).run(reqs)
    late = [r for r in sim.log.records.values() if r.done and r.arrival >= 30.0]
    expected = sum(r.cached_tokens for r in late) / sum(r.prompt_tokens for r in late)
    assert sim.summary(window=(30.0, 1e9)).prefix_hit_rate == pytest.approx(expected)
    assert expected > sim.summary().prefix_hit_rate   # the first requests of each prefix missed
