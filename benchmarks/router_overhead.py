"""Router overhead: the same request stream sent straight to a worker and through the router, one run.

Prints
  1. router-added latency, p50/p99: requests alternate between the worker and the router (same client,
     same prompts, one at a time: moderate load), and the router's figure minus the direct one is what
     the extra hop costs end to end (non-streaming total; streaming time to first token and total),
     back to back and then paced (a pause before each request, so processes go idle in between);
  2. max requests/s of one router process, non-streaming and streaming (closed loop, many connections;
     the direct figure for one worker is printed beside it);
  3. routing-decision time (tokenize + hash + policy) for 1K, 8K and 32K-token prompts, in process.

Workers run with a tiny time scale (emulated GPU time ~0), so what remains is HTTP and Python: the
router's cost, not the model's. Worker, router and clients are separate processes; on a small host they
share cores, so throughput is "what this host sustains" - the script prints the core count.

Run: .venv/bin/python benchmarks/router_overhead.py [--requests 1000] [--seconds 5] [--client-procs 1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import msgspec
from routing_decision import median_us  # benchmarks/ is on sys.path when run as a script

MODEL = "Llama-3.1-8B"
PYTHON = sys.executable


# -- processes -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): cost that CPU contention does not inflate."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def processes(worker_count: int):
    """(worker URLs, router URL, router pid): near-zero time-scale workers and one router in front."""
    procs, worker_urls = [], []
    try:
        for i in range(worker_count):
            port = free_port()
            procs.append(_spawn(["worker", "--port", str(port), "--worker-id", f"bench-{i}", "--time-scale", "0.0001",
                                 "--max-waiting", "100000", "--log-level", "warning"]))
            worker_urls.append(f"http://127.0.0.1:{port}")
        for url in worker_urls:
            _wait_ready(url)
        port = free_port()
        workers = ",".join(f"bench-{i}={u}" for i, u in enumerate(worker_urls))
        procs.append(_spawn(["router", "--port", str(port), "--workers", workers, "--policy", "prefix_bounded",
                             "--log-level", "warning"]))
        router_url = f"http://127.0.0.1:{port}"
        _wait_ready(router_url)
        yield worker_urls, router_url, procs[-1].pid
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "kvlab.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy")


# -- a minimal keep-alive HTTP/1.1 client (less client overhead than httpx: the router is what we time) --
class Connection:
    def __init__(self, host: str, port: int, headers: bytes = b""):
        self.host, self.port = host, port
        self.headers = headers   # extra header lines, each ending in CRLF (an API key for some routers)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, float, float]:
        """(status, seconds to the first body byte that carries data, seconds to the end)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        started = time.perf_counter()
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n%s"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.headers, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = head.lower()
        if b"transfer-encoding: chunked" in headers:
            first = await self._chunked(started)
        else:
            length = int(headers.split(b"content-length:")[1].split(b"\r\n")[0])
            await self.reader.readexactly(length)
            first = time.perf_counter() - started
        return status, first, time.perf_counter() - started

    async def _chunked(self, started: float) -> float:
        first = None
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if first is None and b"data:" in data:
                first = time.perf_counter() - started
            if size == 0:
                return first if first is not None else time.perf_counter() - started

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def body(i: int, stream: bool, max_tokens: int) -> bytes:
    rng = random.Random(i)
    prompt = [rng.randrange(1000, 100_000) for _ in range(64)]   # 4 blocks, distinct per request
    return msgspec.json.encode({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream})


