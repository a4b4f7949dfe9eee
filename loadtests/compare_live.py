"""`kvlab compare --live`: the trace through the real router and workers, one fresh cluster per policy.

A fresh cluster per policy starts every policy with cold caches, as the simulator does. Hit rates and
per-worker load come from the workers' own counters (deltas over the replay), latencies from Locust.
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import httpx
import msgspec

from emulator import traces
from emulator.spec import ClusterSpec
from kvlab.launcher import Cluster
from loadtests.analysis import Window, summarize
from loadtests.locust_run import LocustRun, trace_command
from loadtests.progress import Progress
from loadtests.records import read_records
from loadtests.scrape import Scraper, parse_prometheus
from loadtests.spec_file import write_spec


def compare_live(spec: ClusterSpec, trace: Path, settings: dict[str, dict], args) -> list:
    from loadtests.compare import Row, load_imbalance

    # The processes read specs and write records on disk; without --out that is a folder that goes away.
    with (nullcontext(args.out) if args.out else tempfile.TemporaryDirectory(prefix="kvlab-compare-")) as folder:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for policy, policy_settings in settings.items():
            router = msgspec.structs.replace(spec.router, policy=policy, settings=policy_settings)
            policy_spec = msgspec.structs.replace(spec, router=router)
            path = write_spec(policy_spec, out / f"spec-{policy}.toml")
            summary, served = replay(policy_spec, path, trace, out / policy, args)
            rows.append(Row(policy, policy_settings, summary, load_imbalance(served)))
        return rows


def replay_wall_s(trace: Path, limit: int | None, speedup: float, time_scale: float) -> float:
    """Wall seconds from the first send to the last (what the progress bar counts to)."""
    records = traces.read_trace(trace, limit)
    return (records[-1].timestamp - records[0].timestamp) / 1000 / speedup * time_scale if records else 0.0


def replay(spec: ClusterSpec, spec_path: Path, trace: Path, out: Path, args):
    """One policy: start its cluster, replay the trace with Locust, read the workers' counters."""
    scale = args.time_scale or spec.engine.time_scale
    out.mkdir(parents=True, exist_ok=True)
    with Cluster(spec_path, spec, time_scale=args.time_scale, load_generator=True) as cluster:
        scraper = Scraper(cluster.worker_urls())
        before = _served(cluster.worker_urls())
        scraper.sample_now()
        cmd = trace_command(cluster.url, trace, limit=args.limit, speedup=args.speedup,
                            records=out / "records.jsonl", time_scale=scale, spec=str(spec_path))
        run = LocustRun(cmd, out / "records.jsonl", out / "locust.log").start()
        total = len(traces.read_trace(trace, args.limit))
        progress = Progress(replay_wall_s(trace, args.limit, args.speedup, scale))
        started = time.monotonic()
        while run.running():
            time.sleep(1.0)
            done = len(run.progress()[1])
            progress.update(time.monotonic() - started, f"{spec.router.policy}: {done}/{total} requests")
        run.stop()
        progress.close()
        scraper.sample_now()
        after = _served(cluster.worker_urls())
    _, records = read_records(out / "records.jsonl")
    # The whole replay: from the first send until the last request finished (or was cut short).
    span = max((r["sched"] + r.get("lag", 0.0) + (r.get("e2e") or r.get("waited") or 0.0) for r in records),
               default=0.0) + 1e-9
    summary = summarize(records, Window(0, math.nan, 0.0, span), scale, spec.slo.ttft_p99_s, spec.slo.itl_p99_s)
    window = scraper.window(0.0, math.inf)
    if window.prefix_hit_rate is not None:
        summary.prefix_hit_rate = window.prefix_hit_rate
    return summary, [after[w] - before[w] for w in after]


def _served(urls: dict[str, str]) -> dict[str, float]:
    """Finished requests per worker (vLLM's request_success counter over every finish reason)."""
    return {w: parse_prometheus(httpx.get(f"{u}/metrics", timeout=5).text).get("vllm:request_success", 0.0)
            for w, u in urls.items()}
