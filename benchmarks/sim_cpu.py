"""CPU cost of the discrete-event simulator on fixed cases, with a digest of every result.

Each case is simulated `--repeats` times; the script prints the median CPU seconds, CPU microseconds
per generated token, and a digest (xxh3) of every request's record (arrival, first and last token
times, token count, cached tokens, worker, error), every inter-token gap, the per-worker counters and
the token ids each step sampled. A speed change to the simulator, the engine or the policies must
leave every digest as it was: the same spec, workload and seed give bit-for-bit the same numbers.

    .venv/bin/python benchmarks/sim_cpu.py [--repeats 3] [--case default ...]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import xxhash

from emulator import workload
from emulator.sim.simulator import Simulator
from emulator.spec import ClusterSpec, example_spec_path, load_spec, parse_spec
from loadtests import planner_draws


def _default() -> tuple[ClusterSpec, list]:
    """kvlab's default cluster (two colocated 8B H100 workers, chat, prefix_bounded) at ~50 req/s."""
    spec = load_spec(example_spec_path("default"))
    return spec, workload.from_spec(spec, 50.0, num_requests=3000)


def _draw() -> tuple[ClusterSpec, list]:
    """A disaggregated 8B draw of the planner-vs-simulator comparison (pd_pair), 20 s warm-up + 60 s."""
    spec = planner_draws.draws(12, 8)[7].spec()
    return spec, workload.from_spec(spec, 12.0, duration_s=80.0)


def _chunked() -> tuple[ClusterSpec, list]:
    """Colocated 8B with a 512-token step budget: long RAG and code prompts prefill in chunks."""
    text = open(example_spec_path("colocated-8b-h100")).read()
    spec = parse_spec(text.replace("max_num_batched_tokens = 8192", "max_num_batched_tokens = 512"))
    return spec, workload.from_spec(spec, 20.0, duration_s=60.0)


CASES: dict[str, Callable[[], tuple[ClusterSpec, list]]] = {"default": _default, "draw": _draw,
                                                             "chunked": _chunked}


class _TokenDigest(Simulator):
    """The simulator, also folding every sampled token id into a digest (a separate, untimed run)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_hash = xxhash.xxh3_64()

    def _deliver(self, worker, result) -> None:
        self.token_hash.update(repr((worker.id, result.tokens)).encode())
        super()._deliver(worker, result)


def digest(sim: Simulator) -> str:
    h = xxhash.xxh3_64()
    for request_id, r in sim.log.records.items():
        h.update(repr((request_id, r.arrival, r.first, r.last, r.tokens, r.prompt_tokens, r.cached_tokens,
                       r.host_cached_tokens, r.worker, r.done, r.error)).encode())
    h.update(bytes(sim.log.gaps))
    h.update(bytes(sim.log.gap_arrivals))
    for w in sim.workers.values():
        h.update(repr((w.id, w.routed, w.steps, w.busy_prefill, w.busy_decode, w.usage_time,
                       w.engine.blocks.prefix_hits, w.engine.blocks.prefix_queries,
                       w.engine.scheduler.preemptions)).encode())
    h.update(repr((sim.now, sim.overflow_skips, sim.summary().prefix_hit_rate)).encode())
    return h.hexdigest()


def measure(name: str, repeats: int) -> None:
    spec, requests = CASES[name]()
    cpu, digests = [], set()
    for _ in range(repeats):
        started = time.process_time()
        sim = Simulator(spec).run(requests)
        cpu.append(time.process_time() - started)
        digests.add(digest(sim))
    tokens = sum(r.tokens for r in sim.log.records.values())
    traced = _TokenDigest(spec).run(requests)
    median = statistics.median(cpu)
    print(f"{name:8s} requests {len(requests):5d} tokens {tokens:8d}  CPU median {median:6.2f} s "
          f"(range {min(cpu):.2f}-{max(cpu):.2f})  {median / tokens * 1e6:5.2f} us/token  "
          f"digest {'/'.join(sorted(digests))}  tokens {traced.token_hash.hexdigest()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    args = parser.parse_args()
    for name in args.case or list(CASES):
        measure(name, args.repeats)


if __name__ == "__main__":
    main()
