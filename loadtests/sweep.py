"""`kvlab sweep`: measure a cluster's steady-state capacity with Locust and compare it with the
steady-state simulator and the analytical planner: where p99 crosses the SLO (C_max), as a number
with its bracket.

    kvlab sweep                        # the embedded default cluster: start it, sweep, report, stop it
    kvlab sweep my-spec.toml --rates 20,40,60,80 --out reports/mine
    kvlab sweep --url http://gpu-box:8000 --worker-urls http://gpu-box:8001,... --time-scale 1

Rates are requests per second of the server's (emulated) time. Without --rates the planner and the
steady-state simulator place the SLO crossing, then live rates bisect it until it is bracketed within
5% (loadtests.steady.Bracket), after one rate well below it. Every rate is its own run from an idle
cluster: a warm-up of 3 and a window of 10 mean request lifetimes at that rate (emulated; the
simulator's mean end-to-end latency; a longer warm-up where the simulated cluster takes longer to fill
from empty to its steady number of requests), unless --warmup/--duration give wall seconds. A point is marked
(`!`) when a worker or the load generator lagged, or a window below C_max was not stationary.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from emulator.spec import ClusterSpec, SpecError, load_spec, resolve_spec_path
from loadtests import analysis, sim_curve
from loadtests import report as rpt
from loadtests.live import LivePlan, LiveResult, measure
from loadtests.planner_bridge import Prediction, predict
from loadtests.progress import Progress
from loadtests.schedule import Stage, spec_requests
from loadtests.scrape import Scraper
from loadtests.steady import (
    BRACKET_RATIO,
    WARMUP_LIFETIMES,
    WINDOW_LIFETIMES,
    Bracket,
    Sizing,
    Stationarity,
    check,
    crossing,
    p99_band,
    served_tolerance,
    steady_state_miss,
)

CURVE_FACTORS = (0.6,)     # x the expected C_max, measured before the bracket: served tracks offered there
SIM_STEP = 1.05            # the steady-state simulator steps rates by 5% from the planner's C_max to the crossing
SIM_MAX_STEPS = 8
DEFAULT_LIFETIME_S = 5.0   # emulated: a request's lifetime when neither simulator nor planner gives one
MAX_TIME_SCALE = 50.0     # the fit stops raising here (a host that slow lags whatever)
HOST_BUDGET_CORES = 1.5    # of a 2-core host: the sweep process and the OS keep the rest
HOST_HEADROOM = 0.5        # use at most half the budget: a shared host's neighbours take the rest
# The cluster's host CPU: each busy worker's steps cost a fixed share of a core, and every emulated
# output token a cost along the whole path (worker, router, load generator) plus its share of an SSE
# chunk. benchmarks/host_cost.py on a 2-core host, geventhttpclient load generator:
# colocated-8b-h100 (4 workers) at 40 req/s, time scale 2: 56.8 CPU us/token at stream_interval 16,
# 118.7 at 1 (5.9k tokens per wall s). A worker took 0.045 cores at 1.5k tokens per wall s there and
# 0.135 at 7.9k (default spec, 57.3 req/s, time scale 1): a line through both leaves 0.024 cores at no
# tokens, taken as 0.03. What is left: 32.5 + 66 / stream_interval us per token. The default spec
# measured 31.7-36.9 us per token in all (the model says 37-41: it errs towards a slower time scale).
WORKER_BUSY_CORES = 0.03
HOST_COST_US = (32.5, 66.0)


def host_cost_us_per_token(stream_interval: int) -> float:
    per_token, per_chunk = HOST_COST_US
    return per_token + per_chunk / max(1, stream_interval)


def host_cores(tokens_per_wall_s: float, workers: int, stream_interval: int) -> float:
    """CPU cores the cluster and its load generator use at this token rate (see HOST_COST_US)."""
    return workers * WORKER_BUSY_CORES + tokens_per_wall_s * host_cost_us_per_token(stream_interval) * 1e-6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default="default", help="cluster spec file or bundled example name")
    parser.add_argument("--url", help="sweep this running endpoint (kvlab router or any OpenAI server) "
                                      "instead of starting the spec's cluster")
    parser.add_argument("--worker-urls", default="", help="with --url: comma-separated worker base URLs whose "
                                                          "/load or /metrics give prefix hits and lag")
    parser.add_argument("--rates", nargs="+", default=None,
                        help="offered rates, requests per emulated second (e.g. 20 40 60 or 20,40,60); "
                             "default: bisect the SLO crossing")
    parser.add_argument("--duration", type=float, default=None,
                        help="wall seconds measured at each rate (default: 10 request lifetimes)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="wall seconds at each rate before measuring (default: 3 request lifetimes)")
    parser.add_argument("--tail", type=float, default=None,
                        help="wall seconds of load after each window while its requests finish; then they are "
                             "cut short (default: 2 request lifetimes)")
    parser.add_argument("--time-scale", type=float, default=None, help="override the spec's engine.time_scale")
    parser.add_argument("--out", default=None, help="report folder (default: reports/sweep-<spec name>)")
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    parser.add_argument("--api", default="chat", choices=["chat", "completions"])
    parser.add_argument("--seed", type=int, default=None, help="workload seed (default: the spec's)")
    parser.add_argument("--no-sim", action="store_true", help="skip the simulator columns")
    parser.add_argument("--sim-requests", type=int, default=2000,
                        help="steady-state simulation: requests per rate, at least (default %(default)s)")
    parser.add_argument("--same-schedule", action="store_true",
                        help="also simulate each live run's own requests (the 'simulated' column: live vs "
                             "simulator on identical arrivals isolates the host; ~10 s more per rate)")
    parser.add_argument("--max-live-rates", type=int, default=6,
                        help="live rates the bisection may use (default %(default)s)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a rate lagged or was not stationary")
    parser.add_argument("--verbose", action="store_true", help="show the cluster's logs")


def run(args: argparse.Namespace) -> int:
    try:
        spec_path = resolve_spec_path(args.spec)
        spec = load_spec(spec_path)
        rates_arg = parse_rates(args.rates)
    except (SpecError, FileNotFoundError, ValueError) as exc:
        print(f"kvlab sweep: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    setup = Setup.build(spec, spec_path, args, rates_arg)
    planned = predict(spec, setup.rates or [])   # fixed rates: their points come with C_max, in one call
    setup.planned_points = dict(zip(setup.rates or [], planned.points, strict=False))
    steady = SteadySims(spec, args.sim_requests, enabled=not args.no_sim)
    setup.steady_enabled = steady.enabled
    sim_c = steady_crossing(steady, spec.slo, planned.c_max) if setup.rates is None and steady.enabled else None
    guess = (sim_c or {}).get("rate") or planned.c_max
    trial_rates = setup.rates or ([guess * BRACKET_RATIO] if guess else None)
    if trial_rates is None:
        print("kvlab sweep: neither the planner nor the simulator gives a C_max for this spec; pass --rates",
              file=sys.stderr)
        return 2
    warnings = fit_time_scale(setup, steady, trial_rates, chosen=bool(args.time_scale or args.url))
    print(f"kvlab sweep '{spec.name}': {_plan_text(setup, planned, sim_c)}; time scale {setup.scale:g}", flush=True)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    sweep = run_live(setup, args, steady, guess)
    report = build_report(setup, sweep, planned, sim_c, steady)
    report["warnings"] = warnings + report["warnings"]
    report["wall_s"] = time.monotonic() - started
    files = rpt.write_all(report, setup.out)
    _print_final(report, files)
    return 1 if args.strict and not report["valid"] else 0


def _plan_text(setup: Setup, planned: Prediction, sim_c: dict | None) -> str:
    if setup.rates is not None:
        return f"rates {', '.join(f'{r:g}' for r in setup.rates)} req/s ({setup.why})"
    parts = [f"planned C_max {planned.c_max:.1f}" if planned.c_max else "no planned C_max"]
    if sim_c and sim_c.get("rate"):
        parts.append(f"steady-state simulated C_max {sim_c['rate']:.1f} ({sim_c['text']})")
    return ", ".join(parts) + f"; live: {', '.join(f'{f:g}' for f in CURVE_FACTORS)} x that, then bisect to " \
        f"{(BRACKET_RATIO - 1) * 100:.0f}%"


def parse_rates(values: list[str] | None) -> list[float] | None:
    if not values:
        return None
    rates = sorted(float(x) for v in values for x in v.replace(",", " ").split())
    if not rates or rates[0] <= 0:
        raise ValueError("--rates must be positive numbers")
    return rates


class Setup:
    """What one sweep runs: the spec, fixed rates (or None: bisect), stage lengths, time scale, output."""

    def __init__(self, spec, spec_path, rates, why, scale, warmup_s, duration_s, tail_s, seed, out, max_live):
        self.spec, self.spec_path, self.rates, self.why = spec, spec_path, rates, why
        self.scale, self.warmup_s, self.duration_s, self.tail_s = scale, warmup_s, duration_s, tail_s
        self.seed, self.out, self.max_live = seed, out, max_live
        self.steady_enabled = True
        self.planned_points: dict[float, object] = {}   # the planner's point per rate, once each

    @classmethod
    def build(cls, spec: ClusterSpec, spec_path: Path, args, rates_arg) -> Setup:
        rates, why = rates_arg, "from --rates"
        if rates is None and spec.workload.rates:
            rates, why = sorted(spec.workload.rates), "from the spec's workload.rates"
        scale = args.time_scale or (_remote_time_scale(_worker_urls(args)) if args.url else None) \
            or (spec.engine.time_scale if not args.url else 1.0)
        seed = spec.workload.seed if args.seed is None else args.seed
        return cls(spec, spec_path, rates, why, scale, args.warmup, args.duration, args.tail, seed,
                   Path(args.out or f"reports/sweep-{spec.name}"), args.max_live_rates)

    def sizing(self, lifetime_s: float, fill_s: float = 0.0) -> tuple[Sizing, float, float, float]:
        """The rate's sizing in lifetimes and its (warm-up, window, tail) in wall seconds."""
        size = Sizing.of(lifetime_s, fill_s)
        warmup = self.warmup_s if self.warmup_s is not None else size.warmup_s * self.scale
        window = self.duration_s if self.duration_s is not None else size.window_s * self.scale
        tail = self.tail_s if self.tail_s is not None else size.tail_s * self.scale
        return size, warmup, window, tail


