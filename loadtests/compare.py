"""`kvlab compare`: one trace through several routing policies, one table.

    kvlab compare --limit 1000                                   # the shared Mooncake trace, simulated
    kvlab compare my.toml --trace t.jsonl --policies round_robin,kv_aware --workers 8 --speedup 2
    kvlab compare --live --limit 200 --time-scale 1              # through the real router and workers

By default every policy runs in the discrete-event simulator: the live cluster's own engine and policy
objects on a virtual clock, so a thousand-request comparison takes seconds and is exactly repeatable.
--live starts the spec's cluster once per policy and replays the trace through it with Locust.
Two rows bound what any policy could reach on the same requests (loadtests/cache_bounds.py): an
infinite cache and one LRU cache the size of the whole cluster's KV; each policy's hit rate is also
given as a share of the pooled LRU. Traces are keyed as `kvlab sim --trace` keys them
(emulator/sim/policy_settings.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from emulator import traces
from emulator.planner.tiered_cache import TierHits, spec_trace_tier_hits
from emulator.sim.policy_settings import policy_settings as sim_policy_settings
from emulator.sim.report import Summary, overload_note, refused_share
from emulator.sim.simulator import Simulator
from emulator.spec import ClusterSpec, SpecError, load_spec, resolve_spec_path
from kvlab.wire.user_errors import count_or_all, positive, positive_int
from loadtests import parallel_runs
from loadtests.cache_bounds import Bounds, cluster_host_blocks, cluster_kv_blocks, hit_rates
from router.policies.registry import check_spec_settings

DEFAULT_POLICIES = "round_robin,prefix_ring,prefix_bounded,kv_aware"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default="default", help="cluster spec file or bundled example name")
    parser.add_argument("--trace", default=None, help="Mooncake-style JSONL trace (default: the shared "
                                                      "mooncake_conversation.jsonl in $KVLAB_DATA_DIR/traces)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated (default: %(default)s)")
    parser.add_argument("--limit", type=count_or_all, default=1000,
                        help="first N trace requests, 0 or 'all' for the whole trace (default %(default)s)")
    parser.add_argument("--speedup", type=positive, default=1.0, help="divide trace timestamps by this")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="override the worker count (colocated specs)")
    parser.add_argument("--prefix-blocks", type=positive_int, default=None,
                        help="blocks that key prefix_ring/prefix_bounded (default for a trace: two 512-token "
                             "trace blocks, see below)")
    parser.add_argument("--set", action="append", default=[], metavar="POLICY.KEY=VALUE",
                        help="a policy setting, e.g. kv_aware.load_weight=0.2 (repeatable)")
    parser.add_argument("--host-kv-gb", type=float, default=None,
                        help="override engine.host_kv_gb: host memory per worker for KV evicted from HBM (0: none)")
    parser.add_argument("--live", action="store_true", help="replay through the live router and workers")
    parser.add_argument("--time-scale", type=positive, default=None, help="--live: override the spec's time scale")
    parser.add_argument("--out", default=None, help="also write compare.json and compare.md here (--live: and "
                                                    "each policy's spec, records and Locust log)")


@dataclass
class Row:
    policy: str
    settings: dict
    summary: Summary
    load_max_over_avg: float


def run(args: argparse.Namespace) -> int:
    try:
        spec = _with_host_tier(_with_workers(load_spec(resolve_spec_path(args.spec)), args.workers), args.host_kv_gb)
        check_spec_settings(spec)
        trace = Path(args.trace) if args.trace else traces.shared_trace()
        if trace is None or not trace.is_file():
            raise FileNotFoundError(f"no trace at {args.trace or '$KVLAB_DATA_DIR/traces'}; pass --trace PATH")
        count = len(traces.read_trace(trace, args.limit))   # a bad file fails here, before any output
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        settings = {p: policy_settings(spec, p, args.prefix_blocks, args.set) for p in policies}
    except (SpecError, FileNotFoundError, ValueError) as exc:
        print(f"kvlab compare: {exc}", file=sys.stderr)
        return 2
    first = f"first {count} requests" if args.limit else f"all {count} requests"
    title = (f"{spec.name}: {len(spec.worker_list())} workers, {trace.name} {first}"
             f"{f' at {args.speedup:g}x' if args.speedup != 1 else ''}, {'live' if args.live else 'simulated'}")
    print(title, flush=True)
    if args.live:
        from loadtests.compare_live import compare_live
        rows = compare_live(spec, trace, settings, args)
    else:
        # one run per policy, each deterministic: side by side on the host's cores (loadtests.parallel_runs)
        rows = parallel_runs.run_all(simulate, [(spec, trace, p, s, args.limit, args.speedup)
                                                for p, s in settings.items()])
    bounds = trace_bounds(spec, trace, args.limit)
    planned = spec_trace_tier_hits(spec, trace, args.limit, args.speedup) if spec.engine.host_kv_gb > 0 else None
    text = table(rows, spec, bounds, planned)
    print(text)
    note = rows and overload_note(min(r.summary.ttft.p50 for r in rows), spec.slo.ttft_p99_s,
                                  "under overload queueing, not cache reuse, decides the table; try --workers "
                                  "or --speedup < 1", min(refused_share(r.summary) for r in rows))
    if note:
        print(note)
    if args.out:
        _write(Path(args.out), title, rows, text, bounds, planned)
    return 0


def _with_workers(spec: ClusterSpec, workers: int | None) -> ClusterSpec:
    if workers is None:
        return spec
    if spec.disaggregated:
        raise ValueError("--workers applies to colocated specs; edit the pools of a disaggregated spec instead")
    pools = [msgspec.structs.replace(spec.pools[0], count=workers)] + list(spec.pools[1:])
    return msgspec.structs.replace(spec, pools=pools)


def _with_host_tier(spec: ClusterSpec, host_kv_gb: float | None) -> ClusterSpec:
    if host_kv_gb is None:
        return spec
    if host_kv_gb < 0:
        raise ValueError(f"--host-kv-gb must be >= 0, got {host_kv_gb:g}")
    return msgspec.structs.replace(spec, engine=msgspec.structs.replace(spec.engine, host_kv_gb=host_kv_gb))


def policy_settings(spec: ClusterSpec, policy: str, prefix_blocks: int | None, overrides: list[str]) -> dict:
    """The settings `policy` gets for a trace replay: the same rule as `kvlab sim --trace`."""
    return sim_policy_settings(spec, policy, trace=True, prefix_blocks=prefix_blocks, overrides=overrides)


def simulate(spec: ClusterSpec, trace: Path, policy: str, settings: dict, limit: int, speedup: float) -> Row:
    return simulate_requests(spec, traces.trace_requests(trace, limit=limit, speedup=speedup), policy, settings)


def simulate_requests(spec: ClusterSpec, requests: Iterable, policy: str, settings: dict) -> Row:
    """Requests (a trace's or a workload's) through the simulator under one policy: one table row."""
    sim = Simulator(spec, policy=policy, settings=settings).run(requests)
    summary = sim.summary(window=whole_run(sim))
    return Row(policy, settings, summary, load_imbalance([w["routed"] for w in summary.workers.values()]))


def whole_run(sim: Simulator) -> tuple[float, float]:
    """The window `kvlab sim` reports over without --warmup: every request, hit rate per request."""
    return 0.0, max((r.arrival for r in sim.log.records.values()), default=0.0) + 1e-9


def trace_bounds(spec: ClusterSpec, trace: Path, limit: int) -> Bounds:
    """The infinite-cache and pooled-LRU hit rates of the same requests, in the simulator's blocks."""
    size = spec.engine.block_size
    def pairs():
        return ((r.prompt_len, r.block_hashes) for r in traces.hashed_requests(trace, limit=limit, block_size=size))
    bounds = hit_rates(pairs(), cluster_kv_blocks(spec), size)
    host = cluster_host_blocks(spec)
    if not host:
        return bounds
    with_host = hit_rates(pairs(), bounds.capacity_blocks + host, size)
    return dataclasses.replace(bounds, pooled_tiered=with_host.pooled_lru, host_blocks=host)


