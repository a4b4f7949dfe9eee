"""`kvlab sweep`: measure a cluster's latency-throughput curve with Locust and compare it with the
simulator and the analytical planner, rate by rate, and where p99 crosses the SLO (C_max).

    kvlab sweep                        # the embedded default cluster: start it, sweep, report, stop it
    kvlab sweep my-spec.toml --rates 20,40,60,80 --duration 60 --out reports/mine
    kvlab sweep --url http://gpu-box:8000 --worker-urls http://gpu-box:8001,... --time-scale 1

Rates are requests per second of the server's (emulated) time; --duration and --warmup are wall
seconds per rate. Without --rates (or workload.rates in the spec) the rates bracket the planner's
C_max. A point measured while a worker or the load generator lagged is marked invalid (`!`).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from emulator.spec import ClusterSpec, SpecError, load_spec, resolve_spec_path
from loadtests import analysis, report as rpt, sim_curve
from loadtests.live import LivePlan, LiveResult, measure
from loadtests.planner_bridge import Prediction, predict
from loadtests.progress import Progress
from loadtests.schedule import Stage, spec_requests
from loadtests.scrape import Scraper

RATE_FACTORS = (0.6, 0.85, 1.0, 1.15)   # x the planner's C_max: both sides of the SLO crossing
# Stage lengths in emulated seconds (x the time scale on the wall clock). A chat request lives ~4-6
# emulated s near the knee, so a stage of 6 s lets batches settle from the previous (lower) rate; the
# simulator replaying the same schedule shows what the short stages cost against the steady state.
WARMUP_EMULATED_S = 2.0
MEASURE_EMULATED_S = 4.0
MAX_DEFAULT_STAGE_S = 90.0   # wall: a large time scale shortens stages (in emulated time) rather than
                             # making the default run long; the "stage length" gap in the report shows the cost
MAX_DEFAULT_TAIL_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default="default", help="cluster spec file or bundled example name")
    parser.add_argument("--url", help="sweep this running endpoint (kvlab router or any OpenAI server) "
                                      "instead of starting the spec's cluster")
    parser.add_argument("--worker-urls", default="", help="with --url: comma-separated worker base URLs whose "
                                                          "/load or /metrics give prefix hits and lag")
    parser.add_argument("--rates", nargs="+", default=None,
                        help="offered rates, requests per emulated second (e.g. 20 40 60 or 20,40,60)")
    parser.add_argument("--duration", type=float, default=None,
                        help=f"wall seconds measured at each rate (default {MEASURE_EMULATED_S:g} emulated s "
                             f"x the time scale; warm-up and measurement together at most {MAX_DEFAULT_STAGE_S:g} s)")
    parser.add_argument("--warmup", type=float, default=None,
                        help=f"wall seconds at each rate before measuring (default {WARMUP_EMULATED_S:g} "
                             "emulated s x the time scale)")
    parser.add_argument("--tail", type=float, default=None,
                        help="at most this many wall seconds of load after the last rate while its requests "
                             f"finish; then they are cut short (default: one stage, at most {MAX_DEFAULT_TAIL_S:g} s)")
    parser.add_argument("--time-scale", type=float, default=None, help="override the spec's engine.time_scale")
    parser.add_argument("--out", default=None, help="report folder (default: reports/sweep-<spec name>)")
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    parser.add_argument("--api", default="chat", choices=["chat", "completions"])
    parser.add_argument("--seed", type=int, default=None, help="workload seed (default: the spec's)")
    parser.add_argument("--no-sim", action="store_true", help="skip the simulator columns")
    parser.add_argument("--sim-requests", type=int, default=2000,
                        help="steady-state simulation: requests per rate, at least (default %(default)s)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the run is invalid (lag)")
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
    print(f"kvlab sweep '{spec.name}': rates {', '.join(f'{r:g}' for r in setup.rates)} req/s ({setup.why}); "
          f"{setup.stage_s:g} wall s per rate ({setup.warmup_s:g} warm-up) at time scale {setup.scale:g}", flush=True)
    prediction = predict(spec, setup.rates)
    sims = simulations(setup, args)
    result = run_live(setup, args, prediction, sims)
    report = build_report(setup, args, result, prediction, sims)
    report["wall_s"] = time.monotonic() - started
    files = rpt.write_all(report, setup.out)
    _print_final(report, files)
    return 1 if args.strict and not report["valid"] else 0


def parse_rates(values: list[str] | None) -> list[float] | None:
    if not values:
        return None
    rates = sorted(float(x) for v in values for x in v.replace(",", " ").split())
    if not rates or rates[0] <= 0:
        raise ValueError("--rates must be positive numbers")
    return rates


def choose_rates(spec: ClusterSpec, given: list[float] | None) -> tuple[list[float], str]:
    """--rates, else the spec's workload.rates, else RATE_FACTORS x the planner's C_max."""
    if given:
        return given, "from --rates"
    if spec.workload.rates:
        return sorted(spec.workload.rates), "from the spec's workload.rates"
    c = predict(spec, []).c_max
    if not c:
        raise SystemExit("kvlab sweep: no rates given and the planner has no C_max for this spec; pass --rates")
    return [round(f * c, 2) for f in RATE_FACTORS], f"{', '.join(f'{f:g}' for f in RATE_FACTORS)} x planned C_max {c:.1f}"


class Setup:
    """What one sweep runs: the spec, the rates and stage lengths, the time scale, where to write."""

    def __init__(self, spec, spec_path, rates, why, scale, warmup_s, duration_s, tail_s, seed, out):
        self.spec, self.spec_path, self.rates, self.why = spec, spec_path, rates, why
        self.scale, self.warmup_s, self.duration_s, self.tail_s = scale, warmup_s, duration_s, tail_s
        self.seed, self.out = seed, out

    @classmethod
    def build(cls, spec: ClusterSpec, spec_path: Path, args, rates_arg) -> "Setup":
        rates, why = choose_rates(spec, rates_arg)
        scale = args.time_scale or (_remote_time_scale(_worker_urls(args)) if args.url else None) \
            or (spec.engine.time_scale if not args.url else 1.0)
        shrink = min(1.0, MAX_DEFAULT_STAGE_S / ((WARMUP_EMULATED_S + MEASURE_EMULATED_S) * scale))
        warmup = args.warmup if args.warmup is not None else WARMUP_EMULATED_S * scale * shrink
        duration = args.duration if args.duration is not None else MEASURE_EMULATED_S * scale * shrink
        tail = args.tail if args.tail is not None else min(warmup + duration, MAX_DEFAULT_TAIL_S)
        seed = spec.workload.seed if args.seed is None else args.seed
        return cls(spec, spec_path, rates, why, scale, warmup, duration, tail, seed,
                   Path(args.out or f"reports/sweep-{spec.name}"))

    @property
    def stage_s(self) -> float:
        return self.warmup_s + self.duration_s

    def stages(self) -> list[tuple[float, float]]:
        """(rate, wall s) of each measured stage, then the unmeasured tail at the last rate."""
        return [(r, self.stage_s) for r in self.rates] + [(self.rates[-1], self.tail_s)]

    def windows(self) -> list[analysis.Window]:
        return analysis.windows(self.stages()[:-1], self.warmup_s)


def _worker_urls(args) -> dict[str, str]:
    return {f"w{i}": u.rstrip("/") for i, u in enumerate(filter(None, args.worker_urls.split(",")))}


def _remote_time_scale(workers: dict[str, str]) -> float | None:
    scraper = Scraper(workers)
    scraper.sample_now()
    return scraper.time_scale()


def simulations(setup: Setup, args) -> dict[str, list]:
    """The simulator on the live schedule's own requests, and each rate alone at steady state."""
    if args.no_sim:
        return {}
    print(f"simulating the same schedule, then {len(setup.rates)} rates at steady state ...", end=" ", flush=True)
    started = time.monotonic()
    stages = [Stage(r, s) for r, s in setup.stages()]
    items = spec_requests(setup.spec, stages, setup.scale, seed=setup.seed)
    same = sim_curve.schedule(setup.spec, items, setup.windows(), setup.scale)
    steady = sim_curve.curve(setup.spec, setup.rates, args.sim_requests)
    print(f"{time.monotonic() - started:.0f} s", flush=True)
    return {"schedule": same, "steady": steady}


