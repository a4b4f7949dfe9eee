"""Planner C_max vs simulated C_max for the bundled specs (or the ones named), with the gap.

    .venv/bin/python benchmarks/planner_vs_sim.py [default disagg-70b-h100 ...] [--requests 2000]
"""
from __future__ import annotations

import argparse
import time

from loadtests.capacity_check import check
from emulator.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=["default", "colocated-8b-h100", "disagg-70b-h100"])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per rate")
    args = parser.parse_args()
    print(f"{'spec':<20} {'planner':>9} {'simulated':>10} {'gap':>7}  cpu s")
    for name in args.specs:
        started = time.process_time()
        c = check(load_spec(name), args.requests)
        gap = f"{c.gap:+.1%}" if c.gap is not None else c.sim_bound
        sim = f"{c.sim_c_max:.1f}" if c.sim_c_max else "n/a"
        print(f"{c.spec:<20} {c.planner_c_max:>9.1f} {sim:>10} {gap:>7}  {time.process_time() - started:.0f}")


if __name__ == "__main__":
    main()
