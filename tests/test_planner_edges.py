"""The planner at the edges of its range, where fleets are sized: each case a defect once found,
checked against the simulator (the arbiter) or against the queue's own stability."""
import math

import pytest

from emulator import planner
from emulator.planner import EngineLimits, LengthDist, PlanRequest, Slo, Workload, context, colocated, decode
from emulator.spec import parse_spec
from loadtests import sim_curve

FIXED_8B_SMALL_CHUNK = '''
name = "8b-small-chunk"
model = "Llama-3.1-8B"
gpu = "H100-SXM"
[engine]
max_num_batched_tokens = 512
[[pools]]
role = "both"
count = 1
[router]
policy = "round_robin"
shedding = false
[slo]
ttft_p99_s = 0.2
itl_p99_s = 0.025
[workload]
mix = { chat = 1.0 }
params = { chat = { shared_count = 1, shared_len = { median = 1, sigma = 0 }, unique_len = { median = 1023, sigma = 0 }, output_len = { median = 256, sigma = 0 } } }
warmup_s = 20
duration_s = 600
'''


def small_chunk_inputs():
    req = PlanRequest(model="Llama-3.1-8B", gpu="H100-SXM", engine=EngineLimits(max_num_batched_tokens=512))
    work = Workload(rate=1.0, prompt=LengthDist.fixed(1024), output=LengthDist.fixed(256))
    return req, work, Slo(ttft_p99=0.2, itl_p99=0.025)


def test_batch_solver_finds_the_smallest_root_without_assuming_concavity():
    # h rises through 0 at b = 30, then turns -inf past 200 (a batch that starves prefill): the old
    # solver looked only at h(cap) and called this saturated
    h = lambda b: b - 30.0 if b < 200 else -math.inf  # noqa: E731
    assert decode.solve_batch(h, 256.0) == pytest.approx(30.0, rel=1e-3)
    assert decode.solve_batch(lambda b: -1.0, 256.0) is None
    assert decode.solve_batch(lambda b: b + 1.0, 256.0) == 0.0


def test_slot_wait_exists_when_the_chunk_budget_leaves_no_room_at_the_sequence_cap():
    # 512-token budget, 256-sequence cap: with every slot running, prefill gets 256 tokens a step and
    # cannot keep up at 19 req/s; the running count still has a steady state well below the cap
    req, work, _ = small_chunk_inputs()
    ctx = context.build(req, work)
    point = colocated.evaluate(ctx, 19.0)
    assert point.stable and 20 < point.batch < 60
    assert colocated.slot_wait(ctx, 19.0) is not None


def test_colocated_8b_small_chunk_cmax_agrees_with_the_simulator():
    req, work, slo = small_chunk_inputs()
    cap = planner.capacity(req, work, slo)
    assert cap.binding == "ttft_slo"          # not a roofline ceiling: the TTFT SLO fails first
    spec = parse_spec(FIXED_8B_SMALL_CHUNK)
    below = sim_curve.simulate(spec, 0.9 * cap.max_rate, 3000)
    above = sim_curve.simulate(spec, 1.1 * cap.max_rate, 3000)
    assert below.ttft.p99 <= slo.ttft_p99 and below.itl.p99 <= slo.itl_p99      # the sim holds the SLO 10% below
    assert above.ttft.p99 > slo.ttft_p99 or above.itl.p99 > slo.itl_p99         # and breaks it 10% above