class SteadySims:
    """The steady-state simulator, each rate run once (memoized)."""

    def __init__(self, spec: ClusterSpec, min_requests: int, enabled: bool = True):
        self.spec, self.min_requests, self.enabled = spec, min_requests, enabled
        self._done: dict[float, object] = {}

    def at(self, rate: float):
        if not self.enabled:
            return None
        if rate not in self._done:
            self._done[rate] = sim_curve.steady(self.spec, rate, self.min_requests)
        return self._done[rate]

    def fill(self, rate: float) -> float:
        """Emulated seconds the simulated cluster takes from empty to its steady number of requests."""
        s = self.at(rate)
        return float(s.fill_s) if s is not None and math.isfinite(s.fill_s) else 0.0

    def lifetime(self, rate: float) -> float:
        """Mean end-to-end latency at `rate`, emulated seconds."""
        s = self.at(rate)
        if s is not None and math.isfinite(s.e2e.mean) and s.e2e.mean > 0:
            return float(s.e2e.mean)
        return DEFAULT_LIFETIME_S


def meets(ttft_p99, itl_p99, slo) -> bool:
    ttft, itl = _num(ttft_p99), _num(itl_p99)
    return math.isfinite(ttft) and math.isfinite(itl) and ttft <= slo.ttft_p99_s and itl <= slo.itl_p99_s


