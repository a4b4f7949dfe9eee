"""Routing-decision time per policy for 1K, 8K and 32K-token prompts (tokenizing excluded).

One decision = RouteRequest.from_tokens (lazy block hashes) + policy.choose over 8 workers, timed
one at a time; the figure is the median of many runs, in microseconds. kv_aware is timed in four
index states, since it hashes until the first block no worker holds:
  cold   - empty index: stops after the first chunk of blocks,
  shared - a 2K-token system prompt cached on two workers, the rest new (the common case),
  half   - the first half of the prompt cached on one worker,
  full   - the whole prompt cached on one worker: every block is hashed (the worst case).
Policies that read the index are timed twice: "first sight" hashes every block it reads; "+ memo"
is the router's own path, where a BlockHashMemo remembers the 64-block runs of prompts it has seen
(the run-up before timing shows it this prompt, as earlier requests with its prefix would).
Run: .venv/bin/python benchmarks/routing_decision.py [--runs N] [--list]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from kvlab.wire.block_hash import block_hashes
from kvlab.wire.kv_events import BlockStored, KVEventBatch
from router.policies import KvIndex, RouteRequest, WorkerView, build_policy
from router.policies.hash_memo import BlockHashMemo

SIZES = (1024, 8192, 32768)
WORKERS = 8
SYSTEM_TOKENS = 2048


def median_us(fn, runs: int) -> float:
    for _ in range(min(runs, 20)):  # warm caches, rings, allocator
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def index_with(worker_hashes: dict[str, list[int]]) -> KvIndex:
    index = KvIndex()
    for worker_id, hashes in worker_hashes.items():
        index.apply(worker_id, KVEventBatch(0.0, [BlockStored(hashes, None, [], 16)]))
    return index


def cases(tokens):
    """(label, policy, reads the index) triples; kv_aware and pd_pair get an index in each state."""
    full = block_hashes(tokens)
    shared = full[:SYSTEM_TOKENS // 16]
    yield "round_robin", build_policy("round_robin"), False
    yield "least_loaded", build_policy("least_loaded"), False
    yield "prefix_ring", build_policy("prefix_ring"), False
    yield "prefix_bounded", build_policy("prefix_bounded"), False
    for state, held in (("cold", {}), ("shared", {"w1": shared, "w5": shared}),
                        ("half", {"w3": full[:len(full) // 2]}), ("full", {"w3": full})):
        yield f"kv_aware/{state}", build_policy("kv_aware", index=index_with(held)), True
    yield "pd_pair/shared", build_policy("pd_pair", index=index_with({"d1": shared})), True


def workers():
    views = [WorkerView(f"w{i}", in_flight=i % 3, running=i, waiting=i % 2, kv_usage=0.1 * i) for i in range(WORKERS)]
    return views + [WorkerView("p0", role="prefill"), WorkerView("d1", role="decode")]


def _decision(policy, tokens, memo, pool):
    """One routing decision as a no-argument call (the request, hashes included, is built inside the timing)."""
    return lambda: policy.choose(RouteRequest.from_tokens(tokens, memo=memo), pool)


def _hashing(tokens):
    return lambda: block_hashes(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--list", action="store_true", help="pass token ids as a Python list (as a tokenizer returns)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(1024, 128_000, n).astype(np.int32) for n in SIZES}
    if args.list:
        prompts = {n: p.tolist() for n, p in prompts.items()}
    views = workers()
    results: dict[str, dict[int, float]] = {}
    for n, tokens in prompts.items():
        for label, policy, reads_index in cases(tokens):
            pool = views if label.startswith("pd_pair") else views[:WORKERS]
            for suffix, memo in (("", None), (" + memo", BlockHashMemo(16))) if reads_index else (("", None),):
                results.setdefault(label + suffix, {})[n] = median_us(_decision(policy, tokens, memo, pool), args.runs)
        results.setdefault("(all blocks, eager block_hashes)", {})[n] = median_us(_hashing(tokens), args.runs)
    kind = "list[int]" if args.list else "np.int32 array"
    print(f"routing decision, median us of {args.runs} runs, {WORKERS} workers, prompt as {kind}")
    print(f"{'policy':36s}" + "".join(f"{n // 1024:>8d}K" for n in SIZES))
    for label, row in results.items():
        print(f"{label:36s}" + "".join(f"{row[n]:9.1f}" for n in SIZES))


if __name__ == "__main__":
    main()
