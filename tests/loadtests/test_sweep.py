"""`kvlab sweep`: C_max and knee arithmetic, the report, and one short live sweep end to end.

The live sweep runs a deliberately small cluster (tiny-test with 4 sequences per worker and short
answers, time scale 16) so that its knee sits at a few requests per wall second: throughput must
rise with the offered rate, then saturate, while p99 TTFT climbs past the knee.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from emulator.spec import example_spec_path, example_specs, load_spec, parse_spec
from loadtests import analysis, steady
from loadtests.planner_bridge import predict
from loadtests.spec_file import dumps, write_spec
from tests import ROOT
from tests.conftest import free_port_block

# -- pure arithmetic --------------------------------------------------------------------------------

def test_c_max_interpolates_the_slo_crossing_in_log_latency():
    c = analysis.c_max([10, 20, 30], [0.1, 0.2, 2.0], [0.01, 0.01, 0.01], 0.5, 0.1)
    # log(0.5) is 40% of the way from log(0.2) to log(2.0)
    assert c.bound == "interpolated" and c.limited_by == "ttft" and c.rate == pytest.approx(24.0, abs=0.05)


def test_c_max_takes_the_metric_that_crosses_first_and_reports_open_bounds():
    c = analysis.c_max([10, 20], [0.1, 0.4], [0.05, 0.2], 0.5, 0.1)
    assert c.limited_by == "itl" and c.rate == pytest.approx(15.0)
    assert analysis.c_max([10, 20], [0.1, 0.2], [0.01, 0.01], 0.5, 0.1).describe() == ">= 20"
    assert analysis.c_max([10, 20], [0.9, 2.0], [0.01, 0.01], 0.5, 0.1).describe() == "< 10"
    nothing_finished = analysis.c_max([10, 20], [0.1, math.nan], [0.01, math.nan], 0.5, 0.1)
    assert nothing_finished.bound == "bracket" and (nothing_finished.rate, nothing_finished.upper) == (10, 20)
    assert nothing_finished.describe() == "10-20"


def test_where_a_shedder_refuses_the_crossing_is_where_one_percent_miss():
    # The upper rate's p99 TTFT is infinite (over 1% refused): its share of misses (refused or over
    # the SLO) goes 0.2% -> 5%, so 1% is reached a sixth of the way.
    c = analysis.c_max([10, 20, 30], [0.1, 0.3, math.inf], [0.01, 0.01, 0.01], 0.5, 0.1,
                       ttft_misses=[0.0, 0.002, 0.05])
    assert c.bound == "interpolated" and c.limited_by == "ttft" and c.rate == pytest.approx(20 + 10 / 6)
    without = analysis.c_max([10, 20, 30], [0.1, 0.3, math.inf], [0.01, 0.01, 0.01], 0.5, 0.1)
    assert without.bound == "bracket" and (without.rate, without.upper) == (20, 30)
    assert steady.crossing((20, 0.3, 0.01, 0.002), (30, math.inf, 0.01, 0.05), 0.5, 0.1) == pytest.approx(20 + 10 / 6)
    assert steady.crossing((20, 0.3, 0.01), (30, math.inf, 0.01), 0.5, 0.1) == pytest.approx(math.sqrt(600))


def test_live_c_max_names_ttft_when_the_failing_rate_lost_over_one_percent():
    from emulator.spec import SloSpec
    from loadtests.sweep import _measured_c_max

    def point(rate, ttft, itl, met):   # as the report stores it: an infinite p99 is null
        return {"rate": rate, "ttft_p99_with_failures": ttft, "measured": {"itl": {"p99": itl}}, "met_slo": met}

    slo = SloSpec(ttft_p99_s=0.5, itl_p99_s=0.1)
    c = _measured_c_max([point(50, 0.1, 0.04, True), point(60, None, 0.05, False)], slo, None)
    assert c["limited_by"] == "ttft" and c["rate"] == pytest.approx(math.sqrt(50 * 60))


def test_knee_is_where_p99_ttft_doubles_from_its_low_load_value():
    # 2 x 0.1 = 0.2 is reached 17% of the way (in log latency) from 0.15 at 30 to 0.8 at 40
    assert analysis.knee([10, 20, 30, 40], [0.1, 0.11, 0.15, 0.8]) == pytest.approx(31.7, abs=0.1)
    assert analysis.knee([10, 20], [0.1, 0.12]) is None


def _rec(sched, ttft=0.1, gaps=(0.01, 0.01), e2e=0.2, error=None, **kw):
    return {"sched": sched, "lag": 0.0, "ttft": ttft, "gaps": list(gaps), "e2e": e2e, "tokens": len(gaps) + 1,
            "error": error, "prompt_tokens": 10, "cached_tokens": 5, **kw}


def test_summaries_window_latencies_by_send_time_and_throughput_by_finish_time():
    w = analysis.Window(0, 10.0, 10.0, 20.0)   # wall offsets, time scale 2: a 5 emulated s window
    records = [_rec(5.0, e2e=6.0),              # sent before the window, finished inside it
               *[_rec(10.0 + i, ttft=0.2 * (i + 1)) for i in range(8)],
               _rec(19.0, e2e=5.0),             # sent inside, finished after it
               _rec(12.0, ttft=None, e2e=None, error="HTTP 503: busy")]
    s = analysis.summarize(records, w, time_scale=2.0, ttft_slo=0.5, itl_slo=0.1)
    assert s.requests == 10 and s.completed == 9 and s.rejected == 1 and s.duration_s == 5.0
    assert s.throughput_rps == pytest.approx(9 / 5.0)          # 8 sent inside + 1 from before, by finish time
    assert s.ttft.p50 == pytest.approx(0.4)                     # emulated: wall / 2
    assert s.goodput_rps == pytest.approx(6 / 5.0)              # finished inside with TTFT <= 0.5 emulated s
    assert s.prefix_hit_rate == pytest.approx(0.5)


def test_failure_aware_p99_counts_rejections_and_bounds_cut_short_requests_by_their_wait():
    w = analysis.Window(0, 1.0, 0.0, 100.0)
    ok = [_rec(float(i)) for i in range(98)]
    cut = [_rec(98.0, ttft=None, e2e=None, unfinished=True, waited=0.3)]
    assert analysis.ttft_p99_with_failures(ok + cut, w, 1.0) == pytest.approx(0.3)
    rejected = [_rec(98.0, ttft=None, e2e=None, error="HTTP 429"), _rec(99.0, ttft=None, e2e=None, error="x")]
    assert analysis.ttft_p99_with_failures(ok + rejected, w, 1.0) == math.inf


# -- spec files and the planner bridge --------------------------------------------------------------

@pytest.mark.parametrize("name", example_specs())
def test_written_specs_read_back_identical(name):
    spec = load_spec(name)
    assert parse_spec(dumps(msgspec.to_builtins(spec))) == spec


def test_each_rate_is_planned_once(monkeypatch):
    from loadtests import sweep
    from loadtests.planner_bridge import Prediction

    calls = []
    def fake_predict(spec, rates):   # each real call searches C_max again: seconds of CPU
        calls.append(list(rates))
        return Prediction([f"point at {r:g}" for r in rates], 50.0)

    monkeypatch.setattr(sweep, "predict", fake_predict)
    setup = sweep.Setup(None, None, [10.0, 20.0], "", 1.0, None, None, None, 0, Path("."), 6)
    setup.planned_points = {10.0: "point at 10", 20.0: "point at 20"}   # as run() fills it from its first call
    assert sweep._planned(setup, 20.0) == "point at 20" and calls == []
    assert [sweep._planned(setup, 15.0) for _ in range(2)] == ["point at 15"] * 2 and calls == [[15.0]]


def test_the_planner_sees_the_spec_the_cluster_runs():
    p = predict(load_spec("default"), [20.0, 200.0])
    assert p.error is None and 20 < p.c_max < 200
    low, high = p.points
    assert low.stable and low.ttft_p99 < 0.5 and not high.stable


# -- a short live sweep -----------------------------------------------------------------------------

def small_cluster_spec(path: Path) -> Path:
    """tiny-test with a knee at ~110 req/s emulated = ~7 req/s of wall time at time scale 16."""
    d = msgspec.toml.decode(example_spec_path("tiny-test").read_bytes())
    d["engine"] = {**d["engine"], "max_num_seqs": 4, "time_scale": 16.0}
    d["workload"] = {"mix": {"chat": 1.0}, "seed": 3, "params": {"chat": {
        "output_len": {"median": 12, "sigma": 0.3, "high": 64}, "unique_len": {"median": 32, "sigma": 0.5}}}}
    base = free_port_block(3)   # the router, then its two workers
    d["router"] = {**d["router"], "port": base}
    d["pools"] = [{**d["pools"][0], "base_port": base + 1}]
    return write_spec(d, path)


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    spec = small_cluster_spec(tmp / "small.toml")
    cmd = [sys.executable, "-m", "kvlab.cli", "sweep", str(spec), "--rates", "40,100,160,220",
           "--warmup", "1.5", "--duration", "3.5", "--tail", "5", "--out", str(tmp / "out"), "--sim-requests", "500",
           "--same-schedule"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp / "out" / "sweep.json").read_text()), done.stdout, tmp / "out"


@pytest.mark.slow
def test_sweep_writes_json_csv_markdown_and_plot(sweep_report):
    report, stdout, out = sweep_report
    for name in ("sweep.json", "sweep.csv", "sweep.md", "sweep.png", "rate-0/records.jsonl", "rate-3/records.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert [p["rate"] for p in report["points"]] == [40, 100, 160, 220]
    for p in report["points"]:
        for key in ("measured", "simulated", "steady", "planned", "lag_p99_s", "valid", "ttft_p99_with_failures",
                    "stationary", "sent_rps", "served_rps", "window"):
            assert key in p
        assert {"p50", "p90", "p99", "mean"} <= set(p["measured"]["ttft"]) and p["measured"]["requests"] > 0
        assert p["planned"]["rate"] == p["rate"]            # each rate's own planned point
        assert p["stationary_state"] in ("yes", "overloaded", "NO")
        assert p["stationary_state"] != "overloaded" or not p["met_slo"]
    assert set(report["c_max"]) >= {"measured", "steady", "planned", "gap_pct"}
    assert report["c_max"]["planned"]["rate"] > 0 and report["time_scale"] == 16
    assert "C_max measured" in stdout and "TTFT p99" in stdout
    assert len((out / "sweep.csv").read_text().splitlines()) == 5


@pytest.mark.slow
def test_throughput_rises_then_saturates_while_p99_ttft_climbs_past_the_knee(sweep_report):
    report = sweep_report[0]
    rates = [p["rate"] for p in report["points"]]
    thru = [p["measured"]["throughput_rps"] for p in report["points"]]
    ttft = [p["measured"]["ttft"]["p99"] for p in report["points"]]
    assert max(thru) > 1.8 * thru[0]                         # rises with the offered rate ...
    assert thru[-1] < 0.75 * rates[-1]                       # ... then falls behind it: saturated
    assert thru[-1] > 0.7 * max(thru)                        # (served, not collapsed)
    assert ttft[-1] > 4 * ttft[0] and ttft[-1] > ttft[-2] > ttft[1]
    assert report["knee"]["measured"] is not None and rates[0] < report["knee"]["measured"] < rates[-1]


# -- steady-state windows on the tiny spec ------------------------------------------------------------

def tiny_steady_spec(path: Path) -> Path:
    """tiny-test (64 sequences per worker) with short chats at time scale 4: requests live ~0.23
    emulated s, so a window of 10 lifetimes is ~9 s of wall time, and half of C_max (~180 req/s)
    is ~45 requests per wall second, which a 2-core host serves without lag (seen: step lag p99
    20 ms wall with other work on the host)."""
    d = msgspec.toml.decode(example_spec_path("tiny-test").read_bytes())
    d["engine"] = {**d["engine"], "time_scale": 4.0}
    d["workload"] = {"mix": {"chat": 1.0}, "seed": 3, "params": {"chat": {
        "output_len": {"median": 24, "sigma": 0.3, "high": 64}, "unique_len": {"median": 64, "sigma": 0.5}}}}
    base = free_port_block(3)   # the router, then its two workers
    d["router"] = {**d["router"], "port": base}
    d["pools"] = [{**d["pools"][0], "base_port": base + 1}]
    return write_spec(d, path)


@pytest.mark.slow
def test_served_tracks_offered_below_capacity_over_windows_sized_in_lifetimes(tmp_path):
    spec_path = tiny_steady_spec(tmp_path / "tiny.toml")
    c = predict(load_spec(spec_path), []).c_max
    rates = [round(0.5 * c)]    # one rate well below capacity (each live rate costs ~15 s of wall time)
    cmd = [sys.executable, "-m", "kvlab.cli", "sweep", str(spec_path), "--rates", *map(str, rates),
           "--out", str(tmp_path / "out"), "--sim-requests", "800"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "sweep.json").read_text())
    for p in report["points"]:
        w, st = p["window"], p["stationarity"]
        assert w["lifetimes"] == pytest.approx(10, rel=0.01) and w["warmup_lifetimes"] == pytest.approx(3, rel=0.01)
        assert p["met_slo"], p
        assert st["served_ok"], st                # served tracks what was sent, which tracks the offered rate
        expected = p["rate"] * w["window_s"]      # arrivals: Poisson, within 4 sigma
        assert abs(p["sent_rps"] * w["window_s"] - expected) <= 4 * math.sqrt(expected)
        assert p["measured"]["requests"] > 100
    assert "lifetimes" in (tmp_path / "out" / "sweep.md").read_text()


def test_an_unchosen_time_scale_is_raised_until_the_host_affords_the_busiest_rate(monkeypatch):
    from types import SimpleNamespace

    from loadtests import sweep
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 2)
    spec = load_spec("colocated-8b-h100")   # 4 workers, stream_interval 16: 36.6 CPU us per token
    steady = SimpleNamespace(at=lambda rate: SimpleNamespace(output_tokens_per_s=20_000.0))
    setup = SimpleNamespace(spec=spec, scale=1.0)
    assert sweep.fit_time_scale(setup, steady, [70.0], chosen=False) == []
    # 4 x 0.03 + 20k tokens/s x 36.6 us = 0.85 cores, over half of a 1.5-core budget (0.75); at 1.5: 0.61
    assert setup.scale == 1.5 and sweep.host_cost_us_per_token(16) == pytest.approx(36.6, abs=0.1)
    assert sweep.host_cores(20_000.0, 4, 16) == pytest.approx(0.85, abs=0.01)
    few = SimpleNamespace(at=lambda rate: SimpleNamespace(output_tokens_per_s=15_000.0))
    two = SimpleNamespace(spec=load_spec("default"), scale=1.0)   # 2 workers: 0.06 + 0.55 cores fit
    assert sweep.fit_time_scale(two, few, [57.0], chosen=False) == [] and two.scale == 1.0
    chosen = SimpleNamespace(spec=spec, scale=1.0)
    warning = sweep.fit_time_scale(chosen, steady, [70.0], chosen=True)
    assert chosen.scale == 1.0 and "may lag" in warning[0]
    assert sweep.fit_time_scale(SimpleNamespace(spec=spec, scale=2.0), steady, [70.0], chosen=False) == []


def test_the_steady_state_simulator_runs_for_many_request_lifetimes():
    from loadtests import sim_curve
    spec = load_spec("tiny-test")
    short = sim_curve.simulate(spec, 20.0, 500)
    steady = sim_curve.steady(spec, 20.0, 500)
    assert short.duration_s < sim_curve.STEADY_WINDOW_LIFETIMES * short.e2e.mean   # 500 requests are too few
    assert steady.duration_s >= sim_curve.STEADY_WINDOW_LIFETIMES * short.e2e.mean * 0.99
    assert steady.requests > short.requests