def steady_crossing(steady: SteadySims, slo, guess: float | None) -> dict | None:
    """The steady-state simulator's SLO crossing: step 5% from the planner's C_max until the SLO
    flips, then interpolate between the two rates around it."""
    if not guess:
        return None
    started = time.monotonic()
    print(f"simulating the steady state around the planned C_max {guess:.1f} ...", end=" ", flush=True)

    def point(r):
        s = steady.at(r)
        return (r, _num(_sim_ttft(rpt.to_builtins(s))), _num(s.itl.p99), s.ttft_miss_share)

    first = point(guess)
    up = meets(first[1], first[2], slo)
    prev = first
    for _ in range(SIM_MAX_STEPS):
        nxt = point(prev[0] * SIM_STEP if up else prev[0] / SIM_STEP)
        if meets(nxt[1], nxt[2], slo) != up:
            lo, hi = (prev, nxt) if up else (nxt, prev)
            rate = crossing(lo, hi, slo.ttft_p99_s, slo.itl_p99_s)
            print(f"{time.monotonic() - started:.0f} s", flush=True)
            return {"rate": rate, "bracket": [lo[0], hi[0]], "bound": "interpolated",
                    "text": f"{rate:.3g} in [{lo[0]:.3g}, {hi[0]:.3g}]"}
        prev = nxt
    print(f"{time.monotonic() - started:.0f} s (no crossing found)", flush=True)
    return None