# -- the live part ----------------------------------------------------------------------------------

def run_live(setup: Setup, args, prediction: Prediction, sims: dict) -> LiveResult:
    if args.url:
        return _measure(setup, args, args.url.rstrip("/"), _worker_urls(args), prediction, sims)
    from kvlab.launcher import Cluster

    spec = setup.spec
    print(f"starting the cluster ({len(spec.worker_list())} workers + router) ...", flush=True)
    with Cluster(setup.spec_path, spec, quiet=not args.verbose, time_scale=args.time_scale) as cluster:
        return _measure(setup, args, cluster.url, cluster.worker_urls(), prediction, sims)


def _measure(setup: Setup, args, url: str, workers: dict[str, str], prediction: Prediction, sims: dict) -> LiveResult:
    plan = LivePlan(url=url, worker_urls=workers, rates=setup.rates, warmup_s=setup.warmup_s,
                    duration_s=setup.duration_s, tail_s=setup.tail_s, time_scale=setup.scale, out=setup.out,
                    spec_path=str(setup.spec_path), model=args.model, seed=setup.seed, api=args.api)
    progress = Progress(sum(s for _, s in setup.stages()))
    print(f"measuring against {url} (rows appear as each rate's requests finish) ...", flush=True)
    progress.println(rpt.table({"points": []}))
    printer = lambda i, res: progress.println(rpt.row_cells_text(  # noqa: E731
        measured_point(setup, res, i, prediction, sims)))
    result = measure(plan, on_stage=printer, progress=progress)
    progress.close()
    result.url = url
    return result


