"""The simulator's C_max in the random-draw harness: a bracket across a knee is bisected before it is
interpolated (log-linear interpolation across a knee lands next to the passing rate)."""
import math

import numpy as np

from loadtests import planner_draws
from loadtests.planner_draws import Draw, Run

DRAW = Draw(index=0, model="Llama-3.1-8B", gpu="H100-SXM", tp=1, mode="colocated", budget=256, max_num_seqs=64,
            mix={"chat": 1.0}, ttft_slo=0.24, itl_slo=1.0)
KNEE = 20.0     # req/s: the synthetic TTFT p99 crosses 0.24 s at 19.0 req/s


def synthetic(rate: float) -> Run:
    """p99 TTFT of an M/M/1-like queue with its ceiling at KNEE: 0.012 / (1 - rate / KNEE), inf past it."""
    p99 = 0.012 / (1 - rate / KNEE) if rate < KNEE else math.inf
    values = np.full(200, p99) if math.isfinite(p99) else np.empty(0)
    return Run(rate=rate, ttft=values, ttft_at=np.arange(values.size, dtype=float), gaps=np.full(200, 0.01),
               gaps_at=np.arange(200, dtype=float), window=(0.0, 200.0))


def test_a_bracket_across_the_knee_is_bisected_to_the_crossing(monkeypatch):
    monkeypatch.setattr(planner_draws, "simulate", lambda spec, rate, requests: synthetic(rate))
    planned = 18.0
    runs = {f: synthetic(planned * f) for f in (0.9, 1.1, 1.25)}      # 16.2 passes, 19.8 and 22.5 fail
    before = planner_draws._c_max([runs[f] for f in sorted(runs)], DRAW).rate
    planner_draws._refine(None, DRAW, planned, runs, 100)
    after = planner_draws._c_max([runs[f] for f in sorted(runs)], DRAW)
    assert after.bound == "interpolated"
    assert abs(after.rate / 19.0 - 1) < 0.02
    assert before is None or abs(before / 19.0 - 1) > abs(after.rate / 19.0 - 1)


def test_a_bracket_near_the_slo_is_left_as_it_is(monkeypatch):
    calls = []
    monkeypatch.setattr(planner_draws, "simulate", lambda spec, rate, requests: calls.append(rate))
    runs = {0.9: synthetic(17.0), 1.1: synthetic(19.2)}               # 0.08 s, 0.30 s: within 25% of 0.24
    planner_draws._refine(None, DRAW, 1.0, runs, 100)
    assert not calls


def fake_run(rate: float, warmup: float, window: float, lifetime: float) -> Run:
    return Run(rate=rate, ttft=np.full(10, 0.1), ttft_at=np.linspace(warmup, warmup + window, 10),
               gaps=np.full(10, 0.01), gaps_at=np.linspace(warmup, warmup + window, 10),
               window=(warmup, warmup + window), lifetime=lifetime)


def test_a_rate_is_measured_over_many_request_lifetimes(monkeypatch):
    """3,000 requests at 19 req/s span 158 s; with 4.7 s lifetimes the window must be 470 s, and the
    warm-up (20 s at this rate) 47 s: the run is redone that long."""
    calls = []

    def fake(spec, rate, warmup, window):
        calls.append((warmup, window))
        return fake_run(rate, warmup, window, lifetime=4.7)
    monkeypatch.setattr(planner_draws, "_simulate", fake)
    monkeypatch.setattr(planner_draws, "warmup_s", lambda spec, rate: 20.0)
    run = planner_draws.simulate(None, 19.0, 3000)
    assert calls[0] == (20.0, 3000 / 19.0)
    assert len(calls) == 2
    warmup, end = run.window
    assert warmup >= planner_draws.WARMUP_LIFETIMES * 4.7 - 1e-9
    assert end - warmup >= planner_draws.WINDOW_LIFETIMES * 4.7 - 1e-9
    # each bootstrap block spans several lifetimes (nearly independent blocks)
    assert (end - warmup) / planner_draws.BLOCKS >= 4.7 * 4


def test_a_run_already_long_enough_is_kept(monkeypatch):
    calls = []

    def fake(spec, rate, warmup, window):
        calls.append((warmup, window))
        return fake_run(rate, warmup, window, lifetime=0.5)    # 3,000 / 2 req/s = 1,500 s: 3,000 lifetimes
    monkeypatch.setattr(planner_draws, "_simulate", fake)
    monkeypatch.setattr(planner_draws, "warmup_s", lambda spec, rate: 100.0)
    planner_draws.simulate(None, 2.0, 3000)
    assert calls == [(100.0, 1500.0)]


def agreement(requests: int, noise: float | None) -> planner_draws.Agreement:
    return planner_draws.Agreement(draw=DRAW, planned=3.0, binding="ttft_slo", simulated=2.9, bound="interpolated",
                                   culprit="ttft", noise=noise, requests=requests)