def fit_time_scale(setup: Setup, steady: SteadySims, rates: list[float], chosen: bool) -> list[str]:
    """The host must afford the busiest rate: `host_cores` at its emulated tokens per second / time
    scale, within HOST_HEADROOM of the budget. A time scale the user did not choose is raised (in half
    steps) until it fits; a chosen one is kept, with a warning."""
    s = steady.at(max(rates))
    if s is None or not s.output_tokens_per_s:
        return []
    spec = setup.spec
    workers, interval = len(spec.worker_list()), spec.engine.stream_interval
    cores = min(HOST_BUDGET_CORES, (os.cpu_count() or 1) * 0.75) * HOST_HEADROOM
    afford = 1.0
    while host_cores(s.output_tokens_per_s / afford, workers, interval) > cores and afford < MAX_TIME_SCALE:
        afford += 0.5
    if afford <= setup.scale:
        return []
    why = (f"at {max(rates):.1f} req/s the cluster streams {s.output_tokens_per_s:.0f} tokens per emulated second "
           f"at ~{host_cost_us_per_token(interval):.0f} CPU us each, and {workers} busy workers take "
           f"{workers * WORKER_BUSY_CORES:.2f} cores (benchmarks/host_cost.py): time scale {afford:g} keeps that "
           f"within {cores:.2f} of this host's cores")
    if chosen:
        return [f"{why}; the chosen time scale {setup.scale:g} may lag"]
    print(f"time scale raised from {setup.scale:g} to {afford:g}: {why}", flush=True)
    setup.scale = afford
    return []


def _worker_urls(args) -> dict[str, str]:
    return {f"w{i}": u.rstrip("/") for i, u in enumerate(filter(None, args.worker_urls.split(",")))}


def _remote_time_scale(workers: dict[str, str]) -> float | None:
    scraper = Scraper(workers)
    scraper.sample_now()
    return scraper.time_scale()


# -- the live part ----------------------------------------------------------------------------------

class LiveSweep:
    """Live rates one at a time against one cluster: each its own Locust run from an idle cluster."""

    def __init__(self, setup: Setup, args, url: str, workers: dict[str, str], steady: SteadySims):
        self.setup, self.args, self.url, self.workers, self.steady = setup, args, url, workers, steady
        self.points: list[dict] = []
        self.header_printed = False
        self.bracket: Bracket | None = None
        self.warnings: list[str] = []
        self.gave_up = False

    def measure(self, rate: float) -> dict:
        setup = self.setup
        size, warmup, window, tail = setup.sizing(self.steady.lifetime(rate), self.steady.fill(rate))
        k = len(self.points)
        plan = LivePlan(url=self.url, worker_urls=self.workers, rates=[rate], warmup_s=warmup, duration_s=window,
                        tail_s=tail, time_scale=setup.scale, out=setup.out / f"rate-{k}",
                        spec_path=str(setup.spec_path), model=self.args.model, seed=setup.seed, api=self.args.api)
        progress = Progress(warmup + window + tail)
        if not self.header_printed:
            progress.println(rpt.table({"points": []}))
            self.header_printed = True
        result = measure(plan, progress=progress)
        progress.close()
        result.url = self.url
        point = measured_point(setup, result, size, self.steady, plan if self.args.same_schedule else None)
        self.points.append(point)
        print(rpt.row_cells_text(point), flush=True)
        return point


