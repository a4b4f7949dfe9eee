"""Host cost per emulated output token: CPU microseconds that the router, the workers and the load
generator spend for every token the emulated cluster streams, under a live open-loop load.

The figure decides how slow a time scale a host can afford: a cluster streaming T tokens per
emulated second at time scale s costs T / s x (this figure) CPU seconds per wall second, which must
stay well below the host's free cores (`kvlab sweep` reads `HOST_BUDGET` from here).

What runs: the spec's cluster (`kvlab up`'s launcher, one process per worker and the router, on ports
moved out of the way), then `loadtests/open_loop.py` in a Locust subprocess at `--rate` for
`--seconds`. CPU (user + system, from /proc: contention does not inflate it) of every process and
the workers' `vllm:generation_tokens` counters are read after `--warmup` seconds and again at the end;
the difference is the figure. Prints one line per process and the total.

Run: .venv/bin/python benchmarks/host_cost.py [--spec default] [--rate 30] [--time-scale 10]
     [--stream-interval 1] [--seconds 30] [--http-client fast|httpx]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.spec import load_spec, resolve_spec_path  # noqa: E402
from kvlab.launcher import Cluster  # noqa: E402
from loadtests.locust_run import LocustRun, command  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tokens(urls) -> float:
    total = 0.0
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        total += sum(float(v) for v in re.findall(r"^vllm:generation_tokens_total(?:\{[^}]*\})? (\S+)", text, re.M))
    return total


def moved_spec(path: Path, port: int, time_scale: float | None, stream_interval: int | None, out: Path) -> Path:
    """The spec with its router on `port` and workers after it (a running cluster keeps its ports)."""
    text = path.read_text()
    text = re.sub(r"(?m)^port\s*=.*$", f"port = {port}", text)
    text = re.sub(r"(?m)^base_port\s*=.*$", "", text)
    text = text.replace("[[pools]]", f"[[pools]]\nbase_port = {port + 1}", 1)
    engine = []
    if time_scale is not None:
        text = re.sub(r"(?m)^time_scale\s*=.*$", "", text)
        engine.append(f"time_scale = {time_scale}")
    if stream_interval is not None:
        text = re.sub(r"(?m)^stream_interval\s*=.*$", "", text)
        engine.append(f"stream_interval = {stream_interval}")
    if engine:
        text = text.replace("[engine]", "[engine]\n" + "\n".join(engine), 1)
    out.write_text(text)
    return out


def measure(args) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="kvlab-host-cost-"))
    spec_path = moved_spec(resolve_spec_path(args.spec), args.port, args.time_scale, args.stream_interval,
                           work / "spec.toml")
    spec = load_spec(spec_path)
    scale = spec.engine.time_scale
    with Cluster(spec_path, spec) as cluster:
        workers = list(cluster.worker_urls().values())
        cmd = command(cluster.url, [(args.rate, args.seconds + 30)], records=work / "records.jsonl",
                      time_scale=scale, measured_until=args.seconds + 30, spec=str(spec_path),
                      run_time_s=args.seconds + 40)
        cmd += ["--http-client", args.http_client]
        run = LocustRun(cmd, work / "records.jsonl", work / "locust.log").start()
        pids = {name: proc.pid for name, proc in cluster.procs} | {"locust (client)": run.proc.pid}
        time.sleep(args.warmup)
        cpu0, tok0, t0 = {n: cpu_seconds(p) for n, p in pids.items()}, tokens(workers), time.monotonic()
        time.sleep(args.seconds)
        cpu1, tok1, wall = {n: cpu_seconds(p) for n, p in pids.items()}, tokens(workers), time.monotonic() - t0
        lag = max(httpx.get(f"{u}/load").json()["lag_p99_s"] for u in workers)
        run.stop()
    emitted = tok1 - tok0
    print(f"spec {spec.name}: rate {args.rate:g} req/s (emulated), time scale {scale:g}, stream interval "
          f"{getattr(spec.engine, 'stream_interval', 1)}, {wall:.0f} wall s, {emitted:.0f} output tokens "
          f"({emitted / wall:.0f}/wall s), worker lag p99 {lag * 1000:.1f} ms, {os.cpu_count()} cores")
    cost = {}
    for name in pids:
        cost[name] = (cpu1[name] - cpu0[name]) / max(emitted, 1) * 1e6
        print(f"  {name:<18} {cost[name]:8.1f} CPU us/token  ({(cpu1[name] - cpu0[name]) / wall:.2f} cores)")
    total = sum(cost.values())
    print(f"  {'total':<18} {total:8.1f} CPU us/token  ({total * emitted / wall / 1e6:.2f} cores)")
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="default")
    parser.add_argument("--rate", type=float, default=30.0, help="offered requests per emulated second")
    parser.add_argument("--time-scale", type=float, default=None, help="default: the spec's")
    parser.add_argument("--stream-interval", type=int, default=None, help="tokens per SSE chunk (default: the spec's)")
    parser.add_argument("--seconds", type=float, default=30.0, help="wall seconds measured")
    parser.add_argument("--warmup", type=float, default=10.0, help="wall seconds before measuring")
    parser.add_argument("--port", type=int, default=18700, help="router port; workers take the next ones")
    parser.add_argument("--http-client", default="fast", choices=["fast", "httpx"],
                        help="the load generator's client: geventhttpclient (Locust's FastHttpUser) or httpx")
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
