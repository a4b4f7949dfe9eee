"""Tenant priority classes in the engine's waiting queue: with engine.scheduling_policy = "priority" an
interactive request that arrives later is scheduled before a waiting batch one; FCFS within a class;
with "fcfs" (the default) arrival order alone decides."""
import msgspec

from emulator.sim.simulator import SimRequest, Simulator
from emulator.spec import TenantSpec, load_spec


def spec(policy: str):
    base = load_spec("default")
    one = msgspec.structs.replace(base.pools[0], count=1)
    return msgspec.structs.replace(base, pools=[one],
                                   engine=msgspec.structs.replace(base.engine, scheduling_policy=policy,
                                                                  max_num_batched_tokens=2048),
                                   tenants=[TenantSpec(name="chat", priority="interactive"),
                                            TenantSpec(name="bulk", priority="batch")])


def first_tokens(policy: str) -> dict[str, float]:
    def prompt(i: int) -> list[int]:
        return list(range(10_000 * (i + 1), 10_000 * (i + 1) + 2048))   # one step's budget each
    # A backlog of batch prompts, then an interactive prompt arriving behind them.
    requests = [SimRequest(request_id=f"bulk{i}", arrival_s=0.001 * i, tokens=prompt(i), max_tokens=4,
                           tenant="bulk") for i in range(6)]
    requests += [SimRequest(request_id="chat0", arrival_s=0.01, tokens=prompt(7), max_tokens=4, tenant="chat"),
                 SimRequest(request_id="chat1", arrival_s=0.011, tokens=prompt(8), max_tokens=4, tenant="chat")]
    sim = Simulator(spec(policy), policy="least_loaded").run(requests)
    return {rid: r.first for rid, r in sim.log.records.items()}


def test_interactive_requests_pass_waiting_batch_requests_under_priority_scheduling():
    first = first_tokens("priority")
    waiting_bulk = [first[f"bulk{i}"] for i in range(2, 6)]   # not yet admitted when chat0 arrived
    assert first["chat0"] < min(waiting_bulk) and first["chat1"] < min(waiting_bulk)
    assert first["chat0"] <= first["chat1"]                      # FCFS within the class
    assert sorted(waiting_bulk) == waiting_bulk                  # and within batch


def test_fcfs_scheduling_keeps_arrival_order():
    first = first_tokens("fcfs")
    assert first["chat0"] > max(first[f"bulk{i}"] for i in range(6))
