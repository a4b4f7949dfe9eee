"""Planner C_max vs simulated C_max, with the gap: on the bundled specs (or the ones named), or on
clusters drawn at random (loadtests.planner_draws) with the simulator's own noise beside each.

    .venv/bin/python benchmarks/planner_vs_sim.py [default disagg-70b-h100 ...] [--requests 2000] [--steady]
    .venv/bin/python benchmarks/planner_vs_sim.py --draws 30 [--seed 12] [--requests 5000] [--local-prefill-tokens 512]
        [--target-noise 0.03] [--max-requests 30000]

A draw whose simulated C_max is noisier than --target-noise (block bootstrap, or half the disagreement
of the windows' two halves, whichever is larger) is simulated again with more requests per rate
(planner_draws.quiet), up to --max-requests; the table says how many it took. `halves`: the C_max of the
windows' second halves over their first halves' (a stationarity check; "apart": a half's p99s do not
cross the SLO between the rates the whole's do).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time

from emulator.spec import load_spec
from loadtests import planner_draws
from loadtests.capacity_check import check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=["default", "colocated-8b-h100", "disagg-70b-h100"])
    parser.add_argument("--requests", type=int, default=None, help="measured requests per rate")
    parser.add_argument("--steady", action="store_true",
                        help="specs: each rate in its steady state (warm-up and window in request lifetimes)")
    parser.add_argument("--draws", type=int, default=0, help="random clusters instead of the specs")
    parser.add_argument("--seed", type=int, default=12, help="seed of the draws (fixed: the same set each run)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="draw indices to run")
    parser.add_argument("--local-prefill-tokens", type=int, default=0,
                        help="disaggregated draws: pd_pair prefills prompts with fewer uncached tokens on the decode "
                             "worker (conditional disaggregation; 0, the drawn set: every prefill on the prefill pool)")
    parser.add_argument("--target-noise", type=float, default=planner_draws.TARGET_NOISE,
                        help="draws: simulate again with more requests while the simulated C_max's "
                             "relative sd is above this")
    parser.add_argument("--max-requests", type=int, default=planner_draws.MAX_REQUESTS,
                        help="draws: at most this many measured requests per rate")
    args = parser.parse_args()
    if args.draws:
        random_draws(args.draws, args.seed, args.requests or planner_draws.MIN_REQUESTS, args.only,
                     args.local_prefill_tokens, args.target_noise, args.max_requests)
    else:
        bundled(args.specs, args.requests or 2000, args.steady)


def bundled(names: list[str], requests: int, steady: bool = False) -> None:
    print(f"{'spec':<20} {'planner':>9} {'simulated':>10} {'gap':>7}  cpu s")
    for name in names:
        started = time.process_time()
        c = check(load_spec(name), requests, steady=steady)
        gap = f"{c.gap:+.1%}" if c.gap is not None else c.sim_bound
        sim = f"{c.sim_c_max:.1f}" if c.sim_c_max else "n/a"
        print(f"{c.spec:<20} {c.planner_c_max:>9.1f} {sim:>10} {gap:>7}  {time.process_time() - started:.0f}")


def random_draws(n: int, seed: int, requests: int, only: list[int] | None, local_prefill_tokens: int = 0,
                 target_noise: float = planner_draws.TARGET_NOISE, most: int = planner_draws.MAX_REQUESTS) -> None:
    print(f"{n} draws, seed {seed}, {requests} measured requests per simulated rate (more, up to {most}, "
          f"where the simulated C_max's noise is over {target_noise:.0%})")
    print(f"{'#':>2} {'cluster':<58} {'TTFT SLO':>8} {'ITL SLO':>8} {'planned':>8} {'binds':<9} "
          f"{'simulated':>9} {'by':<4} {'gap':>7} {'noise':>6} {'halves':>7} {'requests':>8} {'cpu s':>5}")
    gaps, noises = [], []
    for d in planner_draws.draws(seed, n):
        if only and d.index not in only or (local_prefill_tokens and d.mode != "disaggregated"):
            continue
        d = dataclasses.replace(d, local_prefill_tokens=local_prefill_tokens)
        a = planner_draws.quiet(d, requests, target_noise, most)
        gap = f"{a.gap:+.1%}" if a.gap is not None and a.bound == "interpolated" else a.bound
        noise = f"{a.noise:.1%}" if a.noise is not None else "n/a"
        halves = "n/a" if a.halves is None else f"{a.halves:+.1%}" if math.isfinite(a.halves) else "apart"
        sim = f"{a.simulated:.3g}" if a.simulated else "n/a"
        print(f"{d.index:>2} {d.label():<58} {d.ttft_slo:>8.3g} {d.itl_slo:>8.3g} {a.planned:>8.3g} "
              f"{a.binding:<9} {sim:>9} {a.culprit:<4} {gap:>7} {noise:>6} {halves:>7} {a.requests:>8} {a.cpu_s:>5.0f}"
              f"{_earlier(a)}", flush=True)
        if a.gap is not None and a.bound == "interpolated":
            gaps.append(abs(a.gap))
        if a.noise is not None:
            noises.append(a.noise)
    if gaps:
        within = sum(g <= 0.10 for g in gaps)
        print(f"within 10%: {within} of {len(gaps)} interpolated draws; |gap| max {max(gaps):.1%}, "
              f"median {sorted(gaps)[len(gaps) // 2]:.1%}; simulator noise median "
              f"{sorted(noises)[len(noises) // 2]:.1%}, max {max(noises):.1%}" if noises else "")


def _earlier(a: planner_draws.Agreement) -> str:
    """The noisier passes before the one in the row: '  (3000: +35.7% noise 8.8%; 6000: +9.0% halves apart)'."""
    passes = [f"{n}: {g:+.1%} " + (f"noise {e:.1%}" if math.isfinite(e) else "halves apart")
              for n, g, e in a.earlier if g is not None and e is not None]
    return f"  ({'; '.join(passes)})" if passes else ""


if __name__ == "__main__":
    main()
