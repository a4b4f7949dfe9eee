"""slo_aware: its choice on hand-made worker states, its refusals, the ledger that feeds it, and its
TTFT prediction against the simulator's."""
import numpy as np
import pytest

from emulator.sim.simulator import SimRequest, Simulator
from emulator.spec import load_spec
from kvlab.wire.block_hash import block_hashes
from kvlab.wire.kv_events import BlockStored, KVEventBatch
from router.policies.base import Decision, RouteRequest, WorkerView
from router.policies.kv_index import KvIndex
from router.policies.registry import PolicySet, build_policy
from router.policies.slo_aware import PHASE_STEPS, SloAware, SloUnmet, predict, step_left
from router.policies.slo_ledger import PrefillLedger
from router.policies.slo_table import from_spec

SPEC = load_spec("default")
TABLE = from_spec(SPEC)
PROMPT = list(range(1000, 1000 + 4096))   # 256 blocks of 16


def cached_on(index: KvIndex, worker: str, tokens: list[int]) -> None:
    index.apply(worker, KVEventBatch(0.0, [BlockStored(block_hashes(tokens), None, [], 16)]))


def route(tokens=PROMPT, **slo) -> RouteRequest:
    return RouteRequest(blocks=block_hashes(tokens), prompt_tokens=len(tokens), **slo)


def test_the_table_prices_longer_prefills_higher_and_bigger_batches_slower():
    assert 0 < TABLE.prefill_work(512, 0) < TABLE.prefill_work(4096, 0) < TABLE.prefill_work(4096, 60_000)
    assert TABLE.decode_step(1, 0) < TABLE.decode_step(256, 0) < TABLE.decode_step(256, 500_000)
    assert TABLE.onboard(0) == 0.0   # the default spec has no host tier


def test_a_cached_prefix_wins_when_both_workers_are_idle():
    index = KvIndex()
    cached_on(index, "b", PROMPT)
    decision = SloAware(index, TABLE).choose(route(), [WorkerView("a"), WorkerView("b")])
    assert decision.worker == "b" and decision.matched_blocks == 256
    assert decision.prefill_tokens == 1   # a whole-prompt hit still computes the last token
    idle_miss = predict(TABLE, WorkerView("a"), len(PROMPT), 0, 0).ttft_s
    assert decision.predicted_ttft_s < idle_miss / 10


def test_a_long_prefill_queue_outweighs_the_cached_prefix():
    index = KvIndex()
    cached_on(index, "b", PROMPT)
    busy = WorkerView("b", in_flight=6, prefill_queue=6, prefill_queue_tokens=48_000,
                      prefill_queue_s=TABLE.prefill_work(48_000, 0))
    decision = SloAware(index, TABLE).choose(route(), [WorkerView("a"), busy])
    assert decision.worker == "a"
    assert decision.predicted_ttft_s == pytest.approx(predict(TABLE, WorkerView("a"), len(PROMPT), 0, 0).ttft_s)


def test_a_worker_whose_decode_batch_breaks_the_itl_slo_is_passed_over():
    index = KvIndex()
    cached_on(index, "b", PROMPT)
    crowded = WorkerView("b", in_flight=256, decode_context_tokens=300_000)   # still first to the first token
    itl = predict(TABLE, crowded, len(PROMPT), 256, 0).itl_s
    policy = SloAware(index, TABLE, itl_slo_s=itl * 0.9)
    assert policy.choose(route(), [WorkerView("a"), crowded]).worker == "a"
    assert SloAware(index, TABLE, itl_slo_s=itl * 1.1).choose(route(), [WorkerView("a"), crowded]).worker == "b"


def test_stated_slos_that_no_worker_can_meet_are_refused_with_the_reason():
    policy = SloAware(KvIndex(), TABLE)
    workers = [WorkerView("a"), WorkerView("b")]
    best = predict(TABLE, WorkerView("a"), len(PROMPT), 0, 0)
    assert policy.choose(route(slo_ttft_s=best.ttft_s * 1.01), workers).worker in ("a", "b")
    with pytest.raises(SloUnmet, match="first token within"):
        policy.choose(route(slo_ttft_s=best.ttft_s * 0.99), workers)
    with pytest.raises(SloUnmet, match="time per output token"):
        policy.choose(route(slo_tpot_s=best.itl_s * 0.5), workers)


