"""SLO-aware routing against kv_aware and prefix_bounded on a mixed workload near capacity.

A chat + RAG + agentic mix (emulator.workload archetypes) on the default spec's engine at 8 colocated
workers in the simulator, at arrival rates around its saturation. Per policy and rate: the share of
requests whose TTFT meets the SLO (and both TTFT and TPOT: the summary's attainment), TTFT p50/p99,
the prefix hit rate, and for slo_aware the median and p90 of |predicted - actual| / actual TTFT
(router.policies.slo_ledger's pairs).
The router's load shedder (router.frontdoor.gate.DrainLimit, on by default) runs in the simulator as in
the router: it refuses (503) a request once the engines' queues hold what the TTFT SLO allows, and
routing.keep_in_line moves kv_aware's and prefix_bounded's choice off a worker whose line is full.
Columns: "TTFT ok %" counts every request that arrived, a refused one as a miss; "of adm %" counts only
the admitted ones; "refused %"; the hit rate is over finished requests (refused ones hold no cache).
Measured (simulated, deterministic: the same figures on any host; 6,000 requests, TTFT SLO 500 ms), shedder
on. TTFT ok % / refused % (hit %), and slo_aware's median |predicted - actual| / actual TTFT (re-measured
after changes elsewhere; the table before read 100.0/ 0.0 (88.6) at 225/0 for kv_aware and slo_aware):
  rate/seed  kv_aware           prefix_bounded     slo_aware
  225/0      100.0/ 0.0 (88.7)  100.0/ 0.0 (88.5)   99.7/ 0.1 (88.4)   7.5%
  240/0       92.9/ 6.2 (85.5)   92.7/ 6.5 (85.4)   96.2/ 3.5 (88.1)   8.3%
  255/0       88.9/10.0 (85.0)   89.4/ 9.6 (85.1)   92.0/ 7.0 (88.0)   9.5%
  270/0       84.5/14.4 (83.8)   84.1/14.9 (83.6)   88.7/10.7 (87.9)   9.5%
  225/1      100.0/ 0.0 (87.7)  100.0/ 0.0 (87.9)  100.0/ 0.0 (87.8)   7.4%
  240/1       96.0/ 3.5 (85.8)   97.0/ 2.7 (86.0)   98.7/ 1.1 (87.8)   7.8%
  255/1       90.5/ 8.7 (83.9)   91.1/ 8.2 (84.4)   94.3/ 5.2 (87.5)   8.6%
  270/1       88.2/11.1 (84.3)   88.5/11.2 (84.3)   92.1/ 7.6 (87.7)  10.6%
  225/2      100.0/ 0.0 (87.8)   99.9/ 0.0 (87.6)  100.0/ 0.0 (87.6)   7.7%
  240/2       95.4/ 4.4 (85.4)   95.4/ 4.2 (85.6)   97.7/ 2.2 (87.5)   7.7%
  255/2       91.1/ 8.4 (84.4)   90.9/ 8.5 (84.4)   94.2/ 5.5 (87.6)   9.0%
  270/2       86.8/12.2 (83.7)   87.2/12.4 (83.5)   91.4/ 8.2 (87.7)   9.3%
  225/3      100.0/ 0.0 (87.3)  100.0/ 0.0 (87.2)  100.0/ 0.0 (86.9)   7.5%
  240/3       95.7/ 3.8 (84.5)   95.5/ 4.0 (84.8)   98.1/ 1.8 (86.9)   8.3%
  255/3       91.8/ 7.7 (83.8)   91.8/ 7.8 (83.6)   95.2/ 4.7 (87.1)   9.2%
  270/3       88.1/11.6 (83.1)   87.7/11.6 (82.9)   91.9/ 7.8 (86.9)   9.3%
Seeds 4 and 5 (lighter draws, not tabled) agree. Wherever more than 0.1% of requests are late with
kv_aware or prefix_bounded, slo_aware keeps the most in time, by 1.7-4.2 points, and hits the most, by
1.8-4.1 points. Where every policy keeps (nearly) all in time (225 req/s; 240 on seeds 4 and 5) its hit
rate is the best or 0.1-0.4 points below the best, and at 225/0 it alone is late, for 0.3% (--explain: 16
late, 8 of them refused by the shedder, 5 predicted in time and late: 447 ms predicted, 546 ms actual,
medians). At 225/2 (--explain) 20 of its 36 moves off the longest cached prefix were the bounded-load
cap's (the spec's eps 0.25, slack 2), 20k tokens re-prefilled in all; waiving the cap for the prefix's
holder lost in-time share and gained no hit rate, and so did waiving it only where the holder is
predicted well within the SLOs (router.policies.slo_aware's docstring). Of the admitted requests
98.7-100% are in time with any policy: past capacity the shedder keeps the admitted in time (requests
state no SLO here, so slo_aware's 429 never fires); slo_aware gains by being refused less, as
keep_in_line moves the others' choices off full lines, each move leaving a cached prefix behind.
With --no-shedding every request is routed (TTFT ok %, hit %); slo_aware as by default (concentrate_held:
a request predicted late on every worker joins the latest queue holding its longest cached prefix),
and, last, the score alone (slo_aware:concentrate_held=false):
  rate/seed  kv_aware      prefix_bounded  slo_aware     score alone
  225/0       98.9 (88.8)    99.3 (88.8)    99.9 (88.5)    99.9 (88.5)
  240/0       87.0 (88.6)    88.9 (88.5)    91.2 (88.1)    88.6 (88.2)
  255/0       79.8 (88.7)    80.8 (88.6)    81.2 (87.9)    76.4 (88.1)
  270/0       71.8 (88.4)    70.0 (88.4)    73.2 (87.7)    69.3 (88.0)
  225/1       89.1 (88.0)   100.0 (87.9)   100.0 (87.8)   100.0 (87.8)
  240/1       86.8 (88.1)    97.3 (88.1)    98.1 (87.8)    98.3 (87.9)
  255/1       81.1 (87.8)    82.3 (87.9)    82.0 (87.4)    79.0 (87.5)
  270/1       77.4 (88.2)    72.7 (88.1)    77.0 (87.5)    70.5 (87.7)
  225/2       86.1 (87.9)    99.0 (87.8)   100.0 (87.6)   100.0 (87.6)
  240/2       82.9 (88.0)    89.9 (87.9)    94.9 (87.6)    93.8 (87.5)
  255/2       82.6 (88.0)    83.6 (87.9)    85.3 (87.3)    81.4 (87.6)
  270/2       79.8 (88.0)    73.2 (88.0)    78.5 (86.9)    71.0 (87.6)
  225/3       94.8 (87.2)   100.0 (87.2)   100.0 (86.9)   100.0 (86.9)
  240/3       78.9 (87.1)    93.0 (87.2)    95.7 (86.8)    95.1 (86.9)
  255/3       81.5 (87.4)    84.2 (87.3)    87.6 (86.7)    84.5 (87.0)
  270/3       71.2 (87.3)    73.2 (87.3)    78.8 (86.5)    72.7 (87.0)
With the shedder on the two slo_aware columns are the same on every row of seeds 0-5 (the shedder
refuses what is late everywhere first). Shedder off, over seeds 0-5 slo_aware keeps as many in time as
the best of the other two or more on 21 of 24 rows (behind at 255/1 by 0.3, 270/1 by 0.4, 270/2 by 1.3
points), at 0.3-1.1 points of hit rate below the best; the score alone loses past saturation on 10 of 12
rows (ahead at 255/3 and 255/4). --explain at 255/0, the score alone: of its 1,416 late requests 1,318
were predicted late on every worker (1,200 of the late arrived in the run's last 20%), 21 were predicted
in time and late (460 ms predicted, 600 ms actual, medians), 77 were sent to a worker predicted late while
another was predicted in time. Not the prediction, then, but balance: its queues pass the SLO together,
while kv_aware, which weighs load less, starts missing sooner but at a fraction of the arrivals, keeping
the rest in time. Sacrificing the latest queue to the backlog (concentrate) gains up to 10.2 points at
up to 3.4 points of hit rate; sacrificing only holders of the prompt's longest cached prefix (the
default) up to 7.5 at 0-0.7 points (and a later tail: TTFT p99 at 240/2 0.93 -> 1.62 s, at 270/2
2.8 -> 6.5 s); so does refusing what is late everywhere (measured before: 95.7/89.5%
in time at 240/255 on seed 0, refusing 2.1/5.9%), which is the shedder's job.
Run: .venv/bin/python benchmarks/slo_routing.py [--rates 225,240,255] [--requests 6000] [--ttft-slo 0.5]
     [--policies kv_aware,prefix_bounded,slo_aware,slo_aware:concentrate_held=false]
     [--mix chat=0.5,rag=0.3,agentic=0.2] [--seed 0] [--no-shedding] [--set POLICY.KEY=VALUE] [--explain]
"""
from __future__ import annotations

