"""Prefill and decode utilization as the cluster view reports them, checked against the engine.

Most checks run the pure engine on a virtual clock (closed loop: a finished request is replaced at
once), feed the cluster view the /load fields the worker would report, and compare with what the
engine's steps say. One check goes through a live worker, the router and GET /cluster.
"""
from __future__ import annotations

import random
import time

import httpx
import pytest

from router.observability.cluster_view import ClusterView, LoadSnapshot, Member
from tests.background_load import BackgroundLoad
from tests.router_fixtures import MODEL, start_router  # noqa: F401  (fixture)
from workers.config import build_engine, worker_config
from workers.core.request import SamplingParams

ME = [Member(id="w0")]


class EngineRun:
    """One engine under a closed loop of `concurrency` requests; `make(rng)` -> (prompt, max_tokens)."""

    def __init__(self, make, concurrency: int, seed: int = 0):
        self.engine = build_engine(worker_config(num_blocks=4096))
        self.make = make
        self.rng = random.Random(seed)
        self.view = ClusterView(window_s=1.0)
        self.now = 0.0
        self.prefill_s = self.decode_s = 0.0
        self._next_id = 0
        for _ in range(concurrency):
            self._submit()

    def _submit(self) -> None:
        prompt, max_tokens = self.make(self.rng)
        self.engine.add_request(f"r{self._next_id}", prompt, SamplingParams(max_tokens=max_tokens), self.now)
        self._next_id += 1

    def run(self, seconds: float, sample_every: float = 0.1) -> dict:
        """Run `seconds` of emulated time; returns the view's cluster figures over the last window."""
        end, next_sample = self.now + seconds, self.now
        while self.now < end:
            if self.now >= next_sample:
                self._report()
                next_sample += sample_every
            result = self.engine.step(self.now)
            self.prefill_s += result.prefill_s
            self.decode_s += result.decode_s
            self.now = result.end
            for _ in result.finished:
                self._submit()
        self._report()
        return self.view.view(self.now, ME)["cluster"]

    def _report(self) -> None:
        """What GET /load would say now (time scale 1: wall = emulated)."""
        blocks = self.engine.blocks
        snap = LoadSnapshot(busy_prefill_s=self.prefill_s, busy_decode_s=self.decode_s, emulated_now_s=self.now,
                            kv_usage=blocks.usage, prefix_cache_hits=blocks.prefix_hits,
                            prefix_cache_queries=blocks.prefix_queries)
        self.view.observe_load("w0", self.now, snap)


def unique(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 120_000) for _ in range(n)]


def decode_heavy(rng):
    return unique(rng, 16), 512


def prefill_heavy(rng):
    return unique(rng, 4000), 1


def test_pure_decode_load_is_decode_bound():
    c = EngineRun(decode_heavy, concurrency=32).run(2.0)
    assert c["decode_util"] > 0.9
    assert c["prefill_util"] < 0.02
    assert c["ratio"] < 0.02


def test_pure_long_prompt_load_is_prefill_bound():
    c = EngineRun(prefill_heavy, concurrency=4).run(2.0)
    assert c["prefill_util"] > 0.9
    assert c["decode_util"] < 0.02
    assert c["prefill_share"] > 0.98


def test_view_matches_the_engine_busy_totals():
    run = EngineRun(lambda rng: (unique(rng, rng.choice([16, 2000])), rng.choice([1, 64])), concurrency=8)
    run.view.window_s = 100.0   # one window over the whole run
    c = run.run(1.5)
    assert c["prefill_util"] == pytest.approx(run.prefill_s / run.now, rel=1e-9)
    assert c["decode_util"] == pytest.approx(run.decode_s / run.now, rel=1e-9)
    assert c["ratio"] == pytest.approx(run.prefill_s / run.decode_s, rel=1e-9)


def test_ratio_rises_with_the_share_of_long_prompts():
    def ratio(long_share):
        def make(rng):   # answers of random length, so finishes (and new prefills) do not come in waves
            return (unique(rng, 2000), 1) if rng.random() < long_share else (unique(rng, 16), rng.randrange(16, 256))
        run = EngineRun(make, concurrency=16, seed=1)
        run.view.window_s = 100.0   # the whole run
        return run.run(2.0)["ratio"]

    ratios = [ratio(share) for share in (0.0, 0.1, 0.5, 0.9)]
    assert ratios == sorted(ratios) and ratios[0] < 0.05 < 1 < ratios[-1], ratios


def test_ratio_follows_the_workload_over_time():
    """One engine, the mix switched mid-run: the sliding window tracks the switch."""
    run = EngineRun(lambda rng: (unique(rng, 16), 100), concurrency=16)
    before = run.run(1.5)
    run.make = prefill_heavy
    run.run(1.0)   # drain: the running decodes (100 steps) finish and long prompts replace them
    after = run.run(1.5)
    assert before["prefill_share"] < 0.05 and after["prefill_share"] > 0.9


# -- live: worker -> router /load probe -> GET /cluster ---------------------------------------------
def phase(router_url: str, make, seconds: float) -> dict:
    with BackgroundLoad(router_url, make, concurrency=3):
        time.sleep(seconds)
        return httpx.get(router_url + "/cluster", params={"window": 1.0, "since": 1e9}, trust_env=False).json()


@pytest.mark.solo   # utilization is busy time over wall time
def test_live_cluster_endpoint_tracks_decode_then_prefill_load(start_worker, start_router):
    worker = start_worker(worker_id="w0", time_scale=2.0, num_blocks=2048)
    router = start_router([worker])

    def request(long_prompt: bool):
        def make(i):
            rng = random.Random(i)
            prompt, max_tokens = (unique(rng, 3000), 1) if long_prompt else (unique(rng, 16), 200)
            return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}, {}
        return make

    decode = phase(router.url, request(long_prompt=False), 1.6)["cluster"]
    prefill = phase(router.url, request(long_prompt=True), 1.6)["cluster"]
    assert decode["decode_util"] > 0.5 and decode["prefill_util"] < 0.1 * decode["decode_util"], decode
    assert prefill["prefill_util"] > 0.3 and prefill["prefill_share"] > 0.9, prefill


@pytest.mark.solo   # utilization is busy time over wall time
def test_live_disaggregated_pools_split_the_phases(start_worker, start_router):
    """P/D: the prefill pool's busy time is all prefill, the decode pool's all decode."""
    prefill = start_worker(worker_id="p0", role="prefill", time_scale=2.0, num_blocks=2048)
    workers = [prefill, start_worker(worker_id="d0", role="decode", time_scale=2.0, num_blocks=2048,
                                     peers=[prefill.url])]
    router = start_router(workers, policy="pd_pair", policies={"pd_pair": {"local_prefill_tokens": 0}})

    def make(i):
        return {"model": MODEL, "prompt": unique(random.Random(i), 1500), "max_tokens": 40}, {}

    pools = phase(router.url, make, 1.6)["pools"]
    assert pools["prefill"]["prefill_util"] > 0.1 and pools["prefill"]["decode_util"] == 0, pools
    assert pools["decode"]["decode_util"] > 0.3 and pools["decode"]["prefill_util"] == 0, pools