def test_without_stated_slos_an_overloaded_cluster_still_gets_a_worker():
    crowded = [WorkerView(w, in_flight=2000, decode_context_tokens=5_000_000) for w in "ab"]
    decision = SloAware(KvIndex(), TABLE).choose(route(), crowded)
    assert decision.predicted_itl_s > TABLE.itl_slo_s   # no worker fits: the least ITL still serves it


def test_cold_prompts_on_idle_workers_keep_their_prefix_together():
    policy = SloAware(KvIndex(), TABLE)
    workers = [WorkerView(w) for w in "abcd"]
    picks = {policy.choose(route(PROMPT[:2048] + [i]), workers).worker for i in range(20)}
    assert len(picks) == 1


def test_the_registry_builds_it_with_the_spec_table_and_refuses_to_guess_without_one():
    decision = PolicySet("slo_aware", table=TABLE).choose(route(), [WorkerView("a")])
    assert decision.policy == "slo_aware" and decision.predicted_ttft_s > 0
    with pytest.raises(RuntimeError, match="roofline table"):
        build_policy("slo_aware").choose(route(), [WorkerView("a")])
    with pytest.raises(ValueError, match="itl_slo_s"):
        build_policy("slo_aware", {"itl_slo_s": 0})


def test_the_ledger_queues_a_request_until_its_first_token_then_counts_its_context():
    ledger = PrefillLedger()
    decision = Decision(worker="a", policy="slo_aware", predicted_ttft_s=0.2, prefill_work_s=0.15, prefill_tokens=3000)
    ledger.sent("r1", decision, 4000)
    ledger.sent("r2", Decision(worker="a", policy="kv_aware"), 4000)   # no prediction: not tracked
    view = WorkerView("a")
    ledger.fill([view])
    assert (view.prefill_queue, view.prefill_queue_tokens, view.prefill_queue_s) == (1, 3000, 0.15)
    assert ledger.first_token("r1", 0.25) == (0.2, 0.25)
    assert ledger.first_token("r1", 0.3) is None   # once
    ledger.fill([view])
    assert (view.prefill_queue, view.prefill_queue_tokens, view.decode_context_tokens) == (0, 0, 4000)
    ledger.ended("r1")
    ledger.ended("r1")
    ledger.fill([view])
    assert (view.prefill_queue, view.prefill_queue_tokens, view.decode_context_tokens) == (0, 0, 0)
    assert len(ledger) == 0


def test_a_request_that_ends_before_its_first_token_leaves_the_queue():
    ledger = PrefillLedger()
    ledger.sent("r1", Decision(worker="a", policy="slo_aware", predicted_ttft_s=0.1, prefill_work_s=0.1,
                               prefill_tokens=500), 600)
    ledger.ended("r1")
    view = WorkerView("a", prefill_queue=9)
    ledger.fill([view])
    assert (view.prefill_queue, view.prefill_queue_tokens, view.prefill_queue_s) == (0, 0, 0.0)


def test_predicted_ttft_matches_the_simulator_on_an_idle_worker_and_behind_a_queue():
    # Two workers: the first two prompts find them idle, the next two queue behind them. (A prompt that
    # arrived later still and shared the queued one's step would delay it: not predicted.)
    sim = Simulator(SPEC, policy="slo_aware")
    rng = np.random.default_rng(0)
    requests = [SimRequest(request_id=f"r{i}", arrival_s=0.004 * i, max_tokens=8,
                           tokens=rng.integers(1000, 50_000, size=3000).tolist()) for i in range(4)]
    sim.run(requests)
    assert len(sim.ttft_predictions) == 4
    assert min(a for _, a in sim.ttft_predictions) * 1.5 < max(a for _, a in sim.ttft_predictions)   # queued
    for predicted, actual in sim.ttft_predictions:
        assert predicted == pytest.approx(actual, rel=0.15)
    assert len(sim.ledger) == 0   # every request settled