import argparse
import time

import msgspec
import numpy as np

from emulator import workload
from emulator.sim.policy_settings import policy_settings
from emulator.sim.simulator import Simulator
from loadtests.compare import whole_run
from router.policies.base import healthy
from router.policies.bounded_load import load_cap
from router.policies.slo_aware import predict

POLICIES = "kv_aware,prefix_bounded,slo_aware"
MIX = "chat=0.5,rag=0.3,agentic=0.2"


def spec_with_workers(n: int):
    try:   # one spec for both benchmarks; run as a script, benchmarks/ is on sys.path
        from routing_quality import spec_with_workers as same
    except ImportError:
        from benchmarks.routing_quality import spec_with_workers as same
    return same(n)


def prediction_error(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Median and p90 of |predicted - actual| / actual over (predicted, actual) TTFT pairs."""
    if not pairs:
        return float("nan"), float("nan")
    p = np.asarray(pairs)
    err = np.abs(p[:, 0] - p[:, 1]) / np.maximum(p[:, 1], 1e-9)
    return float(np.median(err)), float(np.quantile(err, 0.9))


def ttft_shares(records, ttft_slo: float) -> tuple[float, float, float]:
    """(first token within the SLO, of all requests; the same of the admitted ones; refused), as shares.
    A refused request (the shedder's 503, a stated SLO's 429, no worker) counts as a miss in the first."""
    records = list(records)
    timely = sum(1 for r in records if r.first is not None and r.first - r.arrival <= ttft_slo)
    refused = sum(1 for r in records if r.error is not None and r.first is None)
    admitted = len(records) - refused
    return (timely / max(len(records), 1), timely / admitted if admitted else float("nan"),
            refused / max(len(records), 1))


class Pick(msgspec.Struct):
    """One slo_aware decision as --explain sees it: what it predicted where it sent the request, the least
    prediction anywhere, and whether it left the worker holding the longest cached prefix (and why)."""
    arrival: float
    prompt: int
    predicted: float       # where it went
    least: float           # the least predicted TTFT over the workers it could pick
    moved_tokens: int      # uncached tokens more than at the longest cached prefix (0: it stayed)
    moved_by: str          # "": it stayed; "cap" (bounded-load), "itl" (the home breaks the ITL SLO), "score"


def watch(sim: Simulator, picks: list[Pick]) -> None:
    """Record each of slo_aware's decisions in `sim` (re-predicting every worker with its pure predict();
    the simulator's clock at a decision is the request's arrival)."""
    policy = sim.policies.get("slo_aware")
    inner = policy.choose

    def choose(request, workers):
        decision = inner(request, workers)
        alive = healthy(workers)
        tiers = policy.index.match_tiers(request.blocks)
        preds = {w.id: predict(policy.table, w, request.prompt_tokens, *tiers.get(w.id, (0, 0))) for w in alive}
        itl_slo = request.slo_tpot_s or policy.itl_slo_s or policy.table.itl_slo_s
        capped = set()
        if policy.eps is not None:
            cap = load_cap(sum(w.in_flight for w in alive), len(alive), policy.eps, policy.slack)
            capped = {w.id for w in alive if w.in_flight >= cap}
        fewest = min(p.new_tokens for p in preds.values())
        homes = [w for w, p in preds.items() if p.new_tokens == fewest]
        mine = preds[decision.worker]
        moved_by = ""
        if mine.new_tokens > fewest:
            moved_by = ("cap" if all(h in capped for h in homes) else
                        "itl" if all(preds[h].itl_s > itl_slo for h in homes) else "score")
        under = {w: p for w, p in preds.items() if w not in capped}   # the policy's candidates, as it filters
        open_ = [p.ttft_s for p in under.values() if p.itl_s <= itl_slo] or [p.ttft_s for p in under.values()]
        picks.append(Pick(sim.now, request.prompt_tokens, decision.predicted_ttft_s or mine.ttft_s, min(open_),
                          mine.new_tokens - fewest, moved_by))
        return decision

    policy.choose = choose


def explain(records, picks: list[Pick], ttft_slo: float) -> None:
    """Why slo_aware's late requests were late, and what its moves off a cached prefix cost."""
    by_arrival = {(p.arrival, p.prompt): p for p in picks}
    late = [r for r in records if r.first is None or r.first - r.arrival > ttft_slo]
    kinds = {"refused": 0, "late everywhere": 0, "mispredicted": 0, "sent late": 0}
    errors = []
    for r in late:
        pick = by_arrival.get((r.arrival, r.prompt_tokens))
        if pick is None or r.first is None:
            kinds["refused"] += 1
        elif pick.least > ttft_slo:
            kinds["late everywhere"] += 1   # the backlog: no worker was predicted in time
        elif pick.predicted <= ttft_slo:
            kinds["mispredicted"] += 1      # predicted in time where it went, and late
            errors.append((pick.predicted, r.first - r.arrival))
        else:
            kinds["sent late"] += 1         # the choice: another worker was predicted in time
    arrivals = sorted(r.arrival for r in records)
    last = arrivals[int(0.8 * (len(arrivals) - 1))] if arrivals else 0.0
    tail = sum(1 for r in late if r.arrival >= last)
    print(f"  late {len(late)}: " + ", ".join(f"{k} {v}" for k, v in kinds.items())
          + f"; {tail} of them in the last 20% of arrivals")
    if errors:
        e = np.asarray(errors)
        print(f"  mispredicted: predicted {1000 * np.median(e[:, 0]):.0f} ms, "
              f"actual {1000 * np.median(e[:, 1]):.0f} ms (medians)")
    moves = [p for p in picks if p.moved_by]
    print(f"  moved off the longest cached prefix: {len(moves)} requests, "
          f"{sum(p.moved_tokens for p in moves)} tokens more to prefill; "
          + ", ".join(f"{k} {sum(1 for p in moves if p.moved_by == k)}" for k in ("cap", "itl", "score")))


