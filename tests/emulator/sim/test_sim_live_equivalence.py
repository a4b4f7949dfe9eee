"""One model, two clocks: the same requests through the live cluster (HTTP, real time) and through the
simulator (virtual time) give the same latencies and the same prefix-hit rate.

The live cluster is the `tiny-test` spec started by `kvlab up`'s launcher (one process per worker and
the router) at time scale 3; requests are sent open loop at their scheduled times as token-id prompts
and streamed; latencies are divided by the time scale to get emulated seconds.
"""
from __future__ import annotations

import asyncio
import re
import statistics
import time

import httpx
import msgspec
import pytest

from emulator import workload
from emulator.sim.simulator import Simulator
from emulator.spec import load_spec, parse_spec
from kvlab.launcher import Cluster
from tests.conftest import tiny_test_on_free_ports

# Physics must dominate what is measured: HTTP and the router add a few wall milliseconds per request
# that the emulated GPU does not, so prompts carry ~1k uncached tokens (tens of ms of prefill) and the
# time scale divides the transport's share down further.
TIME_SCALE = 3.0
RATE = 10.0            # requests per emulated second
COUNT = 100


def _requests():
    reqs = workload.generate(RATE, num_requests=COUNT, mix={"chat": 1.0}, seed=11,
                             params={"chat": {"unique_len": {"median": 1000, "sigma": 0.3},
                                              "output_len": {"median": 24, "sigma": 0.3, "high": 48}}})
    return reqs


async def _one(client: httpx.AsyncClient, url: str, model: str, req, t0: float, out: dict) -> None:
    await asyncio.sleep(max(0.0, t0 + req.arrival_s * TIME_SCALE - time.monotonic()))
    sent = time.monotonic()
    body = {"model": model, "prompt": req.tokens.tolist(), "max_tokens": req.max_tokens, "stream": True,
            "ignore_eos": True}
    times = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if msgspec.json.decode(line[6:])["choices"]:
                    times.append(time.monotonic())
    out[req.request_id] = (sent, times)


async def _drive(url: str, model: str, reqs) -> dict:
    out: dict = {}
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        t0 = time.monotonic() + 0.2
        await asyncio.gather(*(_one(client, url, model, r, t0, out) for r in reqs))
    return out


def _hit_rate(urls) -> float:
    hits = queries = 0.0
    for url in urls:
        text = httpx.get(f"{url}/metrics").text
        hits += sum(float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)", text, re.M))
        queries += sum(float(v) for v in re.findall(r"^vllm:prefix_cache_queries_total\{[^}]*\} (\S+)", text, re.M))
    return hits / queries


@pytest.mark.slow
@pytest.mark.solo   # a live cluster on a scaled wall clock: alone, not beside a CPU-bound test
def test_live_cluster_and_simulator_agree(tmp_path):
    text = tiny_test_on_free_ports(TIME_SCALE)[0]
    spec_path = tmp_path / "equivalence.toml"
    spec_path.write_text(text)
    spec = load_spec(spec_path)
    reqs = _requests()
    with Cluster(spec_path, spec) as cluster:
        live = asyncio.run(_drive(cluster.url, spec.model, reqs))
        live_hits = _hit_rate(cluster.worker_urls().values())
    ttft_live = [(times[0] - sent) / TIME_SCALE for sent, times in live.values()]
    itl_live = [(b - a) / TIME_SCALE for _, times in live.values() for a, b in zip(times, times[1:], strict=False)]

    sim = Simulator(parse_spec(text)).run(reqs)
    s = sim.summary()
    assert s.completed == len(live) == COUNT
    ttft_sim, itl_sim = s.ttft.p50, s.itl.p50
    print(f"TTFT p50 live {statistics.median(ttft_live):.5f} sim {ttft_sim:.5f}; ITL p50 live "
          f"{statistics.median(itl_live):.5f} sim {itl_sim:.5f}; "
          f"hit rate live {live_hits:.3f} sim {s.prefix_hit_rate:.3f}")
    assert statistics.median(ttft_live) == _within(ttft_sim, 0.10)
    assert statistics.median(itl_live) == _within(itl_sim, 0.10)
    assert abs(live_hits - s.prefix_hit_rate) <= 0.05


class _within:
    def __init__(self, target: float, rel: float):
        self.target, self.rel = target, rel

    def __eq__(self, value) -> bool:
        return abs(value - self.target) <= self.rel * self.target

    def __repr__(self) -> str:
        return f"{self.target:.6f} +- {self.rel:.0%}"