# -- points and the report --------------------------------------------------------------------------

def measured_point(setup: Setup, result: LiveResult, i: int, prediction: Prediction, sims: dict) -> dict:
    spec, w, slo = setup.spec, result.windows[i], setup.spec.slo
    summary = analysis.summarize(result.records, w, setup.scale, slo.ttft_p99_s, slo.itl_p99_s)
    scraped = result.scraped[i]
    if scraped is not None and scraped.prefix_hit_rate is not None:
        summary.prefix_hit_rate = scraped.prefix_hit_rate   # the workers' counters beat usage fields
        summary.preemptions = scraped.preemptions
    lag = scraped.lag_p99_s if scraped else None
    client_lag = analysis.client_lag_p99(result.records, w)
    dropped = sum(1 for r in result.records if r.get("stage") == i and str(r.get("error", "")).startswith("dropped"))
    notes = _validity_notes(spec, lag, client_lag, dropped)
    point = {"rate": w.rate, "measured": summary, "unfinished": result.unfinished(i),
             "ttft_p99_with_failures": analysis.ttft_p99_with_failures(result.records, w, setup.scale,
                                                                       result.missing(i)),
             "lag_p99_s": lag, "lag_max_s": scraped.lag_max_s if scraped else None,
             "client_lag_p99_s": client_lag, "valid": not notes, "notes": notes,
             "simulated": sims["schedule"][i] if sims else None,
             "steady": sims["steady"][i] if sims else None,
             "planned": prediction.points[i] if prediction.points else None}
    return rpt.to_builtins(point)


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


