"""Routers side by side: kvlab against sglang-router, vllm-router and LiteLLM, on one host, in one run.

Every contender routes to the same two stub OpenAI servers (benchmarks/openai_stub.py: they answer at
once, so only the router's cost is timed) and is driven by the same client (router_overhead's). Per rep,
the contenders take turns (the order rotates each rep, so drift hits all alike), and each figure is the
median of the reps:
  - added p50, non-streaming: one request at a time, alternating with the same request sent straight to
    a stub; the router's p50 minus the direct one (max_tokens 1);
  - added TTFT p50, streaming: the same for the first SSE data byte (16 tokens, usage requested);
  - max req/s / direct: a closed loop of many connections, non-streaming, over the same loop against one
    stub directly in the same rep (the client shares the host: a ratio, not an absolute);
  - router CPU per request (user + system of the router's processes, all of them, during the latency
    passes): immune to the other processes' load, unlike the latencies; and the same over the closed
    loop, where a saturated router reads many requests a wake-up (and several processes contend for
    the cores with the client and the stubs).
By default every process runs in Linux's normal scheduling class, where a stub woken by a router's
write preempts the router on its CPU: on a host where the apparatus (the stubs and the client) shares
the cores with the router, that is the largest cost a multi-process router pays. With --apparatus batch
the stubs and the client run in the SCHED_BATCH class instead (a batch task that wakes does not preempt
the one running; the contenders stay normal), which shows each router's own cost at saturation. On
this 2-core host (2026-12-07, one run of 3 reps each way, --skip litellm aiohttp; max req/s and CPU per
request at max req/s, medians):
                                normal apparatus        batch apparatus
  kvlab, 1 process              8,006 req/s, 124 us     7,842 req/s, 127 us
  kvlab, 2 processes            8,082 req/s, 166 us     10,352 req/s, 140 us
  sglang-router 0.3.2           10,316 req/s, 114 us    13,051 req/s,  96 us
  vllm-router 0.1.17            5,084 req/s, 212 us     7,482 req/s, 162 us
(kvlab with 2 processes, perf stat over 4 s of the loop: 0.80 context switches a request with the
apparatus normal, 0.07 batch; 6.0 system calls a request either way.)
kvlab runs as one process and as one per core (--processes), and once more with aiohttp's client in
place of its own HTTP transport (benchmarks/aiohttp_router.py), which is the transport comparison; with
--before, a second kvlab checkout (e.g. main) runs as one more contender in the same run, as one process
(beside "kvlab, 1 process", so the pair compares code, not process counts).

The peers install from PyPI into a throwaway venv (--peers-venv; made when missing), aiohttp into a
--target folder; one that does not install or start is skipped, and the table says so.

Run: .venv/bin/python benchmarks/router_peers.py [--reps 3] [--requests 300] [--seconds 3]
         [--before /tmp/kvlab-main] [--doc docs/perf.md]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
from router_overhead import MODEL, closed_loop, free_port, latency_pass, pct, throughput

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = sys.executable
PEERS = {   # the versions the side-by-side was first measured with
    "sglang-router": ("sglang-router==0.3.2", "sglang-router 0.3.2 cache_aware"),
    "vllm-router": ("vllm-router==0.1.17", "vllm-router 0.1.17"),
    "litellm": ("litellm[proxy]==1.108.7", "LiteLLM 1.108.7"),
}
APPARATUS_NOTE = {"batch": " (SCHED_BATCH: woken, they do not preempt the routers; the module's docstring "
                            "says why)", "normal": ", as the routers"}
LITELLM_KEY = "sk-kvlab-bench-0123456789abcdef"   # LiteLLM refuses to start without a master key
STREAM_TOKENS = 16


def text_body(i: int, stream: bool, max_tokens: int) -> bytes:
    """A ~64-token text prompt, distinct per request (token ids are not every router's input)."""
    prompt = f"request {i}: " + " ".join(f"w{(i * 7 + k) % 997}" for k in range(60))
    payload: dict = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return msgspec.json.encode(payload)


# -- processes -------------------------------------------------------------------------------------
def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process's threads and every live descendant's (Linux /proc/*/task/*/schedstat:
    nanoseconds on a CPU, where /proc/*/stat counts 10 ms ticks)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0]) / 1e9
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue   # exited meanwhile
    return total


def normal_class() -> None:
    """Put this process in the normal scheduling class (a contender, when the apparatus runs in batch)."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@dataclass
class Contender:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    headers: bytes = b""
    proc: subprocess.Popen | None = None
    url: str = ""
    skipped: str | None = None
    runs: list[dict] = field(default_factory=list)

    def start(self, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out, stderr=out,
                                         cwd=self.env.get("KVLAB_BENCH_CWD", str(REPO)), start_new_session=True,
                                         preexec_fn=normal_class)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        headers = dict(line.split(": ", 1) for line in self.headers.decode().splitlines() if line)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode}")
            try:
                r = httpx.post(self.url + "/v1/completions", content=text_body(0, False, 1), timeout=2,
                               headers={"content-type": "application/json", **headers})
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"not answering after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)   # its own session: the router and whatever it started
            self.proc.wait(5)


def _peer_bin(venv: Path, exe: str, spec: str) -> Path:
    """`exe` from the throwaway venv, installing `spec` there first when it is missing."""
    path = venv / "bin" / exe
    if path.exists():
        return path
    if not (venv / "bin" / "pip").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    run = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", spec], capture_output=True, timeout=900)
    if run.returncode != 0 or not path.exists():
        tail = (run.stderr or run.stdout).decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"pip install {spec} failed: {tail[0][:160]}")
    return path


def _aiohttp_path(target: Path) -> str:
    """A folder to put on PYTHONPATH for aiohttp ('' when the project's Python already has it)."""
    try:
        import aiohttp  # noqa: F401
        return ""
    except ImportError:
        pass
    if not (target / "aiohttp").exists():
        run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "aiohttp"],
                             capture_output=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError("pip install aiohttp failed (no package index reachable?)")
    return str(target)


def contenders(args, stubs: list[str], work: Path) -> list[Contender]:
    workers = ",".join(f"s{i}={u}" for i, u in enumerate(stubs))
    kvlab = ["router", "--workers", workers, "--policy", "prefix_bounded", "--kv-events", "off",
             "--log-level", "warning"]
    cores = len(os.sched_getaffinity(0))
    out = []
    if args.before:   # one process, as "kvlab, 1 process": the pair compares code, not process counts
        out.append(Contender(f"kvlab {args.before_label}, 1 process",
                             [PYTHON, "-m", "kvlab.cli", *kvlab, "--processes", "1"],
                             {"PYTHONPATH": args.before, "KVLAB_BENCH_CWD": args.before}))
    here = {"PYTHONPATH": str(REPO)}
    out.append(Contender("kvlab, 1 process", [PYTHON, "-m", "kvlab.cli", *kvlab, "--processes", "1"], here))
    if cores > 1:
        out.append(Contender(f"kvlab, {cores} processes", [PYTHON, "-m", "kvlab.cli", *kvlab, "--processes",
                                                            str(cores)], here))
    aio = Contender("kvlab, 1 process, aiohttp client", [PYTHON, str(HERE / "aiohttp_router.py"), *kvlab[1:]], here)
    try:
        if "aiohttp" in args.skip:
            raise RuntimeError("skipped (--skip)")
        extra = _aiohttp_path(Path(args.aiohttp_target))
        aio.env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), extra) if p)}
    except (RuntimeError, subprocess.SubprocessError) as exc:
        aio.skipped = str(exc)
    out.append(aio)
    out += _peers(args, stubs, work)
    return out


def _peers(args, stubs: list[str], work: Path) -> list[Contender]:
    venv, out = Path(args.peers_venv), []
    config = work / "litellm.yaml"
    config.write_text("model_list:\n" + "".join(
        f"  - model_name: {MODEL}\n    litellm_params: {{model: openai/{MODEL}, api_base: \"{u}/v1\", api_key: x}}\n"
        for u in stubs) + "litellm_settings: {telemetry: false}\n")
    for exe, build in (("sglang-router", lambda b, p: [str(b), "launch", "--worker-urls", *stubs, "--policy",
                                                         "cache_aware", "--prometheus-port", str(p),
                                                         "--log-level", "warn"]),
                       ("vllm-router", lambda b, p: [str(b), "--worker-urls", *stubs, "--prometheus-port", str(p),
                                                       "--log-level", "warning"]),
                       ("litellm", lambda b, p: [str(b), "--config", str(config)])):
        spec, label = PEERS[exe]
        contender = Contender(label, [])
        if exe in args.skip:
            contender.skipped = "skipped (--skip)"
        else:
            try:
                contender.argv = build(_peer_bin(venv, exe, spec), free_port())
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                contender.skipped = f"did not install: {exc}"
        if exe == "litellm":
            contender.env = {"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOG": "ERROR"}
            contender.headers = f"Authorization: Bearer {LITELLM_KEY}\r\n".encode()
        out.append(contender)
    return out


def _with_port(c: Contender, port: int) -> None:
    c.argv = [*c.argv, "--host", "127.0.0.1", "--port", str(port)]


# -- one rep of one contender --------------------------------------------------------------------------
def measure(c: Contender, direct: str, args, direct_rps: float) -> dict:
    assert c.proc is not None
    n = args.requests
    cpu0 = tree_cpu_seconds(c.proc.pid)
    plain = asyncio.run(latency_pass(direct, c.url, n, False, 1, make_body=text_body, headers=c.headers))
    cpu1 = tree_cpu_seconds(c.proc.pid)
    streamed = asyncio.run(latency_pass(direct, c.url, n, True, STREAM_TOKENS, make_body=text_body,
                                        headers=c.headers))
    cpu2 = tree_cpu_seconds(c.proc.pid)
    served, serving_s = closed_loop(c.url, args.client_procs, args.connections, args.seconds, False, 1, text_body,
                                    c.headers)
    cpu3 = tree_cpu_seconds(c.proc.pid)
    rps = served / serving_s
    sent = n + 50   # latency_pass's warm-up requests count for CPU too
    return {"added_ms": (pct(plain["router"][1], 0.5) - pct(plain["direct"][1], 0.5)) * 1e3,
            "added_ttft_ms": (pct(streamed["router"][0], 0.5) - pct(streamed["direct"][0], 0.5)) * 1e3,
            "rps": rps, "rps_ratio": rps / direct_rps,
            "cpu_us": (cpu1 - cpu0) / sent * 1e6, "cpu_stream_us": (cpu2 - cpu1) / sent * 1e6,
            "cpu_loaded_us": (cpu3 - cpu2) / max(1, served) * 1e6}


def median_of(c: Contender, key: str) -> float:
    return statistics.median(r[key] for r in c.runs)


# -- report ----------------------------------------------------------------------------------------
def table(cs: list[Contender]) -> str:
    ran = [c for c in cs if c.runs]
    rows = [("added p50, non-streaming", lambda c: f"{median_of(c, 'added_ms'):+.2f} ms"),
            ("added TTFT p50, streaming", lambda c: f"{median_of(c, 'added_ttft_ms'):+.2f} ms"),
            ("max req/s / direct, non-streaming",
             lambda c: f"{median_of(c, 'rps_ratio'):.3f} ({median_of(c, 'rps'):,.0f} req/s)"),
            ("router CPU per request, non-streaming / streaming",
             lambda c: f"{median_of(c, 'cpu_us'):,.0f} / {median_of(c, 'cpu_stream_us'):,.0f} us"),
            ("router CPU per request at max req/s", lambda c: f"{median_of(c, 'cpu_loaded_us'):,.0f} us")]
    lines = ["| | " + " | ".join(c.name for c in ran) + " |", "|---|" + "---:|" * len(ran)]
    lines += [f"| {label} | " + " | ".join(cell(c) for c in ran) + " |" for label, cell in rows]
    skipped = [f"- {c.name}: {c.skipped}" for c in cs if c.skipped]
    return "\n".join(lines + ([""] + skipped if skipped else []))


def transport_verdict(cs: list[Contender]) -> str:
    own = next((c for c in cs if c.name == "kvlab, 1 process" and c.runs), None)
    aio = next((c for c in cs if c.name.endswith("aiohttp client") and c.runs), None)
    if own is None or aio is None:
        return "Transport: aiohttp's client was not measured (see the skipped contenders)."
    cpu = median_of(aio, "cpu_us") / median_of(own, "cpu_us") - 1
    cpu_s = median_of(aio, "cpu_stream_us") / median_of(own, "cpu_stream_us") - 1
    rps = median_of(aio, "rps") / median_of(own, "rps") - 1
    within = max(cpu, cpu_s) <= 0.10 and rps >= -0.10
    return (f"Transport: with aiohttp's client the router spends {cpu:+.0%} CPU per non-streaming request and "
            f"{cpu_s:+.0%} per streaming one, and serves {rps:+.0%} req/s, against its own transport: "
            + ("within 10%." if within else "not within 10%, so kvlab keeps its own transport "
               "(router.forwarding.transport, with conformance tests in "
               "tests/router/forwarding/test_router_transport.py)."))


def write_doc(path: Path, cs: list[Contender], args, started: str) -> None:
    path.write_text(f"""# Router performance, side by side

Written by `benchmarks/router_peers.py --doc docs/perf.md` (rerun it rather than edit this file).
Measured {started} on a host with {os.cpu_count()} CPUs shared with other work: latencies are noisy,
CPU per request much less so. {args.reps} reps, medians; {args.requests} requests per latency pass; closed loops of
{args.seconds:g} s, {args.connections} connections from {args.client_procs} client process(es). Two stub OpenAI
servers (benchmarks/openai_stub.py) behind every contender; "direct" is the same client against one stub.
Stubs and client in the {args.apparatus} scheduling class{APPARATUS_NOTE[args.apparatus]}.

{table(cs)}

{transport_verdict(cs)}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="requests per latency pass (plus 50 warm-up)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each closed loop")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)))
    parser.add_argument("--before", help="another kvlab checkout to run as one more contender (e.g. main)")
    parser.add_argument("--before-label", default="before")
    parser.add_argument("--peers-venv", default=str(Path(tempfile.gettempdir()) / "kvpeers"))
    parser.add_argument("--aiohttp-target", default=str(Path(tempfile.gettempdir()) / "kvbench-aiohttp"))
    parser.add_argument("--skip", nargs="*", default=[], choices=[*sorted(PEERS), "aiohttp"],
                        help="peers not to run (aiohttp: kvlab with aiohttp's client)")
    parser.add_argument("--apparatus", choices=("normal", "batch"), default="normal",
                        help="scheduling class of the stubs and the client (the module's docstring says why)")
    parser.add_argument("--doc", help="write the table to this markdown file (docs/perf.md)")
    args = parser.parse_args()
    if args.apparatus == "batch":   # inherited by the stubs and the client processes; contenders reset it
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="kvlab-peers-") as tmp:
        work = Path(tmp)
        stubs, stub_procs = [], []
        for _ in range(2):
            port = free_port()
            stub_procs.append(subprocess.Popen([PYTHON, str(HERE / "openai_stub.py"), "--port", str(port)]))
            stubs.append(f"http://127.0.0.1:{port}")
        cs = contenders(args, stubs, work)
        try:
            _start_all(cs, work)
            for rep in range(args.reps):
                direct_rps = throughput(stubs[0], args.client_procs, args.connections, args.seconds, False, 1,
                                        text_body)
                live = [c for c in cs if c.skipped is None]
                for c in live[rep % len(live):] + live[:rep % len(live)]:   # rotate the order each rep
                    c.runs.append(measure(c, stubs[0], args, direct_rps))
                    print(f"rep {rep + 1}: {c.name}: {c.runs[-1]}", flush=True)
        finally:
            for c in cs:
                c.stop()
            for proc in stub_procs:
                proc.terminate()
        print(f"\n{os.cpu_count()} CPUs, shared; {args.reps} reps, medians\n")
        print(table(cs))
        print("\n" + transport_verdict(cs))
        if args.doc:
            write_doc(Path(args.doc), cs, args, started)


def _start_all(cs: list[Contender], work: Path) -> None:
    for c in cs:
        if c.skipped is not None:
            continue
        port = free_port()
        _with_port(c, port)
        try:
            c.start(port, work / f"{c.name.split()[0]}-{port}.log")
            c.wait_ready(120)
        except (RuntimeError, OSError) as exc:
            c.stop()
            log = (work / f"{c.name.split()[0]}-{port}.log").read_text(errors="replace").strip().splitlines()
            c.skipped = f"did not start ({exc}): {log[-1][:160] if log else 'no output'}"
        print(f"{c.name}: {'ready at ' + c.url if c.skipped is None else c.skipped}", flush=True)


if __name__ == "__main__":
    main()
