"""Steady-state arithmetic of the sweep: lifetime windows, the stationarity check, the live bisection."""
from __future__ import annotations

import math

import pytest

from loadtests.steady import (
    BRACKET_RATIO,
    SERVED_TOLERANCE,
    Bracket,
    Sizing,
    check,
    crossing,
    served_tolerance,
    steady_state_miss,
)


def test_windows_are_sized_in_lifetimes():
    s = Sizing.of(4.0)
    assert (s.warmup_s, s.window_s) == (12.0, 40.0)
    # A cluster that takes longer to fill from empty than 3 lifetimes warms up until it has filled.
    assert Sizing.of(4.0, fill_s=30.0).warmup_s == 30.0 and Sizing.of(4.0, fill_s=5.0).warmup_s == 12.0


def test_fill_time_is_when_the_requests_in_the_system_first_reach_90_percent_of_their_mean():
    from emulator.sim.report import LatencyLog
    log = LatencyLog()
    # One arrival a second (t = 0, 1, ...), each living 10 s: 10 in flight from t = 9 on, 9 from t = 8.
    for k in range(100):
        record = log.arrive(str(k), float(k), 8)
        record.first, record.last, record.done = k + 1.0, k + 10.0, True
    assert log.fill_time((20.0, 90.0)) == pytest.approx(8.0, abs=0.1)   # 9 in flight: 90% of 10


@pytest.mark.parametrize("capacity", [37.0, 78.5, 80.0, 120.0])
def test_bracket_closes_on_the_crossing_within_five_percent(capacity):
    b = Bracket(guess=80.0, max_tries=12)
    while (rate := b.next_rate()) is not None:
        b.record(rate, rate <= capacity)
    assert b.done, (b.passed, b.failed)
    assert b.lo <= capacity < b.hi and b.hi / b.lo <= BRACKET_RATIO + 1e-9
    if abs(capacity / 80.0 - 1) < 0.1:
        assert len(b.passed) + len(b.failed) <= 4     # a guess within 10% costs at most four rates


def test_a_good_guess_is_bracketed_with_two_rates():
    b = Bracket(guess=80.0)
    tries = 0
    while (rate := b.next_rate()) is not None:
        b.record(rate, rate <= 80.0)
        tries += 1
    assert tries == 2 and b.lo < 80.0 < b.hi


def test_bracket_gives_up_after_its_tries():
    b = Bracket(guess=80.0, max_tries=3)
    while (rate := b.next_rate()) is not None:
        b.record(rate, True)          # everything passes: the bracket never closes
    assert not b.done and len(b.passed) == 3


def test_crossing_interpolates_in_log_latency_and_takes_the_first_metric():
    lo, hi = (100.0, 0.1, 0.01), (110.0, 1.0, 0.2)
    # TTFT reaches 0.316 (sqrt(0.1 x 1.0)) half way; ITL reaches 0.1 at log(10)/log(20) of the way
    assert crossing(lo, hi, math.sqrt(0.1), 10.0) == pytest.approx(105.0)
    assert crossing(lo, hi, 10.0, 0.1) == pytest.approx(100.0 + 10.0 * math.log(10) / math.log(20))
    assert crossing(lo, (110.0, math.inf, 0.01), 0.5, 0.1) == pytest.approx(math.sqrt(100 * 110))


def test_stationary_window_passes_and_drifts_are_named():
    ok = check((0.30, 0.33), (100.0, 104.0), 50.0, 49.5, ttft_slo=0.5, below_c_max=True)
    assert ok.stationary and not ok.notes
    drift = check((0.2, 0.6), (100.0, 180.0), 50.0, 44.0, ttft_slo=0.5, below_c_max=True)
    assert not (drift.ttft_ok or drift.queue_ok or drift.served_ok) and len(drift.notes) == 3
    # Above C_max nothing serves everything sent: only the halves are judged there.
    assert check((0.9, 0.95), (300.0, 310.0), 90.0, 80.0, ttft_slo=0.5, below_c_max=False).stationary