def run_live(setup: Setup, args, steady: SteadySims, guess: float | None) -> LiveSweep:
    if args.url:
        return _sweep(LiveSweep(setup, args, args.url.rstrip("/"), _worker_urls(args), steady), guess)
    from kvlab.launcher import Cluster

    spec = setup.spec
    cluster = Cluster(setup.spec_path, spec, quiet=not args.verbose, time_scale=setup.scale, load_generator=True)
    print(f"starting the cluster ({len(spec.worker_list())} workers + {cluster.router_processes()} router "
          "processes) ...", flush=True)
    with cluster:
        return _sweep(LiveSweep(setup, args, cluster.url, cluster.worker_urls(), steady), guess)


def _sweep(live: LiveSweep, guess: float | None) -> LiveSweep:
    """Fixed rates in order; or a rate well below the expected C_max, then the live bisection."""
    setup = live.setup
    print(f"measuring against {live.url}: each rate warms up for 3 request lifetimes (or until the simulated "
          "cluster has filled) and is measured over 10 (emulated)", flush=True)
    if setup.rates is not None:
        for rate in setup.rates:
            live.measure(rate)
        return live
    assert guess is not None, "main() stops when neither --rates nor a C_max to start from is given"
    for factor in CURVE_FACTORS:
        if _distorted(live.measure(factor * guess), setup):
            return _gave_up(live)
    bracket = Bracket(guess, max_tries=max(2, setup.max_live - len(CURVE_FACTORS)))
    live.bracket = bracket
    while (rate := bracket.next_rate()) is not None:
        point = live.measure(rate)
        if _distorted(point, setup):
            return _gave_up(live)   # a lagging host inflates latencies: bisecting them only chases the host
        bracket.record(rate, point["met_slo"])
    return live


GIVE_UP_LAG_SLO_SHARE = 0.1   # stop bisecting once lag (emulated) exceeds 10% of the TTFT SLO


def _distorted(point: dict, setup: Setup) -> bool:
    """The host lagged so much (workers or load generator, in emulated time) that p99 TTFT near the
    SLO says more about the host than about the cluster."""
    lag = max(point.get("lag_p99_s") or 0.0, point.get("client_lag_p99_s") or 0.0) / setup.scale
    return point["lagged"] and lag > GIVE_UP_LAG_SLO_SHARE * setup.spec.slo.ttft_p99_s


def _gave_up(live: LiveSweep) -> LiveSweep:
    scale = live.setup.scale
    live.gave_up = True
    live.warnings.append(f"the host could not keep up at time scale {scale:g}: lag beyond "
                         f"{GIVE_UP_LAG_SLO_SHARE:.0%} of the TTFT SLO (see the lag column), so the bisection "
                         f"stopped; rerun when the host is quieter or with --time-scale {scale * 2:g}")
    print(f"warning: {live.warnings[-1]}", file=sys.stderr, flush=True)
    return live


# -- points and the report --------------------------------------------------------------------------

