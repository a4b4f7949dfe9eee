"""The dashboard at a light and a heavy load: screenshots and the headroom figures behind them.

Starts the spec's cluster, drives it open-loop with Locust at each fraction of the planner's C_max, and
after a ramp (long enough for the running batch to settle) saves a headless-Chromium screenshot of
/dashboard and prints what /cluster shows: decode busy time, decode batch occupancy, MBU, MFU, the prefix
hit rate, TTFT and the workers' step lag (a lagging host makes every figure suspect). Needs /usr/bin/chromium.
Run as a module from the repository's root: it borrows the tests' headless-Chromium driver.

    .venv/bin/python -m benchmarks.dashboard_load_levels --out shots [--spec default] [--loads 0.1 0.9]
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec

from emulator.spec import load_spec, resolve_spec_path
from kvlab.launcher import Cluster
from loadtests.locust_run import OPEN_LOOP, base_command
from loadtests.spec_file import write_spec
from tests.headless_chromium import Browser


def c_max(spec: str) -> float:
    out = subprocess.run([sys.executable, "-m", "kvlab.cli", "plan", "--spec", spec, "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["capacity"]["max_rate"]


def figures(url: str) -> dict:
    view = httpx.get(f"{url}/cluster", timeout=10).json()
    c, lat = view["cluster"], view["latency"]
    keys = ("decode_util", "prefill_util", "decode_occupancy", "decode_batch", "mbu", "mfu", "hit_rate", "kv_usage",
            "running", "lag_p99_s")
    return {**{k: c.get(k) for k in keys}, "ttft_p50_s": lat["ttft"]["p50"], "ttft_p99_s": lat["ttft"]["p99"]}


def on_free_ports(spec_name: str, folder: Path):
    """The spec moved to ports nobody holds (a shared host may run other clusters): (path, spec)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        base = sock.getsockname()[1]
    spec = load_spec(resolve_spec_path(spec_name))
    pools = [msgspec.structs.replace(p, base_port=None) for p in spec.pools]
    pools[0] = msgspec.structs.replace(pools[0], base_port=base + 1)
    spec = msgspec.structs.replace(spec, pools=pools, router=msgspec.structs.replace(spec.router, port=base))
    path = write_spec(spec, folder / "spec.toml")
    return path, load_spec(path)


def one_level(spec_name: str, load: float, rate: float, args, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path, spec = on_free_ports(spec_name, Path(tmp))
        with Cluster(path, spec, time_scale=args.time_scale) as cluster:
            return drive(cluster, path, load, rate, args, out, Path(tmp))


def drive(cluster: Cluster, path: Path, load: float, rate: float, args, out: Path, tmp: Path) -> dict:
    cmd = base_command(OPEN_LOOP, cluster.url, records=tmp / "records.jsonl", time_scale=args.time_scale,
                       spec=str(path), run_time_s=args.ramp_s + args.settle_s + 30)
    locust = subprocess.Popen(cmd + ["--rate", f"{rate:g}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(args.ramp_s)
        with Browser(tmp / "chromium") as browser:
            browser.navigate(f"{cluster.url}/dashboard")
            time.sleep(args.settle_s)   # the page's charts fill from its own polls
            shot = out / f"dashboard-{round(100 * load)}pct.png"
            browser.screenshot(shot)
        seen = figures(cluster.url)
    finally:
        locust.terminate()
        locust.wait(30)
    return {"load": load, "rate": rate, "screenshot": str(shot), **seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="default")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.1, 0.9], help="fractions of C_max")
    parser.add_argument("--time-scale", type=float, default=20.0, help="wall seconds per emulated second")
    parser.add_argument("--ramp-s", type=float, default=90.0, help="wall seconds of load before the screenshot")
    parser.add_argument("--settle-s", type=float, default=15.0, help="wall seconds the page polls before it")
    parser.add_argument("--out", default="test-artifacts/dashboard-levels")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmax = c_max(args.spec)
    print(f"{args.spec}: planner C_max {cmax:.1f} req/s (emulated), time scale {args.time_scale:g}")
    for load in args.loads:
        row = one_level(args.spec, load, load * cmax, args, out)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