def test_a_growing_queue_above_c_max_is_overloaded_and_does_not_invalidate_the_run():
    over = check((0.46, math.inf), (100.0, 400.0), 60.0, 55.0, ttft_slo=0.5, below_c_max=False)
    assert not over.stationary and not over.notes   # overload is the finding there, not a short window
    assert over.state == "overloaded"
    under = check((0.46, math.inf), (100.0, 400.0), 60.0, 55.0, ttft_slo=0.5, below_c_max=True)
    assert not under.stationary and len(under.notes) == 3 and under.state == "NO"
    # Growing requests in the system with TTFT halves that agree (both refused: inf) is overload too.
    assert check((math.inf, math.inf), (365.0, 461.0), 55.8, 53.2, 1.0, below_c_max=False).state == "overloaded"


def test_a_window_that_met_the_slo_while_drifting_worse_is_judged_by_where_it_was_heading():
    # The later half refused over 1% (p99 infinite) while requests in the system grew: the steady state misses.
    later = check((0.86, math.inf), (390.0, 460.0), 56.5, 56.4, ttft_slo=1.0, below_c_max=True, queue_samples=50)
    assert steady_state_miss(later, ttft_slo=1.0) == "later half"
    # The demo's rate at 0.98x C_max: both halves met the SLO (74 and 427 ms of 500), but the queue grew
    # 389 -> 459 after the warm-up while 54.4/s were served of 56.5/s sent.
    filling = check((0.074, 0.427), (389.0, 459.0), 56.5, 54.4, ttft_slo=0.5, below_c_max=True, queue_samples=50)
    assert steady_state_miss(filling, ttft_slo=0.5) == "queue growing"
    # The same rate on the refitted step model: p99 TTFT 77 -> 490 ms, the queue's growth (398 -> 461)
    # within its noise over 5 lifetimes a half, 52.8/s served of 55.2/s sent: the backlog still grows.
    backlog = check((0.077, 0.490), (398.0, 461.0), 55.2, 52.8, ttft_slo=0.5, below_c_max=True, queue_samples=5)
    assert backlog.queue_ok and not backlog.ttft_ok and steady_state_miss(backlog, 0.5) == "queue growing"
    # Halves that agree within their noise (76 -> 297 ms, 393 -> 453 requests), 53.0/s served of 55.3/s
    # sent: the backlog alone says it fills; with TTFT's later half lower it does not.
    agree = check((0.076, 0.297), (393.0, 453.0), 55.3, 53.0, ttft_slo=0.5, below_c_max=True, queue_samples=5)
    assert agree.ttft_ok and agree.queue_ok and not agree.served_ok
    assert steady_state_miss(agree, 0.5) == "queue growing"
    easing = check((0.297, 0.276), (393.0, 453.0), 55.3, 53.0, ttft_slo=0.5, below_c_max=True, queue_samples=5)
    assert easing.ttft_ok and steady_state_miss(easing, 0.5) is None
    # Judged a miss, the same window is overloaded, not invalid.
    assert check((0.074, 0.427), (389.0, 459.0), 56.5, 54.4, 0.5, below_c_max=False, queue_samples=50).state \
        == "overloaded"
    # A growing queue that still serves what was sent, the later half within the SLO: the window's verdict.
    assert steady_state_miss(check((0.074, 0.427), (389.0, 459.0), 56.5, 56.4, 0.5, True, queue_samples=50),
                             0.5) is None
    # Halves that agree cannot overturn it: a later half over the SLO by its sampling noise alone.
    assert steady_state_miss(check((0.95, 1.02), (400.0, 404.0), 56.5, 56.4, 1.0, True), 1.0) is None
    # Nor halves that improve: the first half held a transient the steady state does not.
    assert steady_state_miss(check((math.inf, 0.9), (460.0, 390.0), 56.5, 54.0, 1.0, True, queue_samples=50),
                             1.0) is None


def test_halves_that_improve_above_c_max_are_a_transient_that_invalidates():
    # The first half held a burst the rate's steady state does not: the miss may be the burst's.
    better = check((2.0, 0.6), (400.0, 150.0), 55.0, 56.0, ttft_slo=0.5, below_c_max=False)
    assert better.state == "NO" and len(better.notes) == 1 and "second half is better" in better.notes[0]
    # Queue shrinking while TTFT grows: not one direction, so not a safe miss either.
    mixed = check((0.6, 2.0), (400.0, 150.0), 55.0, 56.0, ttft_slo=0.5, below_c_max=False)
    assert mixed.state == "NO" and mixed.notes