def measured_point(setup: Setup, result: LiveResult, size: Sizing, steady: SteadySims,
                   plan: LivePlan | None) -> dict:
    spec, w, slo, scale = setup.spec, result.windows[0], setup.spec.slo, setup.scale
    summary = analysis.summarize(result.records, w, scale, slo.ttft_p99_s, slo.itl_p99_s)
    scraped = result.scraped[0]
    if scraped is not None and scraped.prefix_hit_rate is not None:
        summary.prefix_hit_rate = scraped.prefix_hit_rate   # the workers' counters beat usage fields
        summary.preemptions = scraped.preemptions
    lag = scraped.lag_p99_s if scraped else None
    client_lag = analysis.client_lag_p99(result.records, w)
    dropped = sum(1 for r in result.records if r.get("stage") == 0 and str(r.get("error", "")).startswith("dropped"))
    ttft_fail = analysis.ttft_p99_with_failures(result.records, w, scale, result.missing(0))
    met = meets(ttft_fail, summary.itl.p99, slo)
    station = _stationarity(result, w, summary, scale, slo.ttft_p99_s, below_c_max=met, lifetime_s=size.lifetime_s)
    judged_by, verdict_ttft = "window", ttft_fail
    if met and (why := steady_state_miss(station, slo.ttft_p99_s)):
        # The steady state it heads to misses: its later half's p99, or (a queue still growing) the cap's.
        met, judged_by = False, why
        verdict_ttft = station.ttft_p99_halves[1] if why == "later half" else math.inf
        station = _stationarity(result, w, summary, scale, slo.ttft_p99_s, below_c_max=False,
                                lifetime_s=size.lifetime_s)
    notes = _validity_notes(spec, lag, client_lag, dropped) + station.notes
    window_s = (w.end_s - w.start_s) / scale
    point = {"rate": w.rate, "measured": summary, "unfinished": result.unfinished(0),
             "ttft_p99_with_failures": ttft_fail, "met_slo": met, "judged_by": judged_by,
             "verdict_ttft_p99": verdict_ttft,
             "lag_p99_s": lag, "lag_max_s": scraped.lag_max_s if scraped else None,
             "lagged": bool(_validity_notes(spec, lag, client_lag, dropped)),
             "client_lag_p99_s": client_lag, "valid": not notes, "notes": notes,
             "window": {"warmup_s": w.start_s / scale, "window_s": window_s, "lifetime_s": size.lifetime_s,
                        "lifetimes": window_s / size.lifetime_s,
                        "warmup_lifetimes": w.start_s / scale / size.lifetime_s},
             "stationarity": station, "stationary": station.stationary, "stationary_state": station.state,
             "sent_rps": station.sent_rps, "served_rps": station.served_rps,
             "simulated": _same_schedule(setup, plan, result.windows), "steady": steady.at(w.rate),
             "planned": _planned(setup, w.rate)}
    return rpt.to_builtins(point)


def _stationarity(result: LiveResult, w: analysis.Window, summary, scale: float, ttft_slo: float,
                  below_c_max: bool, lifetime_s: float) -> Stationarity:
    mid = (w.start_s + w.end_s) / 2
    halves = [analysis.Window(0, w.rate, w.start_s, mid), analysis.Window(0, w.rate, mid, w.end_s)]
    first, second = (analysis.ttft_p99_with_failures(result.records, h, scale) for h in halves)
    ttft = (first, second)
    bands = tuple(p99_band(analysis.ttfts_with_failures(result.records, h, scale)) for h in halves)
    queue: tuple[float | None, float | None] = (None, None)
    polls = 0
    if result.scraper is not None and result.t0:
        read = [result.scraper.in_system(result.t0 + h.start_s, result.t0 + h.end_s) for h in halves]
        queue, polls = (read[0][0], read[1][0]), min(n for _, n in read)
    sent = summary.requests / summary.duration_s if summary.duration_s else 0.0
    tol = served_tolerance(sent, lifetime_s, summary.duration_s)
    independent = min(polls, (w.end_s - w.start_s) / 2 / lifetime_s) if lifetime_s > 0 else polls
    return check(ttft, queue, sent, summary.throughput_rps, ttft_slo, below_c_max, tol,
                 queue_samples=max(1, int(independent)), ttft_bands=(bands[0], bands[1]))