def test_a_noisy_comparison_is_simulated_again_with_more_requests(monkeypatch):
    """The simulated C_max's sd falls as 1 / sqrt(requests): at 8.8% on 3,000 requests the rerun takes
    (8.8 / 3)^2 x 1.1 ~ 28,400, where the noise is 2.9%; no third run."""
    calls = []

    def fake(d, requests):
        calls.append(requests)
        return agreement(requests, 0.088 * math.sqrt(3000 / requests))
    monkeypatch.setattr(planner_draws, "compare", fake)
    found = planner_draws.quiet(DRAW, 3000, target=0.03, most=100_000)
    assert calls[0] == 3000 and len(calls) == 2
    assert 25_000 < calls[1] < 30_000
    assert found.noise is not None and found.noise <= 0.03 and found.requests == calls[1]
    assert [n for n, _, _ in found.earlier] == [3000]


def test_a_comparison_stops_at_the_request_cap_or_when_quiet(monkeypatch):
    calls = []

    def fake(d, requests):
        calls.append(requests)
        return agreement(requests, 0.2)            # never quiet: the cap ends it
    monkeypatch.setattr(planner_draws, "compare", fake)
    assert planner_draws.quiet(DRAW, 3000, target=0.03, most=10_000).requests == 10_000
    assert calls == [3000, 10_000]
    for noise in (0.02, None):                     # quiet already; no interpolated C_max, so no noise to act on
        calls.clear()
        monkeypatch.setattr(planner_draws, "compare",
                            lambda d, requests, n=noise: calls.append(requests) or agreement(requests, n))
        assert planner_draws.quiet(DRAW, 3000).requests == 3000 and calls == [3000]


def halved(rate: float, early: float, late: float) -> Run:
    """A run at `rate` whose p99 TTFT reads `early` in the first half of its window and `late` in the second."""
    at = np.linspace(0.0, 200.0, 400, endpoint=False)
    ttft = np.where(at < 100.0, early, late)
    return Run(rate=rate, ttft=ttft, ttft_at=at, gaps=np.full(400, 0.01), gaps_at=at, window=(0.0, 200.0))


def test_a_windows_halves_are_its_requests_split_at_its_middle():
    run = halved(10.0, 0.1, 0.2)
    first, second = run.half(0), run.half(1)
    assert first.window == (0.0, 100.0) and second.window == (100.0, 200.0)
    assert first.ttft.size == second.ttft.size == 200
    assert set(first.ttft) == {0.1} and set(second.ttft) == {0.2}
    assert first.gaps_at.max() < 100.0 <= second.gaps_at.min()


def test_halves_that_cross_the_slo_at_different_rates_are_reported():
    # both halves meet the 0.24 s SLO at 10 req/s and miss it at 20; the second half crosses sooner
    runs = [halved(10.0, 0.12, 0.12), halved(20.0, 0.30, 0.60)]
    found = planner_draws._halves(runs, DRAW)
    assert found is not None and found < -0.05
    steady = [halved(10.0, 0.12, 0.12), halved(20.0, 0.40, 0.40)]
    assert planner_draws._halves(steady, DRAW) == 0.0


def test_quiet_reruns_a_draw_whose_halves_disagree_though_its_bootstrap_is_quiet(monkeypatch):
    """The bootstrap alone (1%) would stop at the first pass; the halves' 12% disagreement (noise of
    about 6%) sends it on with (6% / 3%)^2 x 1.1 times the requests."""
    passes = []

    def fake(d, requests):
        passes.append(requests)
        halves = 0.12 if len(passes) == 1 else 0.02
        return planner_draws.Agreement(draw=d, planned=10.0, binding="ttft_slo", simulated=10.0,
                                       bound="interpolated", culprit="ttft", noise=0.01, halves=halves)
    monkeypatch.setattr(planner_draws, "compare", fake)
    found = planner_draws.quiet(DRAW, requests=1000, target=0.03)
    assert passes == [1000, 4400]
    assert found.requests == 4400 and found.earlier == [(1000, 0.0, 0.06)]


def test_a_half_that_never_crosses_the_slo_reads_as_apart_and_quiet_takes_four_times_the_requests(monkeypatch):
    # the whole crosses between 10 and 20 req/s; its first half meets the SLO at both rates
    runs = [halved(10.0, 0.12, 0.12), halved(20.0, 0.20, 0.60)]
    assert planner_draws._c_max(runs, DRAW).bound == "interpolated"
    assert planner_draws._halves(runs, DRAW) == math.inf
    passes = []

    def fake(d, requests):
        passes.append(requests)
        return planner_draws.Agreement(draw=d, planned=10.0, binding="ttft_slo", simulated=10.0, bound="interpolated",
                                       culprit="ttft", noise=0.01, halves=math.inf if len(passes) == 1 else 0.0)
    monkeypatch.setattr(planner_draws, "compare", fake)
    assert planner_draws.quiet(DRAW, requests=1000, target=0.03).requests == 4400