def test_served_tolerance_is_three_percent_unless_the_window_edges_are_noisier():
    assert served_tolerance(47.0, 3.3, 100.0) == SERVED_TOLERANCE      # ~150 in flight, 30 lifetimes
    # 10 lifetimes: 3 x sqrt(2 x 47 x 3.3) / (47 x 33) = 3.4%, the edges' own 3-sigma noise
    assert served_tolerance(47.0, 3.3, 33.0) == pytest.approx(3 * math.sqrt(2 * 47 * 3.3) / (47 * 33))
    assert served_tolerance(20.0, 0.2, 2.0) > 0.2                       # 4 in flight: edges dominate


def test_queue_halves_may_differ_by_their_sampling_noise_only():
    few = check((0.3, 0.3), (44.0, 58.0), 300.0, 300.0, 0.5, True, queue_samples=4)
    many = check((0.3, 0.3), (44.0, 58.0), 300.0, 300.0, 0.5, True, queue_samples=200)
    assert few.queue_ok and not many.queue_ok


def test_record_reader_reads_only_what_was_appended_and_waits_for_whole_lines(tmp_path):
    from loadtests.records import RecordReader, read_records
    path = tmp_path / "records.jsonl"
    reader = RecordReader(path)
    assert reader.read() == ({}, [])
    path.write_bytes(b'{"event": "start", "t0": 1.0}\n{"id": 1}\n{"id": 2')      # the writer is mid-line
    header, rows = reader.read()
    assert header["t0"] == 1.0 and rows == [{"id": 1}]
    with open(path, "ab") as f:
        f.write(b'}\n{"event": "end", "sent": 2}\n')
    header, rows = reader.read()
    assert rows == [{"id": 1}, {"id": 2}] and header["end"]["sent"] == 2
    assert (header, rows) == read_records(path)


def test_bisection_stops_only_when_lag_distorts_latencies_near_the_slo():
    from types import SimpleNamespace

    from loadtests.sweep import _distorted
    setup = SimpleNamespace(scale=1.5, spec=SimpleNamespace(slo=SimpleNamespace(ttft_p99_s=0.5)))
    point = lambda lag, lagged: {"lag_p99_s": lag, "client_lag_p99_s": 0.0, "lagged": lagged}  # noqa: E731
    assert not _distorted(point(0.06, True), setup)     # 40 ms emulated: flagged, but under 10% of the SLO
    assert _distorted(point(0.3, True), setup)          # 200 ms emulated
    assert not _distorted(point(0.3, False), setup)


def test_halves_drawn_alike_agree_within_their_p99_bands_and_a_real_shift_does_not():
    import numpy as np

    from loadtests.steady import bands_overlap, p99_band
    rng = np.random.default_rng(7)
    alike = [bands_overlap(p99_band(rng.lognormal(0, 1, 1500)), p99_band(rng.lognormal(0, 1, 1500)))
             for _ in range(40)]
    assert sum(alike) >= 36                       # ~95% bands: chance alone rarely separates them
    shifted = [bands_overlap(p99_band(rng.lognormal(0, 1, 1500)), p99_band(2 * rng.lognormal(0, 1, 1500)))
               for _ in range(40)]
    assert sum(shifted) <= 4
    # the rule's own tolerance alone (35% or 10% of the SLO) would call these halves apart ...
    halves = (0.20, 0.42)   # the second half near the 0.5 s SLO: the verdict could flip
    assert not check(halves, (100.0, 100.0), 50.0, 50.0, 0.5, True).ttft_ok
    assert check((0.155, 0.245), (100.0, 100.0), 50.0, 50.0, 0.5, True).ttft_ok   # both well below it
    # ... unless their bands overlap: then they are no more apart than sampling allows
    assert check(halves, (100.0, 100.0), 50.0, 50.0, 0.5, True, ttft_bands=((0.18, 0.25), (0.24, 0.45))).ttft_ok
    assert not check(halves, (100.0, 100.0), 50.0, 50.0, 0.5, True,
                     ttft_bands=((0.15, 0.22), (0.35, 0.45))).ttft_ok