def run(rate: float, policies: list[str], requests: int, mix: dict[str, float], ttft_slo: float, seed: int,
        overrides: list[str] = (), shedding: bool = True, why: bool = False) -> None:
    spec = spec_with_workers(8)
    if not shedding:   # the router's load shedder off: every request is routed, however late
        spec = msgspec.structs.replace(spec, router=msgspec.structs.replace(spec.router, shedding=False))
    # The spec describes the workload it serves: slo_aware's table takes decoders' mean output from it.
    spec = msgspec.structs.replace(spec, workload=msgspec.structs.replace(spec.workload, mix=mix))
    reqs = workload.generate(rate, num_requests=requests, mix=mix, seed=seed)
    print(f"\nrate {rate:g}/s, {requests} requests, mix {mix}, TTFT SLO {1000 * ttft_slo:.0f} ms, "
          f"ITL SLO {1000 * spec.slo.itl_p99_s:.0f} ms, load shedder {'on' if shedding else 'off'}")
    print(f"{'policy':<22}{'TTFT ok %':>10}{'of adm %':>9}{'refused %':>10}{'SLO ok %':>9}{'hit %':>7}"
          f"{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'err p50':>9}{'err p90':>9}{'CPU s':>7}")
    for label in policies:
        policy, *assignments = label.split(":")   # a variant: slo_aware:affinity=0
        extra = list(overrides) + [f"{policy}.{a}" for a in assignments]
        started = time.process_time()
        sim = Simulator(spec, policy=policy, settings=policy_settings(spec, policy, overrides=extra))
        picks: list[Pick] = []
        if why and policy == "slo_aware":
            watch(sim, picks)
        sim.run(reqs)
        s = sim.summary(window=whole_run(sim))
        ok, admitted, refused = ttft_shares(sim.log.records.values(), ttft_slo)
        e50, e90 = prediction_error(sim.ttft_predictions)
        print(f"{label:<22}{100 * ok:>10.1f}{100 * admitted:>9.1f}{100 * refused:>10.1f}"
              f"{100 * s.slo_attainment:>9.1f}{100 * s.prefix_hit_rate:>7.1f}"
              f"{1000 * s.ttft.p50:>10.0f}{1000 * s.ttft.p99:>10.0f}{1000 * s.tpot.p50:>10.1f}"
              f"{100 * e50:>8.1f}%{100 * e90:>8.1f}%{time.process_time() - started:>7.1f}", flush=True)
        if picks:
            explain(list(sim.log.records.values()), picks, ttft_slo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="225,240,255")
    parser.add_argument("--policies", default=POLICIES)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--mix", default=MIX)
    parser.add_argument("--ttft-slo", type=float, default=None, help="seconds (default: the spec's ttft_p99_s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-shedding", action="store_true", help="route every request (the spec's shedder off)")
    parser.add_argument("--set", action="append", default=[], metavar="POLICY.KEY=VALUE")
    parser.add_argument("--explain", action="store_true",
                        help="slo_aware: classify its late requests and its moves off a cached prefix")
    args = parser.parse_args()
    mix = {k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    slo = args.ttft_slo if args.ttft_slo is not None else spec_with_workers(8).slo.ttft_p99_s
    for rate in args.rates.split(","):
        run(float(rate), args.policies.split(","), args.requests, mix, slo, args.seed, args.set, not args.no_shedding,
            args.explain)


if __name__ == "__main__":
    main()
