"""Machine instructions a router request costs: a CPU measure that host load does not move.

CPU time per request on a shared host moves by 10-25% from run to run (other tenants' load and cache
traffic), more than most single changes to the request path save. Counting the instructions the router
process executes does not move: one router process (`kvlab router`, prefix_bounded, no KV events, as
benchmarks/router_layers.py runs it) runs under valgrind's callgrind with counting off; before two stub
OpenAI servers (benchmarks/openai_stub.py), a client here sends a warm-up, then counting runs over
--requests non-streaming requests (the ~64-token text prompts benchmarks/router_peers.py sends, over
--connections keep-alive connections), and the count is divided by them. Repeats of one tree agree
within about 0.5%; time-driven work (health probes, the router's tick) counts ~50x too often under
valgrind, and still adds well under 1% a request.

An instruction count is not a time: a cache miss costs many instructions' time, and the router's request
path runs about twice as slowly in a busy server as in a tight loop (benchmarks/router_layers.py). It
measures how much work a change removes, not the seconds it saves.

--revs compares git revisions side by side (each checked out into a temporary worktree; "." is the
working tree as it is), interleaved, medians of --reps. Needs valgrind (callgrind_control comes with it).

Run: .venv/bin/python benchmarks/router_instructions.py [--revs HEAD~1,.] [--requests 1000] [--reps 2]

Measured (this 2-core VM, 2 reps each, 1,000 requests over 8 connections; millions of instructions per
1,000 requests = thousands a request): the router before its SLO ledger's per-request glue was skipped for
policies without predictions 606-609, after 588-591 (-2.8%); then without the tokenizer's whitespace
regex on printable text 576 (-2.4%). Of those 576k (Router.handle swapped for benchmarks/router_layers.py's
lighter handlers): the serving layers alone 228k, + decode, check and tokenize 423k, + route 515k.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from router_calls import free_port, wait_healthy
from router_peers import text_body

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WARM_UP = 300


async def _send(port: int, first: int, count: int, connections: int) -> None:
    """`count` non-streaming requests over `connections` keep-alive connections, each answered in full."""
    async def one_connection(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(first + k, first + count, connections):
            body = text_body(i, False, 1)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the router answered {head.splitlines()[0]!r}")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()
    await asyncio.gather(*(one_connection(k) for k in range(connections)))


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def count(tree: Path, requests: int, connections: int) -> float:
    """Instructions a request in one router process run from `tree`, under callgrind."""
    ports = [free_port(), free_port()]
    stubs = [subprocess.Popen([sys.executable, str(HERE / "openai_stub.py"), "--port", str(p)]) for p in ports]
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        workers = ",".join(f"s{i}=http://127.0.0.1:{p}" for i, p in enumerate(ports))
        router = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                   f"--callgrind-out-file={out}/cg.out", sys.executable, "-m", "kvlab.cli", "router",
                                   "--workers", workers, "--policy", "prefix_bounded", "--kv-events", "off",
                                   "--log-level", "warning", "--processes", "1", "--port", str(port)],
                                  cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(port, seconds=600, workers=2)
            _control("-i", "on", str(router.pid))
            asyncio.run(_send(port, 0, WARM_UP, connections))
            _control("-z", str(router.pid))
            asyncio.run(_send(port, 1_000_000, requests, connections))
            _control("-d", str(router.pid))
            time.sleep(0.5)
            total = 0
            for dump in Path(out).glob("cg.out*"):
                for line in dump.read_text().splitlines():
                    if line.startswith("totals:"):
                        total += int(line.split()[1])
        finally:
            router.terminate()
            router.wait(60)
            for stub in stubs:
                stub.terminate()
    return total / requests


@contextmanager
def checked_out(rev: str):
    """The tree of `rev` ("." is the working tree): a temporary git worktree, removed afterwards."""
    if rev == ".":
        yield ROOT
        return
    where = Path(tempfile.mkdtemp(prefix="kvlab-rev-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(where), rev], cwd=ROOT, check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, check=False)
        shutil.rmtree(where, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revs", default=".", help="comma-separated git revisions; '.': the working tree")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (callgrind and callgrind_control): apt install valgrind")
    revs = args.revs.split(",")
    counts: dict[str, list[float]] = {rev: [] for rev in revs}
    with ExitStack() as stack:
        trees = {rev: stack.enter_context(checked_out(rev)) for rev in revs}
        for _ in range(args.reps):
            for rev in revs:
                counts[rev].append(count(trees[rev], args.requests, args.connections))
    first = statistics.median(counts[revs[0]])
    print(f"instructions a request, one router process, {args.requests} requests over {args.connections} "
          f"connections, {args.reps} reps; median [range]")
    for rev in revs:
        runs = counts[rev]
        median = statistics.median(runs)
        print(f"  {rev:12} {median / 1e3:8.1f}k [{min(runs) / 1e3:.1f}-{max(runs) / 1e3:.1f}k]  "
              f"x{median / first:.3f} of {revs[0]}")


if __name__ == "__main__":
    main()
