"""`kvlab sim`: a workload or a trace through the discrete-event simulator, printed as a table."""
from __future__ import annotations

import argparse
import sys
import time

import msgspec

from emulator import traces, workload
from emulator.sim.policy_settings import policy_settings
from emulator.sim.report import Summary, overload_note, refused_share
from emulator.sim.simulator import Simulator
from emulator.spec import SpecError, load_spec, resolve_spec_path
from kvlab.wire.user_errors import count_or_all, non_negative, positive, positive_int
from router.policies.registry import check_spec_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default="default", help="cluster spec file or bundled example name")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--rate", type=positive, help="synthetic arrivals per second (the spec's [workload] mix)")
    source.add_argument("--trace", help="a Mooncake-style JSONL trace to replay instead")
    parser.add_argument("--requests", type=positive_int, default=None, help="number of synthetic requests")
    parser.add_argument("--duration", type=positive, default=None, help="seconds of synthetic arrivals")
    parser.add_argument("--speedup", type=positive, default=1.0, help="divide trace timestamps by this")
    parser.add_argument("--limit", type=count_or_all, default=None,
                        help="replay only the first N trace requests (0 or 'all': the whole trace)")
    parser.add_argument("--policy", default=None, help="routing policy (default: the spec's)")
    parser.add_argument("--warmup", type=non_negative, default=0.0, help="exclude requests arriving before this (s)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(resolve_spec_path(args.spec))
        check_spec_settings(spec)
    except (SpecError, FileNotFoundError) as exc:
        print(f"kvlab sim: {exc}", file=sys.stderr)
        return 2
    requests = _requests(spec, args)
    policy = args.policy or spec.router.policy
    # A trace is keyed on its own blocks, as `kvlab compare` keys it (emulator/sim/policy_settings.py).
    settings = policy_settings(spec, policy, trace=bool(args.trace))
    started = time.process_time()
    sim = Simulator(spec, policy=policy, settings=settings).run(requests)
    cpu = time.process_time() - started
    last_arrival = max((r.arrival_s for r in requests), default=0.0)
    summary = sim.summary(window=(args.warmup, last_arrival + 1e-9))
    step_model = spec.catalog_data().gpu(spec.gpu).calibration_note
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(summary)).decode())
        print(step_model, file=sys.stderr)
    else:
        print(format_summary(summary, title=f"{spec.name}: {len(requests)} requests, policy "
                                                f"{policy}"))
        print(step_model)
        print(f"simulated {sim.now:.1f} s in {cpu:.1f} CPU s ({sim.now / max(cpu, 1e-9):.0f}x real time)")
    note = overload_note(summary.ttft.p50, spec.slo.ttft_p99_s, "try a lower --rate, a --speedup below 1 or a "
                                                                 "spec with more workers", refused_share(summary))
    if note:
        print(note, file=sys.stderr)
    return 0


def _requests(spec, args) -> list:
    if args.trace:
        return list(traces.trace_requests(args.trace, speedup=args.speedup, limit=args.limit))
    rate = args.rate if args.rate is not None else (spec.workload.rates[0] if spec.workload.rates else 1.0)
    return workload.from_spec(spec, rate, num_requests=args.requests, duration_s=args.duration)


def format_summary(s: Summary, title: str = "") -> str:
    ms = lambda v: f"{v * 1000:8.1f}"  # noqa: E731
    rows = [title, "-" * max(len(title), 60),
            f"requests {s.requests}  completed {s.completed}  rejected {s.rejected}  preemptions {s.preemptions}",
            f"throughput {s.throughput_rps:.2f} req/s  {s.output_tokens_per_s:.0f} output tok/s",
            f"goodput {s.goodput_rps:.2f} req/s  SLO attainment {s.slo_attainment:.1%}  "
            f"prefix hit rate {s.prefix_hit_rate:.1%}"
            + (f" ({s.host_hit_rate:.1%} from host memory)" if s.host_hit_rate else ""),
            "            p50 ms   p90 ms   p99 ms",
            f"TTFT      {ms(s.ttft.p50)} {ms(s.ttft.p90)} {ms(s.ttft.p99)}",
            f"ITL       {ms(s.itl.p50)} {ms(s.itl.p90)} {ms(s.itl.p99)}",
            f"E2E       {ms(s.e2e.p50)} {ms(s.e2e.p90)} {ms(s.e2e.p99)}",
            "worker        role     routed  prefill busy  decode busy  KV usage  preempt"]
    for wid, w in s.workers.items():
        rows.append(f"{wid:<13} {w['role']:<8} {w['routed']:>6}  {w['prefill_busy']:>11.1%}  "
                    f"{w['decode_busy']:>10.1%}  {w['kv_usage_mean']:>8.1%}  {w['preemptions']:>7}")
    return "\n".join(rows)