def build_report(setup: Setup, args, result: LiveResult, prediction: Prediction, sims: dict) -> dict:
    spec = setup.spec
    points = [measured_point(setup, result, i, prediction, sims) for i in range(len(result.windows))]
    report = {
        "kvlab_sweep": 1, "spec": spec.name, "spec_path": str(setup.spec_path), "target": result.url,
        "time_scale": setup.scale, "slo": {"ttft_p99_s": spec.slo.ttft_p99_s, "itl_p99_s": spec.slo.itl_p99_s},
        "workload": _workload_text(spec), "model": result.header.get("model"),
        "stages": {"rates": setup.rates, "warmup_s": setup.warmup_s, "duration_s": setup.duration_s,
                   "tail_s": setup.tail_s, "emulated_s_per_rate": setup.stage_s / setup.scale, "why": setup.why},
        "points": points, "live_wall_s": result.wall_s, "warnings": list(result.errors),
    }
    report["c_max"] = capacities(points, spec.slo, prediction)
    report["knee"] = knees(points)
    invalid = [p for p in points if not p["valid"]]
    report["valid"] = not invalid and not result.errors
    for p in invalid:
        report["warnings"].append(f"rate {p['rate']:g}: INVALID: " + "; ".join(p["notes"]))
    if prediction.error:
        report["warnings"].append(prediction.error)
    return report


def capacities(points: list[dict], slo, prediction: Prediction) -> dict:
    """C_max four ways, and the gaps between them that explain measured vs planned."""
    rates = [p["rate"] for p in points]

    def crossing(ttft, itl_key) -> dict:
        c = analysis.c_max(rates, [_num(t) for t in ttft], [_num(rpt.get(p, itl_key)) for p in points],
                           slo.ttft_p99_s, slo.itl_p99_s)
        return {"rate": c.rate, "bound": c.bound, "limited_by": c.limited_by, "upper": c.upper,
                "text": c.describe()}

    out = {"measured": crossing([p["ttft_p99_with_failures"] for p in points], "measured.itl.p99")}
    if points and points[0]["simulated"] is not None:
        out["simulated"] = crossing([_sim_ttft(p["simulated"]) for p in points], "simulated.itl.p99")
        out["steady"] = crossing([_sim_ttft(p["steady"]) for p in points], "steady.itl.p99")
    if prediction.c_max is not None:
        out["planned"] = {"rate": prediction.c_max, "bound": "planner", "limited_by": "",
                          "text": f"{prediction.c_max:.3g}"}
    elif prediction.error:
        out["planned"] = {"rate": None, "error": prediction.error}
    exact = lambda name: (out.get(name) or {}).get("rate") if (out.get(name) or {}).get("bound") in (  # noqa: E731
        "interpolated", "planner") else None
    out["gap_pct"] = analysis.gap_percent(exact("measured"), exact("planned"))
    measured = out.get("measured") or {}
    if measured.get("bound") == "bracket" and exact("planned"):
        out["gap_pct_range"] = [analysis.gap_percent(measured["rate"], exact("planned")),
                                analysis.gap_percent(measured["upper"], exact("planned"))]
    out["gaps"] = {"host (measured vs simulated, same schedule)": analysis.gap_percent(exact("measured"), exact("simulated")),
                   "stage length (same schedule vs steady state, simulated)": analysis.gap_percent(exact("simulated"), exact("steady")),
                   "model (simulated steady state vs planned)": analysis.gap_percent(exact("steady"), exact("planned"))}
    return rpt.to_builtins(out)


def _sim_ttft(s: dict | None) -> float | None:
    """A simulated p99 TTFT counting rejections as misses, like the measured one."""
    if s is None:
        return None
    failed = s["requests"] - s["completed"]
    if s["requests"] and failed / s["requests"] > 0.01:
        return math.inf
    return rpt.get(s, "ttft.p99")


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
        print(f"\n{bar}\nINVALID RUN: the numbers above were taken on an overloaded host; do not trust them.",
              file=sys.stderr)
        for w in report["warnings"]:
            print(f"  - {w}", file=sys.stderr)
        print(bar, file=sys.stderr)
    elif report["warnings"]:
        for w in report["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    print(f"\nreport: {', '.join(files.values())}  ({report['wall_s']:.0f} s)")