def _same_schedule(setup: Setup, plan: LivePlan | None, windows) -> object | None:
    """The simulator on the very requests this rate's live run sent, over the same window."""
    if plan is None or not setup.steady_enabled:
        return None
    stages = [Stage(r, s) for r, s in plan.stages()]
    items = spec_requests(setup.spec, stages, setup.scale, seed=setup.seed)
    return sim_curve.schedule(setup.spec, items, windows, setup.scale)[0]


def _planned(setup: Setup, rate: float):
    """The planner's point at `rate`. Every planner call searches C_max again (seconds of CPU), so
    the fixed rates' points came with the first call; a bisection rate costs one call of its own."""
    if rate not in setup.planned_points:
        p = predict(setup.spec, [rate])
        setup.planned_points[rate] = p.points[0] if p.points else None
    return setup.planned_points[rate]


def _validity_notes(spec: ClusterSpec, lag, client_lag, dropped: int) -> list[str]:
    limit = spec.engine.lag_warn_s
    notes = []
    if lag is not None and lag > limit:
        notes.append(f"workers lagged: step lag p99 {lag * 1000:.0f} ms > {limit * 1000:.0f} ms")
    if client_lag > limit:
        notes.append(f"load generator lagged: send lag p99 {client_lag * 1000:.0f} ms > {limit * 1000:.0f} ms")
    if dropped:
        notes.append(f"{dropped} arrivals dropped at the load generator's in-flight cap")
    return notes


def build_report(setup: Setup, live: LiveSweep, planned: Prediction, sim_c: dict | None, steady: SteadySims) -> dict:
    spec = setup.spec
    points = sorted(live.points, key=lambda p: p["rate"])
    report = {
        "kvlab_sweep": 2, "spec": spec.name, "spec_path": str(setup.spec_path), "target": live.url,
        "time_scale": setup.scale, "slo": {"ttft_p99_s": spec.slo.ttft_p99_s, "itl_p99_s": spec.slo.itl_p99_s},
        "workload": _workload_text(spec), "model": None,
        "stages": {"rates": [p["rate"] for p in points], "why": setup.why if setup.rates else "bisection",
                   "warmup_lifetimes": WARMUP_LIFETIMES, "window_lifetimes": WINDOW_LIFETIMES},
        "points": points, "warnings": list(live.warnings),
    }
    report["c_max"] = capacities(points, spec.slo, planned, sim_c, live.bracket)
    measured = report["c_max"]["measured"]
    if live.gave_up and measured.get("bound") != "interpolated":
        measured["bound"] = "not_determined"
        measured["text"] = f"not determined: the host lagged, the bisection stopped ({measured['text']})"
    report["knee"] = knees(points)
    invalid = [p for p in points if not p["valid"]]
    report["valid"] = not invalid
    for p in invalid:
        report["warnings"].append(f"rate {p['rate']:.4g}: " + "; ".join(p["notes"]))
    if planned.error:
        report["warnings"].append(planned.error)
    return report


def capacities(points: list[dict], slo, planned: Prediction, sim_c: dict | None, bracket: Bracket | None) -> dict:
    """C_max measured (a number with its bracket), simulated at steady state, planned, and the gaps."""
    out = {"measured": _measured_c_max(points, slo, bracket)}
    if points and points[0]["steady"] is not None:
        out["steady"] = sim_c or _crossing_of(points, slo, "steady")
    if planned.c_max is not None:
        out["planned"] = {"rate": planned.c_max, "bound": "planner", "text": f"{planned.c_max:.3g}"}
    elif planned.error:
        out["planned"] = {"rate": None, "error": planned.error}
    measured = out["measured"].get("rate") if out["measured"].get("bound") == "interpolated" else None
    out["gap_pct"] = {name: analysis.gap_percent(measured, (out.get(name) or {}).get("rate"))
                      for name in ("steady", "planned")}
    out["gap_pct"]["steady vs planned"] = analysis.gap_percent((out.get("steady") or {}).get("rate"),
                                                               (out.get("planned") or {}).get("rate"))
    return rpt.to_builtins(out)