# -- 1. latency, direct vs through the router ------------------------------------------------------------
async def latency_pass(direct: str, routed: str, n: int, stream: bool, max_tokens: int, gap_s: float = 0.0,
                       make_body=None, headers: bytes = b"") -> dict:
    """Latencies of `n` requests to each target, alternating; `make_body(i, stream, max_tokens)` builds
    request i (default: ``body``), `headers` go to the routed target only."""
    make_body = make_body or body
    a, b = Connection(*_address(direct)), Connection(*_address(routed), headers)
    out = {"direct": ([], []), "router": ([], [])}
    try:
        for i in range(n + 50):
            payload = make_body(i, stream, max_tokens)
            order = ((a, "direct"), (b, "router")) if i % 2 else ((b, "router"), (a, "direct"))
            for conn, label in order:   # alternate who goes first, so drift hits both alike
                if gap_s:
                    await asyncio.sleep(gap_s)
                status, first, total = await conn.post("/v1/completions", payload)
                assert status == 200, status
                if i >= 50:             # the first 50 warm connections, caches and the JIT-less paths
                    out[label][0].append(first)
                    out[label][1].append(total)
    finally:
        a.close()
        b.close()
    return out


def histogram_quantile(url: str, name: str, q: float) -> float:
    """Upper bound of the bucket holding quantile q of a router histogram (from its /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families
    buckets = []
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name + "_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    total = buckets[-1][1]
    return next(bound for bound, count in buckets if count >= q * total)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_report(label: str, res: dict, which: int) -> str:
    d, r = res["direct"][which], res["router"][which]
    cells = []
    for q in (0.5, 0.99):
        cells.append(f"p{int(q * 100)} direct {pct(d, q) * 1e3:6.3f} ms  router {pct(r, q) * 1e3:6.3f} ms  "
                     f"added {(pct(r, q) - pct(d, q)) * 1e3:6.3f} ms")
    return f"  {label:32s}" + "\n  " + " " * 32 + ("\n  " + " " * 32).join(cells)


# -- 2. throughput -----------------------------------------------------------------------------------
async def _closed_loop(url: str, connections: int, seconds: float, stream: bool, max_tokens: int, seed: int,
                       make_body=None, headers: bytes = b"") -> int:
    host, port = _address(url)
    make_body = make_body or body
    deadline = time.perf_counter() + seconds
    done = 0

    async def loop(k: int) -> None:
        nonlocal done
        conn = Connection(host, port, headers)
        i = seed * 1_000_000 + k * 10_000
        try:
            while time.perf_counter() < deadline:
                status, _, _ = await conn.post("/v1/completions", make_body(i, stream, max_tokens))
                if status == 200:
                    done += 1
                i += 1
        finally:
            conn.close()

    await asyncio.gather(*(loop(k) for k in range(connections)))
    return done


def _client_proc(args) -> int:
    url, connections, seconds, stream, max_tokens, seed, *rest = args   # rest: make_body, headers
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_closed_loop(url, connections, seconds, stream, max_tokens, seed, *rest))


def throughput(url: str, procs: int, connections: int, seconds: float, stream: bool, max_tokens: int,
               make_body=None, headers: bytes = b"") -> float:
    served, serving_s = closed_loop(url, procs, connections, seconds, stream, max_tokens, make_body, headers)
    return served / serving_s


def closed_loop(url: str, procs: int, connections: int, seconds: float, stream: bool, max_tokens: int,
                make_body=None, headers: bytes = b"") -> tuple[int, float]:
    """(requests answered, serving seconds) of `connections` closed loops from `procs` client processes."""
    per = max(1, connections // procs)
    with mp.get_context("spawn").Pool(procs) as pool:
        started = time.perf_counter()
        counts = pool.map(_client_proc, [(url, per, seconds, stream, max_tokens, s, make_body, headers)
                                         for s in range(procs)])
        elapsed = time.perf_counter() - started
    return sum(counts), max(seconds, elapsed - 1.0)   # pool start-up (~1 s) is not serving time


# -- 3. routing decision -------------------------------------------------------------------------------
def decision_times(runs: int) -> dict[str, dict[int, float]]:
    """Median microseconds of tokenize + hash + policy for one request, as the router does them."""
    from kvlab.wire.block_hash import block_hashes
    from kvlab.wire.kv_events import BlockStored, KVEventBatch
    from kvlab.wire.openai_api import ChatCompletionRequest, ChatMessage
    from kvlab.wire.tokenizer import BuiltinTokenizer
    from router.frontdoor.tokenize import PromptTokenizer, TokenIdsCompletion
    from router.policies import KvIndex, PolicySet, WorkerView

    tok = PromptTokenizer(BuiltinTokenizer(), 16)
    first_sight = PromptTokenizer(BuiltinTokenizer(), 16, hash_memo_runs=0)   # hashes every block it reads
    views = [WorkerView(f"w{i}", in_flight=i % 3) for i in range(8)]
    rng = random.Random(0)
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
             "et dolore magna aliqua").split()
    results: dict[str, dict[int, float]] = {}
    for n in (1024, 8192, 32768):
        ids = [rng.randrange(1024, 120_000) for _ in range(n)]
        text = " ".join(rng.choice(words) for _ in range(int(n / 1.6)))   # ~n built-in tokens
        ids_req = TokenIdsCompletion(model=MODEL, prompt=ids)   # as the router decodes token-id prompts
        chat_req = ChatCompletionRequest(model=MODEL, messages=[ChatMessage(role="system", content=text),
                                                                ChatMessage(role="user", content="Hi")])
        chat_ids = tok.chat(chat_req)
        index = KvIndex()   # w3 holds the first half of both prompts
        for prompt in (ids, chat_ids):
            index.apply("w3", KVEventBatch(0.0, [BlockStored(block_hashes(prompt[: len(prompt) // 2]), None, [], 16)]))
        policies = {name: PolicySet(name, index=index) for name in ("prefix_bounded", "kv_aware")}
        for name in policies.values():
            for v in views:
                name.add_worker(v.id)
        cases = _cases(tok, first_sight, ids_req, chat_req, policies, views)
        for label, fn in cases.items():
            results.setdefault(label, {})[n] = median_us(fn, runs if "cold" not in label else max(5, runs // 20))
    return results


def _cases(tok, first_sight, ids_req, chat_req, policies, views) -> dict:
    """One size's decisions to time, each a closure over this call's prompts and policies."""
    from kvlab.wire.tokenizer import BuiltinTokenizer
    from router.frontdoor.tokenize import PromptTokenizer

    return {
        "token ids -> prefix_bounded": lambda: _decide(tok, tok.completion(ids_req), policies["prefix_bounded"], views),
        "token ids -> kv_aware (half cached)": lambda: _decide(tok, tok.completion(ids_req), policies["kv_aware"],
                                                               views),
        "  same, prompt never seen (no hash memo)": lambda: _decide(first_sight, first_sight.completion(ids_req),
                                                                    policies["kv_aware"], views),
        "chat text, system prompt seen -> prefix_bounded": lambda: _decide(tok, tok.chat(chat_req),
                                                                            policies["prefix_bounded"], views),
        "chat text, system prompt seen -> kv_aware (half cached)": lambda: _decide(tok, tok.chat(chat_req),
                                                                                    policies["kv_aware"], views),
        "chat text, cold tokenizer -> prefix_bounded": lambda: _decide(PromptTokenizer(BuiltinTokenizer(), 16),
                                                                       None, policies["prefix_bounded"], views,
                                                                       chat_req),
    }


def _decide(tok, tokens, policies, views, chat_req=None):
    if tokens is None:
        tokens = tok.chat(chat_req)
    return policies.choose(tok.route_request(tokens, None, None), views)


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per target in the latency pass")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    parser.add_argument("--connections", type=int, default=64, help="client connections in the throughput runs")
    parser.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)))
    parser.add_argument("--workers", type=int, default=2, help="worker processes behind the router")
    parser.add_argument("--stream-tokens", type=int, default=16, help="max_tokens of the streaming requests")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="pause before each request in the paced pass")
    parser.add_argument("--decision-runs", type=int, default=200)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    report: dict = {"cpus": os.cpu_count()}
    print(f"host: {os.cpu_count()} CPUs; worker(s), router and clients are separate processes")
    with processes(args.workers) as (workers, router, router_pid):
        print(f"\n1. router-added latency, {args.requests} requests per target, one at a time (64-token prompts)")
        cpu = cpu_seconds(router_pid)
        plain = asyncio.run(latency_pass(workers[0], router, args.requests, False, 1))
        cpu_plain = (cpu_seconds(router_pid) - cpu) / (args.requests + 50)
        print(latency_report("non-streaming, max_tokens=1 (total)", plain, 1))
        cpu = cpu_seconds(router_pid)
        streamed = asyncio.run(latency_pass(workers[0], router, args.requests, True, args.stream_tokens))
        cpu_stream = (cpu_seconds(router_pid) - cpu) / (args.requests + 50)
        print(latency_report(f"streaming, {args.stream_tokens} tokens (first token)", streamed, 0))
        print(latency_report(f"streaming, {args.stream_tokens} tokens (total)", streamed, 1))
        gap = args.gap_ms / 1e3
        paced_plain = asyncio.run(latency_pass(workers[0], router, args.requests // 2, False, 1, gap))
        print(latency_report(f"non-streaming, {args.gap_ms:g} ms pause before each", paced_plain, 1))
        paced = asyncio.run(latency_pass(workers[0], router, args.requests // 2, True, args.stream_tokens, gap))
        print(latency_report(f"streaming first token, {args.gap_ms:g} ms pause", paced, 0))
        print("  (a pause lets idle processes sleep: each process hop then pays the host's wake-up latency,\n"
              "   which shows in the direct figure too; the router adds two hops)")
        inside = {q: histogram_quantile(router, "kvlab_router_added_latency_seconds", q) for q in (0.5, 0.99)}
        print(f"  router's own histogram, handler start -> upstream send: p50 <= {inside[0.5] * 1e6:.0f} us, "
              f"p99 <= {inside[0.99] * 1e6:.0f} us (bucket bounds)")
        report["router_histogram_added_s"] = inside
        print(f"  router CPU per request (user + system, immune to other processes' load): "
              f"non-streaming {cpu_plain * 1e6:.0f} us, "
              f"streaming {args.stream_tokens} tokens {cpu_stream * 1e6:.0f} us")
        report["router_cpu_us_per_request"] = {"non_streaming": cpu_plain * 1e6, "streaming": cpu_stream * 1e6}
        report["latency"] = {name: {target: {"p50": pct(v[which], 0.5), "p99": pct(v[which], 0.99)}
                                    for target, v in res.items()}
                             for name, res, which in (("non_streaming", plain, 1), ("stream_ttft", streamed, 0),
                                                      ("stream_total", streamed, 1),
                                                      ("non_streaming_paced", paced_plain, 1),
                                                      ("stream_ttft_paced", paced, 0))}
        print(f"\n2. max requests/s, closed loop, {args.connections} connections from {args.client_procs} "
              f"client process(es), {args.workers} worker(s) behind the router")
        report["throughput"] = {}
        for label, stream, tokens in (("non-streaming, max_tokens=1", False, 1),
                                      (f"streaming, {args.stream_tokens} tokens", True, args.stream_tokens)):
            direct = throughput(workers[0], args.client_procs, args.connections, args.seconds, stream, tokens)
            routed = throughput(router, args.client_procs, args.connections, args.seconds, stream, tokens)
            print(f"  {label:32s} one worker direct {direct:8.0f} req/s   router {routed:8.0f} req/s")
            report["throughput"][label] = {"direct_one_worker": direct, "router": routed}
    print("\n3. routing decision (tokenize + hash + policy), median us, 8 workers")
    decisions = decision_times(args.decision_runs)
    print(f"  {'':56s}{'1K':>10s}{'8K':>10s}{'32K':>10s}")
    for label, row in decisions.items():
        print(f"  {label:56s}" + "".join(f"{row[n]:10.1f}" for n in (1024, 8192, 32768)))
    report["decision_us"] = decisions
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