def test_prompts_arriving_behind_it_and_a_full_batch_delay_the_first_token():
    quiet = WorkerView("a", in_flight=3, prefill_queue=1, prefill_queue_tokens=2000,
                       prefill_queue_s=TABLE.prefill_work(2000, 0))
    streaming = WorkerView("a", in_flight=3, prefill_queue=1, prefill_queue_tokens=2000,
                           prefill_queue_s=TABLE.prefill_work(2000, 0), prefill_rate=50_000.0)
    assert predict(TABLE, streaming, 512, 0, 0).ttft_s > predict(TABLE, quiet, 512, 0, 0).ttft_s
    free = WorkerView("a", in_flight=200, decode_context_tokens=200_000, kv_usage=0.5)
    full = WorkerView("a", in_flight=TABLE.max_num_seqs, decode_context_tokens=200_000, kv_usage=0.5)
    roomy = WorkerView("a", in_flight=200, decode_context_tokens=420_000, kv_usage=0.9)
    kv_full = WorkerView("a", in_flight=200, decode_context_tokens=420_000, kv_usage=0.999)   # same step time
    # a full batch admits it once a decoder finishes: by Little's law one leaves every
    # mean output x step / batch seconds (the request's whole stay, not its mean time left)
    stay = TABLE.mean_output_tokens * TABLE.decode_step(TABLE.max_num_seqs, 200_000)
    gap = predict(TABLE, full, 512, 0, 0).ttft_s - predict(TABLE, free, 512, 0, 0).ttft_s
    assert 0.9 * stay / TABLE.max_num_seqs < gap < 1.5 * stay / TABLE.max_num_seqs
    assert predict(TABLE, kv_full, 4096, 0, 0).ttft_s > predict(TABLE, roomy, 4096, 0, 0).ttft_s + 0.005
    assert predict(TABLE, kv_full, 16, 0, 0).ttft_s < predict(TABLE, kv_full, 4096, 0, 0).ttft_s


def test_the_ledger_follows_the_rate_of_prefill_tokens_sent_to_each_worker():
    ledger = PrefillLedger()
    for i in range(20):
        ledger.sent(f"r{i}", Decision(worker="a", policy="slo_aware", predicted_ttft_s=0.1, prefill_work_s=0.01,
                                      prefill_tokens=1000), 1000, now=0.05 * i)
    a, b = WorkerView("a"), WorkerView("b")
    ledger.fill([a, b], now=1.0)
    assert 8_000 < a.prefill_rate < 20_000 and b.prefill_rate == 0.0   # ~20,000 tokens/s, averaged in
    ledger.fill([a], now=20.0)
    assert a.prefill_rate < 1.0   # forgotten once traffic stops


def test_a_full_batch_takes_one_departure_per_request_ahead():
    step = TABLE.decode_step(TABLE.max_num_seqs, 200_000)
    one = TABLE.admission_wait(TABLE.max_num_seqs, step, 0, 0, 0)
    ten = TABLE.admission_wait(TABLE.max_num_seqs, step, 0, 9, 0)
    assert ten == pytest.approx(10 * one)
    assert one == pytest.approx(TABLE.mean_output_tokens * step / TABLE.max_num_seqs)
    assert TABLE.admission_wait(TABLE.max_num_seqs - 10, step, 0, 5, 0) == 0.0   # slots left: no wait


def test_the_step_in_progress_is_placed_from_the_last_step_end_seen():
    busy = dict(in_flight=100, decode_context_tokens=100_000)
    step = TABLE.decode_step(100, 100_000)
    unseen = predict(TABLE, WorkerView("a", **busy), 512, 0, 0).ttft_s
    just_ended = predict(TABLE, WorkerView("a", step_age_s=0.0, **busy), 512, 0, 0).ttft_s
    nearly_over = predict(TABLE, WorkerView("a", step_age_s=0.9 * step, **busy), 512, 0, 0).ttft_s
    assert just_ended == pytest.approx(unseen + step / 2)        # a whole step to wait, not half
    assert nearly_over == pytest.approx(unseen - 0.4 * step)     # a tenth of it left
    # two steps and a quarter later: the third step is a quarter through
    assert step_left(step, WorkerView("a", step_age_s=2.25 * step)) == pytest.approx(0.75 * step)
    # too long ago to place: half a step, as for an unseen worker
    assert step_left(step, WorkerView("a", step_age_s=PHASE_STEPS * step + 1e-6)) == pytest.approx(step / 2)
    assert predict(TABLE, WorkerView("a", step_age_s=0.0), 512, 0, 0).ttft_s == pytest.approx(
        predict(TABLE, WorkerView("a"), 512, 0, 0).ttft_s)   # an idle worker starts at once


