"""Where a router request's CPU goes: the router as it is against the same process doing less of it.

One router process (run here on uvloop, as `kvlab router` runs it: httptools, the router's own protocol,
prefix_bounded, no KV events) in front of two stub OpenAI servers (benchmarks/openai_stub.py), saturated
by a closed loop of 64 connections from a client process (router_overhead.closed_loop, the requests
benchmarks/router_peers.py sends). This process's CPU (user and system) over each run, per request, for:
  full     the router as it is;
  forward  its serving layers only: the request's body in, forwarded to a stub, the answer out
           (uvicorn's protocol, the hot cycle, the upstream transport): Router.handle replaced;
  +intake  forward, after decoding, checking and tokenizing the request (Intake.job, Intake.tokenize);
  +route   +intake, and the routing decision (Proxy.route) picks the stub.
The difference between two rows is what the step between them costs at saturation, where each runs
with its code and data cold (a request's path in the server runs about twice as slowly as the same calls
in a tight loop). Variants interleave; medians and ranges over the repetitions. CPU figures move with
the host's load (this host's other tenants); compare rows of one run.

Run: .venv/bin/python benchmarks/router_layers.py [--reps 3] [--seconds 6]

Measured (this 2-core VM, 3 reps of 6 s; median [range]):
  variant   req/s                user us/req     system us/req
  full       7,072 [6,267-7,223]  117 [110-130]   28 [25-29]
  forward   18,173 [17,779-21,161] 33 [30-34]     16 [15-16]
  +intake   11,513 [10,727-12,153] 66 [64-72]     18 [18-19]
  +route     8,392 [7,945-8,895]  94 [88-97]      25 [24-27]
The serving layers are about a third of a request's CPU; decoding and tokenizing a 64-token prompt, the
routing decision, and the rest (admission, accounting, metrics, the response) about a fifth to a quarter
each. A bare uvloop + httptools proxy (parse, decode the JSON, forward over pooled connections, relay)
spent 9-11 us user and 18-19 us system a request at 24,600-25,500 req/s on the same host.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from router_calls import RouterThread, free_port, wait_healthy
from router_overhead import closed_loop
from router_peers import text_body
from starlette.responses import Response

HERE = Path(__file__).resolve().parent
VARIANTS = ("full", "forward", "+intake", "+route")
CONNECTIONS = 64


def lighter(router, variant: str):
    """Router.handle doing only part of its work (None: the full handler)."""
    if variant == "full":
        return None
    stubs = [w.id for w in router.pool]

    async def handle(request, endpoint):
        raw = await request.body(router.config.limits.max_body_bytes, router.config.limits.body_timeout_s)
        worker = stubs[len(raw) % len(stubs)]   # both stubs in use, as the full router's choices spread them
        if variant != "forward":
            job = router.intake.job(endpoint, raw, 0.0)
            router.intake.tokenize(job)
            if variant == "+route":
                worker = router.proxy.route(job.route, set()).worker
        target = router.pool[worker]
        content = await router.proxy.upstream.post(target.id, target.endpoint("/v1/completions"), raw)
        return Response(content, media_type="application/json")
    return handle


def run(router_thread: RouterThread, variant: str, seconds: float) -> tuple[float, float, float]:
    """(requests a second, user and system microseconds a request) of this process over one run."""
    router, handle = router_thread.router, lighter(router_thread.router, variant)
    if handle is None:
        vars(router).pop("handle", None)   # the class's own handler
    else:
        router.handle = handle
    before = os.times()
    served, serving_s = closed_loop(f"http://127.0.0.1:{router_thread.port}", 1, CONNECTIONS, seconds, False, 1,
                                    text_body)
    after = os.times()
    return (served / serving_s, 1e6 * (after.user - before.user) / served,
            1e6 * (after.system - before.system) / served)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    ports = [free_port(), free_port()]
    stubs = [subprocess.Popen([sys.executable, str(HERE / "openai_stub.py"), "--port", str(p)]) for p in ports]
    try:
        router = RouterThread([f"http://127.0.0.1:{p}" for p in ports])
        wait_healthy(router.port, workers=len(ports))
        rows: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.reps):
            for variant in VARIANTS:
                rows[variant].append(run(router, variant, args.seconds))
        router.stop()
    finally:
        for stub in stubs:
            stub.terminate()
    print(f"one router process, {CONNECTIONS} connections, {args.reps} reps of {args.seconds:g} s, "
          f"{os.cpu_count()} cores; median [range]")
    print(f"  {'':8} {'req/s':>22} {'user us/req':>20} {'system us/req':>20}")
    for variant, runs in rows.items():
        cells = []
        for col in zip(*runs, strict=True):
            cells.append(f"{statistics.median(col):8.0f} [{min(col):.0f}-{max(col):.0f}]")
        print(f"  {variant:8} {cells[0]:>22} {cells[1]:>20} {cells[2]:>20}")


if __name__ == "__main__":
    main()
