"""The planner's latency curve below capacity against the simulator's, on clusters drawn at random.

benchmarks/planner_vs_sim.py checks where the planner puts C_max (one point of each curve, where a
p99 crosses its SLO); this checks the curve it draws on the way there. Per draw (loadtests.planner_draws,
the same sets) and per fraction of the planned C_max: the planner's TTFT p50 / p99 and ITL p99 at that
rate against a long simulation's (planner_draws.simulate: a warm-up of ten request lifetimes, a window
of at least a hundred, and at least --requests measured requests). Beside each simulated p99, its own
noise: its relative sd over block-bootstrap resamples of the window (`bootstrap_noise`). A gap well
inside that noise is not the planner's. (The tables below were measured with half the two halves'
relative difference in that column, one draw of a noisy quantity: 2.7% on seed 14 draw #4 at 0.8 of
C_max, where the bootstrap reads 8.1%, at 0.5 1.5% against 5.2%.)

Rates are fractions of the *planned* C_max: where the planner overestimates C_max, its top fraction
lies closer to the simulated knee, and the tails there differ by more than the curve's shape does.

    .venv/bin/python benchmarks/planner_curve.py [--draws 10] [--seed 13] [--only 6 9]
        [--fractions 0.5,0.8,0.95] [--requests 20000]

Measured (simulated, deterministic; seed 13, ten draws, 20,000 requests a rate): median planned /
simulated - 1 over the draws [range], and how many within 10%, before and after two planner changes
(prefixes found whole or not at all; quantile bins centred on p50 and p99):
                 before                          after
  TTFT p50 0.50  +7.3% [-12.4, +11.8]  7/10      +0.7% [-4.4, +33.4]   8/10
  TTFT p50 0.80  +4.5% [-4.9, +21.3]   7/10      +1.2% [-2.1, +13.3]   8/10
  TTFT p50 0.95  +8.3% [-5.0, +13.0]   8/10      -0.4% [-3.6, +13.8]   8/10
  TTFT p99 0.50  +1.8% [-24.4, +5.8]   9/10      -2.2% [-8.9, +3.4]   10/10
  TTFT p99 0.80  -0.1% [-27.3, +4.4]   9/10      -3.1% [-7.5, +9.9]   10/10
  TTFT p99 0.95  -2.1% [-26.0, +6.6]   8/10      -3.7% [-25.6, +5.4]   9/10
  ITL p99        within 10% on all 30 rows, before and after (median -0.5..-3.1%)
Then the prompts packed behind a prompt's last step came as Poisson arrivals, not a fluid flow
(prefill_queue: queueing.CappedArrivals); re-planned at the same rates against the same simulations
(the simulator unchanged), seed 13 and, out of sample, seed 14 (10,000 requests a rate):
TTFT       seed 13 before / after                       seed 14 before / after
  p50 0.50  +0.7% [-4.4, +33.4] 8/10  +0.7% [-4.5, +11.8] 8/10   +0.1% [-3.6, +18.8] 9/10  -1.4% [-7.6, +3.8] 10/10
  p50 0.80  +1.2% [-2.1, +13.3] 8/10  -0.0% [-3.5, +11.0] 9/10   +0.6% [-3.3, +30.6] 9/10  -0.3% [-3.3, +8.3] 10/10
  p50 0.95  -0.4% [-3.6, +13.8] 8/10  -0.6% [-3.6, +11.5] 9/10   -0.5% [-6.9, +15.8] 9/10  -2.3% [-6.9, +4.5] 10/10
  p99 0.50  -2.2% [-8.9, +3.4] 10/10  -2.7% [-9.0, +1.5] 10/10   -0.4% [-7.9, +5.1] 10/10  -0.7% [-7.9, +5.1] 10/10
  p99 0.80  -3.1% [-7.5, +9.9] 10/10  -3.5% [-8.1, +9.9] 10/10   -2.9% [-19.0, +4.6] 8/10  -4.2% [-19.5, +4.6] 8/10
  p99 0.95  -3.7% [-25.6, +5.4] 9/10  -2.4% [-25.7, +8.4] 9/10   -4.3% [-16.3, +10.6] 6/10 -5.8% [-16.8, +10.6] 6/10
Then what arrives behind a prompt on a prefill worker came as quantile bins of its law, not a moment-
matched pair of nodes (batch_queue._behind): seed 13 draw #6's p99 at 0.80 / 0.95 of C_max +9.9 / +4.0%
-> +5.8 / +0.6%, seed 14 draw #1's -3.9 / -5.1% -> -5.4 / -6.3%; medians of the p99 gaps at 0.50 / 0.80 /
0.95: seed 13 -2.7 / -3.5 / -2.4% (unchanged), seed 14 -0.7 / -4.9 / -6.4%.
Then on colocated workers the step in progress packs a random number of prompts, and those arriving
while it runs join the arrival's step (colocated._stepping): seed 14 draw #5's p99 at 0.50 / 0.80 / 0.95
-7.9 / -11.9 / -15.2% -> -5.4 / -7.3 / -8.4% (noise 2.7 / 0.1 / 6.1%); within 10% at 0.80 and 0.95, seed
14: 8 -> 9 and 6 -> 7 of 10; other rows within +-1.5 points; C_max of seeds 13 and 14 unchanged.
This benchmark rerun after all three (seed 13, 20,000 requests a rate, bootstrap noise; 17 min on 2
cores): median gap [range], within 10%: TTFT p50 +0.4% [-4.8, +11.6] / +0.1% [-3.9, +10.9] / -0.0%
[-1.3, +12.5], 9/10 each; TTFT p99 -2.3% [-7.0, +2.4] 10/10 / -3.7% [-10.4, +3.3] 9/10 / -3.3% [-25.2,
+8.8] 9/10; ITL p99 within 10% on all 30 rows. Outside: draw #9's p50 at 0.5 / 0.8 (+9.8 / +10.9%, a
median between the modes of short and long prompts), draw #4's p50 at 0.5 (+11.6%), draw #1's p99 at
0.8 (-10.4%, noise 2.7%), draw #9's p99 at 0.95 (-25.2%, noise 13.7%).
The code-only disaggregated draws (seed 13 #4, seed 14 #3 and #4: ~4,000-token prompts, 1,024-token
budgets) had read p50 +13 to +33% high: 70% of their prompts find no one behind them. Seed 14 draw
#4's p99 at 0.80 (-19.5%, halves' noise 2.7%) is the simulation's luck: replaying the simulator's own
arrivals and new tokens through a FCFS chunked-prefill queue gives its p99 (1,485 vs 1,509 ms), while
the same sizes under fresh Poisson arrivals (400,000) read 1,280 ms, and 10,000-request windows of that
replay range 1,002-1,672 ms (q10-q90 1,077-1,392): a p99 set by a few long busy periods moves more
between windows than between the two halves of one (loadtests.batch_replay on the
run's records). The planner's 1,213 ms sits 5% under the stationary 1,280, most of it the points' own
tail (replayed: 1,203). Left: seed 13 draw #9's p99 at 0.95 (-26%, simulated noise 21%), and the p99s'
median bias of -2 to -6%, which the halves' noise cannot tell from luck.
Then the own-latency law reads its tail on a finer grid (dist.TAIL_EDGES; prefill_queue._finer,
colocated._stepping): a prompt point stood for its bin at the bin's mean, and summed with the step in
progress and the wait, that lost spread pulled p99 in (seed 13 draw #3 at 1.78 req/s: 66.6 ms planned,
70.0 from every sampled prompt's own latency with the same residual and wait, 73.4 simulated over 40,000
requests). Re-planned at the same rates against the same simulations, median TTFT p99 gap at 0.50 / 0.80
/ 0.95 of C_max [range], within 10%: seed 13 -2.3 / -3.7 / -3.3% -> -0.2% [-4.1, +4.2] / +0.3% [-9.0,
+3.6] / +0.1% [-25.0, +7.5], 10 / 9 / 9 -> 10 / 10 / 9; seed 14 -0.7 / -4.9 / -6.4% -> +0.5% [-8.6,
+4.0] / -2.6% [-19.5, +6.7] / -4.0% [-19.0, +10.5], 10 / 9 / 7 -> 10 / 9 / 6 (draw #5 at 0.95: -8.4 ->
-10.6%, noise 6.1%); TTFT p50 and ITL p99 within 0.3 points; C_max of all 20 draws as before.
Then the mean ITL reads the mean of the mixed steps, their packing random (colocated._mean_mixed_step),
not the step at the mean packing: seed 14 draw #5 at 21.7 req/s, mixed steps 24.8 -> 25.4 ms (the
simulated engine's 25.5 at that batch), mean ITL 22.3 -> 22.7 ms (simulated 23.0), batch 89 -> 91, and
the share of arrivals waiting for one of its 128 sequence slots 0.16 -> 0.33% (simulated ~0.6%: those
waits, ~240 ms each, set its TTFT p99). Re-planned as above: draw #5's p99 at 0.95 -10.6 -> -6.8%; seed
14 within 10% at 0.95 6 -> 7 of 10, the medians unchanged (+0.5 / -2.6 / -4.0%); seed 13 unchanged but
draw #9 at 0.95 -25.0 -> -29.6% (noise 13.7%; seed 14 draw #2 -19.0 -> -24.3%, noise 32.4%: at 512- and
256-token budgets the planner's mean packing overstates a mixed step's tokens, 428 against the engine's
376 on seed 13 #9, and so counts too few mixed steps, which the costlier step at the mean packing had
partly made up); ITL p99 median at 0.95 seed 13 -2.2 -> -1.6%, seed 14 -1.3 -> -1.2%. C_max against
benchmarks/planner_vs_sim.py's simulated figures, 20 draws: median |gap| 3.2 -> 2.5%, max 6.1 -> 6.3%,
all within 10% as before.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from emulator import planner
from emulator.planner import context
from emulator.planner.operating import evaluate
from loadtests import parallel_runs, planner_bridge, planner_draws


def p(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.inf


RESAMPLES = 200   # block-bootstrap replicates a row's noise is read from


def bootstrap_noise(run: planner_draws.Run) -> tuple[float, float]:
    """Relative sd of the window's p99 TTFT and p99 ITL over block-bootstrap resamples (its time blocks,
    planner_draws.BLOCKS of them, drawn with replacement: the queue's state carries over within a block).
    Half the two halves' difference, as this column read before, is one draw of a noisy quantity: seed
    14 draw #4 at 0.8 of C_max read 2.7% there, where 10,000-request windows of a stationary replay of
    the same prompts spread by ~10% (module docstring)."""
    rng = np.random.default_rng(0)
    reps = np.array([planner_draws.resampled(run, rng) for _ in range(RESAMPLES)])
    whole = np.array([p(run.ttft, 99), p(run.gaps, 99)])
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.std(reps, axis=0) / whole
    return float(sd[0]), float(sd[1])


def gap(planned: float, simulated: float) -> float:
    return planned / simulated - 1 if simulated > 0 and math.isfinite(planned + simulated) else math.inf


def cell(planned: float, simulated: float) -> str:
    g = gap(planned, simulated)
    return f"{planned * 1e3:8.1f} {simulated * 1e3:8.1f} {g:+7.1%}" if math.isfinite(g) else \
        f"{planned * 1e3:8.1f} {simulated * 1e3:8.1f} {'n/a':>7}"


def curve(d: planner_draws.Draw, fractions: list[float], requests: int) -> list[dict]:
    spec = d.spec()
    req, work, cluster, slo = planner_bridge.planner_inputs(spec)
    cap = planner.capacity(req, work, slo, cluster, catalog=spec.catalog_data())
    ctx = context.build(req, work, spec.catalog_data())
    rates = [cap.max_rate * f for f in fractions]
    runs = parallel_runs.run_all(planner_draws.simulate, [(spec, r, requests) for r in rates])
    rows = []
    for f, rate, run in zip(fractions, rates, runs, strict=True):
        plan = evaluate(ctx, cluster, rate, slo)
        ttft_noise, itl_noise = bootstrap_noise(run)
        rows.append(dict(f=f, rate=rate, n=run.ttft.size, plan=plan,
                         ttft50=p(run.ttft, 50), ttft99=p(run.ttft, 99), itl99=p(run.gaps, 99),
                         ttft_noise=ttft_noise, itl_noise=itl_noise))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--seed", type=int, default=13, help="seed of the draws (planner_vs_sim's sets)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="draw indices to run")
    parser.add_argument("--fractions", default="0.5,0.8,0.95", help="rates, as fractions of the planned C_max")
    parser.add_argument("--requests", type=int, default=20000, help="measured requests per rate (at least)")
    args = parser.parse_args()
    fractions = [float(x) for x in args.fractions.split(",")]
    print(f"{args.draws} draws, seed {args.seed}; rates at {args.fractions} x planned C_max; "
          f">= {args.requests} measured requests a rate. Milliseconds: planned, simulated, gap; "
          "noise: the p99's relative sd over block-bootstrap resamples")
    print(f"{'#':>2} {'f':>4} {'req/s':>6} {'n':>6} | {'TTFT p50 plan / sim / gap':>25} | "
          f"{'TTFT p99 plan / sim / gap':>25} {'noise':>6} | {'ITL p99 plan / sim / gap':>25} {'noise':>6}")
    gaps: dict[tuple[str, float], list[float]] = {}
    for d in planner_draws.draws(args.seed, args.draws):
        if args.only and d.index not in args.only:
            continue
        started = time.time()
        print(f"-- draw {d.index}: {d.label()}, TTFT SLO {d.ttft_slo:.3g} s, ITL SLO {d.itl_slo:.3g} s", flush=True)
        for r in curve(d, fractions, args.requests):
            plan = r["plan"]
            print(f"{d.index:>2} {r['f']:>4.2f} {r['rate']:>6.3g} {r['n']:>6} | {cell(plan.ttft_p50, r['ttft50'])} | "
                  f"{cell(plan.ttft_p99, r['ttft99'])} {r['ttft_noise']:>6.1%} | "
                  f"{cell(plan.itl_p99, r['itl99'])} {r['itl_noise']:>6.1%}", flush=True)
            for name, pl, sim in (("TTFT p50", plan.ttft_p50, r["ttft50"]), ("TTFT p99", plan.ttft_p99, r["ttft99"]),
                                  ("ITL p99", plan.itl_p99, r["itl99"])):
                g = gap(pl, sim)
                if math.isfinite(g):
                    gaps.setdefault((name, r["f"]), []).append(g)
        print(f"   ({time.time() - started:.0f} s)", flush=True)
    print("summary: median gap [min, max], share within 10% / 20%")
    for (name, f), gs in sorted(gaps.items()):
        within = (sum(abs(g) <= 0.1 for g in gs) / len(gs), sum(abs(g) <= 0.2 for g in gs) / len(gs))
        print(f"  {name:<8} at {f:.2f}: {statistics.median(gs):+.1%} [{min(gs):+.1%}, {max(gs):+.1%}], "
              f"{within[0]:.0%} / {within[1]:.0%} of {len(gs)}")


if __name__ == "__main__":
    main()