def load_imbalance(loads: list[float]) -> float:
    """Max over mean of the requests each worker served: 1.0 is perfectly even."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean else float("nan")


HEADER = ["policy", "hit %", "% of LRU", "TTFT p50 ms", "TTFT p99 ms", "ITL p99 ms", "goodput/s", "thru/s",
          "max/avg load", "rejected"]


TIER_HEADER = ["HBM hit %", "host hit %"]


def header(tiered: bool) -> list[str]:
    return HEADER[:2] + TIER_HEADER + HEADER[2:] if tiered else HEADER


def cells(row: Row, bound: float, tiered: bool = False) -> list[str]:
    s = row.summary
    ms = lambda v: f"{v * 1000:.0f}" if v == v else "-"  # noqa: E731  (NaN != NaN)
    tiers = [f"{100 * (s.prefix_hit_rate - s.host_hit_rate):.1f}", f"{100 * s.host_hit_rate:.1f}"] if tiered else []
    return [row.policy, f"{100 * s.prefix_hit_rate:.1f}", *tiers, _share(s.prefix_hit_rate, bound),
            ms(s.ttft.p50), ms(s.ttft.p99), ms(s.itl.p99),
            f"{s.goodput_rps:.2f}", f"{s.throughput_rps:.2f}", f"{row.load_max_over_avg:.2f}", str(s.rejected)]


def _share(rate: float, bound: float) -> str:
    return f"{100 * rate / bound:.0f}" if bound > 0 else "-"


def bound_cells(bounds: Bounds, tiered: bool = False) -> list[list[str]]:
    rows = [("bound: infinite cache", bounds.infinite), ("bound: pooled LRU", bounds.pooled_lru)]
    if bounds.pooled_tiered is not None:
        rows.append(("bound: pooled LRU, HBM + host", bounds.pooled_tiered))
    width = len(header(tiered))
    pad = ["", ""] if tiered else []
    return [[name, f"{100 * rate:.1f}", *pad, _share(rate, bounds.pooled_lru)] + [""] * (width - 3 - len(pad))
            for name, rate in rows]


def planned_cells(planned: TierHits, bound: float, width: int) -> list[str]:
    return ["planner: Che, HBM + host", f"{100 * planned.total:.1f}", f"{100 * planned.hbm:.1f}",
            f"{100 * planned.host:.1f}", _share(planned.total, bound)] + [""] * (width - 5)


def table(rows: list[Row], spec: ClusterSpec, bounds: Bounds | None = None, planned: TierHits | None = None) -> str:
    tiered = spec.engine.host_kv_gb > 0
    head = header(tiered)
    body = [cells(r, bounds.pooled_lru if bounds else 0.0, tiered) for r in rows]
    body += bound_cells(bounds, tiered) if bounds else []
    if planned is not None and tiered:
        body.append(planned_cells(planned, bounds.pooled_lru if bounds else 0.0, len(head)))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(row: list[str]) -> str:   # the first column left-aligned, the rest right
        return "  ".join(x.rjust(w) if i else x.ljust(w)
                         for i, (x, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    slo = f"goodput: requests/s meeting p99 TTFT <= {spec.slo.ttft_p99_s:g} s and ITL <= {spec.slo.itl_p99_s:g} s"
    notes = [slo, "hit %: cached / prompt tokens (simulated: per request, as kvlab sim reports it; --live: the "
                  "workers' prefix-cache counters); % of LRU: share of the pooled-LRU bound"]
    if tiered:
        notes.append(f"HBM / host hit %: the part of hit % found in HBM / onboarded from host memory "
                     f"({spec.engine.host_kv_gb:g} GB per worker)")
    if planned is not None and tiered:
        notes.append(f"planner: two-level Che estimate on the trace's reuse times, the workers' caches pooled "
                     f"(emulator/planner/tiered_cache.py); prompt tokens to prefill: {planned.prefill_load:.0%} "
                     f"of those without the host tier")
    if bounds:
        notes.append(f"bounds: the same requests through one cache; pooled LRU holds the cluster's "
                     f"{bounds.capacity_blocks * spec.engine.block_size:,} KV tokens"
                     + (f" (+ {bounds.host_blocks * spec.engine.block_size:,} in host memory)"
                        if bounds.host_blocks else ""))
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body), *notes])


def _write(out: Path, title: str, rows: list[Row], text: str, bounds: Bounds,
           planned: TierHits | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"title": title, "bounds": {"infinite": bounds.infinite, "pooled_lru": bounds.pooled_lru,
                                       "capacity_blocks": bounds.capacity_blocks,
                                       "pooled_tiered": bounds.pooled_tiered, "host_blocks": bounds.host_blocks},
            "planned": None if planned is None else {"hbm": planned.hbm, "host": planned.host},
            "rows": [{"policy": r.policy, "settings": r.settings, "load_max_over_avg": r.load_max_over_avg,
                                      "summary": msgspec.to_builtins(r.summary)} for r in rows]}
    (out / "compare.json").write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2))
    (out / "compare.md").write_text(f"# {title}\n\n```\n{text}\n```\n")