def test_the_ledger_sees_step_ends_in_first_tokens_and_idle_starts():
    ledger = PrefillLedger()
    a, b = WorkerView("a"), WorkerView("b")
    ledger.fill([a, b], now=1.0)
    assert a.step_age_s is None and b.step_age_s is None
    sent = Decision(worker="a", policy="slo_aware", predicted_ttft_s=0.1, prefill_work_s=0.01, prefill_tokens=100)
    ledger.sent("r1", sent, 100, now=1.0)   # "a" was idle: its engine starts a step now
    a.in_flight = 1
    ledger.fill([a, b], now=1.02)
    assert a.step_age_s == pytest.approx(0.02) and b.step_age_s is None
    ledger.sent("r2", sent, 100, now=1.03)   # busy: no new step starts on arrival
    ledger.fill([a], now=1.03)
    assert a.step_age_s == pytest.approx(0.03)
    ledger.first_token("r2", 0.05)           # r2's first token ended a step at 1.08
    ledger.fill([a], now=1.1)
    assert a.step_age_s == pytest.approx(0.02)
    ledger.first_token("r1", 0.04)           # an older step end does not move it back
    ledger.fill([a], now=1.1)
    assert a.step_age_s == pytest.approx(0.02)
    ledger.fill([a], now=1.05)               # a step end after `now` (clocks of two callers): not placed
    assert a.step_age_s is None


def test_scores_within_a_step_are_a_tie_that_the_longer_cached_prefix_wins():
    index = KvIndex()
    cached_on(index, "b", PROMPT[:32])    # "b" holds the first 2 blocks, "a" none
    step = TABLE.decode_step(50, 50_000)
    a = WorkerView("a", in_flight=50, decode_context_tokens=50_000, step_age_s=0.9 * step)   # a step nearly over
    b = WorkerView("b", in_flight=50, decode_context_tokens=50_000, step_age_s=0.0)          # a step just begun
    pa = predict(TABLE, a, len(PROMPT), 0, 0)
    pb = predict(TABLE, b, len(PROMPT), 2, 0)
    # scores differ by less than a step of the batch: "b" wins on its prefix, though "a" scores less
    strict = SloAware(index, TABLE, affinity=0.0, miss_cost=0.0, tie_steps=0.0)
    tied = SloAware(index, TABLE, affinity=0.0, miss_cost=0.0, tie_steps=1.0)
    assert pa.ttft_s < pb.ttft_s < pa.ttft_s + step
    assert strict.choose(route(), [a, b]).worker == "a"
    assert tied.choose(route(), [a, b]).worker == "b"
    # a lead of more than a step is no tie
    far = WorkerView("b", in_flight=50, decode_context_tokens=50_000, prefill_queue=1, prefill_queue_tokens=8000,
                     prefill_queue_s=TABLE.prefill_work(8000, 0))
    assert predict(TABLE, far, len(PROMPT), 2, 0).ttft_s > pa.ttft_s + step
    assert tied.choose(route(), [a, far]).worker == "a"
    with pytest.raises(ValueError, match="tie_steps"):
        SloAware(index, TABLE, tie_steps=-1)


def test_near_ties_between_workers_without_the_prefix_go_to_the_prefix_owner():
    # Cold prompts sharing their leading blocks go to one worker whatever phase the workers' steps are in.
    policy = SloAware(KvIndex(), TABLE, affinity=0.0, tie_steps=1.0)
    step = TABLE.decode_step(50, 50_000)
    picks = set()
    for i in range(20):
        phases = [WorkerView(w, in_flight=50, decode_context_tokens=50_000, step_age_s=(0.2 * k + 0.05 * i) % 1 * step)
                  for k, w in enumerate("abcd")]
        picks.add(policy.choose(route(PROMPT[:2048] + [i]), phases).worker)
    assert len(picks) == 1


