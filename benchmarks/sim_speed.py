"""How fast the discrete-event simulator runs: a 32-worker cluster replaying a real trace.

The Mooncake conversation trace (12,031 requests) is tiled to the requested count: each repeat
starts where the previous one ended and shifts its block ids, so it behaves as new conversations.
Prints simulated seconds, CPU seconds, their ratio (x real time) and requests per CPU-second.

    .venv/bin/python benchmarks/sim_speed.py [--requests 50000] [--workers 32] [--speedup 1]
"""
from __future__ import annotations

import argparse
import time

from emulator import traces
from emulator.sim.simulator import Simulator
from emulator.spec import example_spec_path, parse_spec

ID_SHIFT = 10_000_000   # larger than any block id in the trace


def tiled(records: list[traces.TraceRecord], count: int) -> list[traces.TraceRecord]:
    out, span = [], records[-1].timestamp + 1
    for rep in range(count // len(records) + 1):
        for rec in records:
            if len(out) == count:
                return out
            out.append(traces.TraceRecord(rec.timestamp + rep * span, rec.input_length, rec.output_length,
                                          [h + rep * ID_SHIFT for h in rec.hash_ids]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--speedup", type=float, default=1.0,
                        help="divide trace timestamps by this (1: the trace's own 3.4 requests/s)")
    parser.add_argument("--policy", default="prefix_bounded")
    args = parser.parse_args()
    base = open(example_spec_path("colocated-8b-h100")).read()
    spec = parse_spec(base.replace("count = 4", f"count = {args.workers}"))
    path = traces.shared_trace()
    if path is None:
        raise SystemExit("the Mooncake trace is not in $KVLAB_DATA_DIR/traces (see emulator/datasets.py)")
    records = tiled(traces.read_trace(path), args.requests)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sim = Simulator(spec, policy=args.policy).run(traces.trace_requests(records, speedup=args.speedup))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    s = sim.summary()
    print(f"workers {len(sim.workers)}  requests {s.requests}  completed {s.completed}  rejected {s.rejected}")
    print(f"simulated {sim.now:,.0f} s  in {cpu:,.1f} CPU s ({wall:,.1f} s wall)")
    print(f"speed: {sim.now / cpu:,.1f}x real time   {s.requests / cpu:,.0f} simulated requests per CPU-second")
    print(f"TTFT p50 {s.ttft.p50 * 1e3:.0f} ms  p99 {s.ttft.p99 * 1e3:.0f} ms   ITL p50 {s.itl.p50 * 1e3:.1f} ms"
          f"   prefix hit rate {s.prefix_hit_rate:.1%}")


if __name__ == "__main__":
    main()