def _measured_c_max(points: list[dict], slo, bracket: Bracket | None) -> dict:
    """Between the highest rate that met the SLO and the lowest above it that missed, interpolated."""
    passed = [p for p in points if p["met_slo"]]
    lo = max(passed, key=lambda p: p["rate"]) if passed else None
    above = [p for p in points if not p["met_slo"] and (lo is None or p["rate"] > lo["rate"])]
    hi = min(above, key=lambda p: p["rate"]) if above else None
    if lo is None or hi is None:
        rate = (lo or hi or {}).get("rate")
        bound = "at_least" if hi is None else "below"
        text = "n/a" if rate is None else (f"no rate missed the SLO (>= {rate:.3g})" if hi is None
                                           else f"every rate missed it (< {rate:.3g})")
        return {"rate": rate, "bound": bound, "bracket": None, "text": text}
    trio = lambda p: (p["rate"], _ttft_p99(p), _num(rpt.get(p, "measured.itl.p99")))  # noqa: E731
    rate = crossing(trio(lo), trio(hi), slo.ttft_p99_s, slo.itl_p99_s)
    width = hi["rate"] / lo["rate"] - 1
    limited = "ttft" if _ttft_p99(hi) > slo.ttft_p99_s else "itl"
    return {"rate": rate, "bound": "interpolated", "bracket": [lo["rate"], hi["rate"]], "bracket_pct": width * 100,
            "limited_by": limited, "text": f"{rate:.3g} in [{lo['rate']:.3g}, {hi['rate']:.3g}]"}


def _crossing_of(points: list[dict], slo, name: str) -> dict:
    rates = [p["rate"] for p in points]
    c = analysis.c_max(rates, [_num(_sim_ttft(p[name])) for p in points],
                       [_num(rpt.get(p, f"{name}.itl.p99")) for p in points], slo.ttft_p99_s, slo.itl_p99_s)
    return {"rate": c.rate, "bound": c.bound, "limited_by": c.limited_by, "text": c.describe()}


def _sim_ttft(s: dict | None) -> float | None:
    """A simulated p99 TTFT counting rejections as misses, like the measured one."""
    if s is None:
        return None
    failed = s["requests"] - s["completed"]
    if s["requests"] and failed / s["requests"] > 0.01:
        return math.inf
    return rpt.get(s, "ttft.p99")


def _ttft_p99(point: dict) -> float:
    """The p99 TTFT (counting failures) the point's verdict rests on: its window's, its later half's where
    that half decided it, infinite where a still-growing queue did; the report stores infinity as null."""
    value = point.get("verdict_ttft_p99", point["ttft_p99_with_failures"])
    return math.inf if value is None else float(value)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def knees(points: list[dict]) -> dict:
    rates = [p["rate"] for p in points]
    out = {}
    for name in ("measured", "simulated", "steady"):
        if points and points[0].get(name) is not None:
            out[name] = analysis.knee(rates, [_num(rpt.get(p, f"{name}.ttft.p99")) for p in points])
    return out


def _workload_text(spec: ClusterSpec) -> str:
    w = spec.workload
    mix = ", ".join(f"{k}={v:g}" for k, v in w.mix.items())
    arrival = "poisson" if w.arrival == "poisson" else f"gamma cv={w.cv:g}"
    return f"{mix}; {arrival} arrivals; seed {w.seed}"


def _print_final(report: dict, files: dict[str, str]) -> None:
    print()
    print(rpt.table(report))
    print()
    for line in rpt.capacity_lines(report):
        print(line)
    if not report["valid"]:
        bar = "!" * 78
        print(f"\n{bar}\nINVALID RUN: some rates lagged or were not stationary; do not trust them.",
              file=sys.stderr)
        for w in report["warnings"]:
            print(f"  - {w}", file=sys.stderr)
        print(bar, file=sys.stderr)
    elif report["warnings"]:
        for w in report["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    print(f"\nreport: {', '.join(files.values())}  ({report['wall_s']:.0f} s)")