def test_with_concentrate_a_request_late_everywhere_joins_the_latest_queue():
    def queued(worker: str, tokens: int) -> WorkerView:
        return WorkerView(worker, in_flight=4, prefill_queue=4, prefill_queue_tokens=tokens,
                          prefill_queue_s=TABLE.prefill_work(tokens, 0))
    late = [queued("a", 60_000), queued("b", 64_000)]
    assert min(predict(TABLE, w, len(PROMPT), 0, 0).ttft_s for w in late) > TABLE.ttft_slo_s
    score = SloAware(KvIndex(), TABLE, concentrate_held=False)
    assert score.choose(route(), late).worker == "a"                                  # the least late
    assert SloAware(KvIndex(), TABLE, concentrate=True).choose(route(), late).worker == "b"
    # while some worker is in time, or when the request states its SLO (refused instead), no change
    in_time = [queued("a", 1_000), queued("b", 120_000)]
    assert SloAware(KvIndex(), TABLE, concentrate=True).choose(route(), in_time).worker == "a"
    with pytest.raises(SloUnmet):
        SloAware(KvIndex(), TABLE, concentrate=True).choose(route(slo_ttft_s=TABLE.ttft_slo_s), late)
    # its cache hits still count: a late worker holding the prompt beats a later one without it
    index = KvIndex()
    cached_on(index, "a", PROMPT)
    assert SloAware(index, TABLE, concentrate=True).choose(route(), late).worker == "a"


def test_with_concentrate_held_a_request_late_everywhere_joins_the_latest_queue_holding_its_prefix():
    def queued(worker: str, tokens: int) -> WorkerView:
        return WorkerView(worker, in_flight=4, prefill_queue=4, prefill_queue_tokens=tokens,
                          prefill_queue_s=TABLE.prefill_work(tokens, 0))
    late = [queued("a", 60_000), queued("b", 62_000), queued("c", 64_000), queued("d", 66_000)]
    index = KvIndex()
    for worker in "abc":
        cached_on(index, worker, PROMPT[:512])
    assert min(predict(TABLE, w, len(PROMPT), 32, 0).ttft_s for w in late) > TABLE.ttft_slo_s
    assert SloAware(index, TABLE, concentrate_held=False).choose(route(), late).worker == "a"   # the least late
    assert SloAware(index, TABLE, concentrate=True).choose(route(), late).worker == "d"        # the latest, cold
    held = SloAware(index, TABLE).choose(route(), late)                                        # the default
    assert held.worker == "c" and held.matched_blocks == 32   # the latest of the holders: no prefix lost
    in_time = [queued("a", 1_000), *late[1:]]
    assert SloAware(index, TABLE).choose(route(), in_time).worker == "a"

def test_the_slo_benchmark_counts_a_refused_request_as_a_miss_and_apart():
    from benchmarks.slo_routing import ttft_shares
    from emulator.sim.report import RequestRecord
    timely, late, refused, failed_late = (RequestRecord(1.0, 100) for _ in range(4))
    timely.first, late.first = 1.2, 1.9
    refused.error = "overloaded"                              # the shedder's 503: never routed
    failed_late.first, failed_late.error = 1.3, "cancelled"   # a first token in time, then an error
    ok, of_admitted, refused_share = ttft_shares([timely, late, refused, failed_late], ttft_slo=0.5)
    assert (ok, of_admitted, refused_share) == (0.5, pytest.approx(2 / 3), 0.25)


def test_the_slo_benchmark_tells_backlog_misprediction_and_choice_apart(capsys):
    from benchmarks.slo_routing import Pick, explain
    from emulator.sim.report import RequestRecord
    records = [RequestRecord(float(t), 100) for t in range(5)]
    for record, ttft in zip(records, (0.2, 0.9, 0.7, 0.8, None), strict=True):
        record.first = None if ttft is None else record.arrival + ttft
    records[4].error = "overloaded"
    picks = [Pick(0.0, 100, 0.2, 0.1, 0, ""),          # in time
             Pick(1.0, 100, 0.7, 0.6, 0, ""),          # late on every worker: the backlog
             Pick(2.0, 100, 0.4, 0.3, 0, ""),          # predicted in time, late: the prediction
             Pick(3.0, 100, 0.6, 0.2, 320, "cap")]     # sent late past a worker in time: the choice
    explain(records, picks, ttft_slo=0.5)
    out = capsys.readouterr().out
    assert "late 4: refused 1, late everywhere 1, mispredicted 1, sent late 1" in out
    assert "predicted 400 ms, actual 700 ms" in out
    assert "1 requests, 320 tokens more to prefill; cap 1, itl 0, score 0" in out
