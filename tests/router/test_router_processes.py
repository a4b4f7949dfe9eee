"""Several router processes on one port (`kvlab router --processes 2`) against stub workers: bounded
loads, tenant limits, metrics and /cluster hold across the processes (router.shared_state)."""
from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from router.frontdoor.tenants import TenantConfig
from router.shared_state import ProcessShare
from tests.conftest import free_port

MODEL = "Llama-3.1-8B"
PROMPT = [7] * 64   # one prompt for every request: one ring key, so only the load cap spreads them


class StubWorker:
    """An OpenAI completions server that holds every request until `opened` is set."""

    def __init__(self, opened: threading.Event):
        self.opened = opened
        self.active = 0
        self.served = 0
        self.lock = threading.Lock()
        self.app = Starlette(routes=[Route("/load", self.load), Route("/v1/models", self.models),
                                     Route("/v1/completions", self.complete, methods=["POST"])])

    async def load(self, request: Request) -> JSONResponse:
        return JSONResponse({"running": self.active, "waiting": 0, "kv_usage": 0.0})

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def complete(self, request: Request) -> JSONResponse:
        await request.body()
        with self.lock:
            self.active += 1
            self.served += 1
        try:
            while not self.opened.is_set():
                await asyncio.sleep(0.01)
        finally:
            with self.lock:
                self.active -= 1
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL,
                             "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 64, "completion_tokens": 1, "total_tokens": 65}})


def _wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Routers:
    """`kvlab router --processes N` as a child process, and the ids of the processes that answered."""

    def __init__(self, tmp_path, stubs: list, processes: int = 2, **fields):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workers = [{"url": s.url, "id": f"w{i}"} for i, s in enumerate(stubs)]
        config = {"workers": workers, "kv_events": "off", "health": {"interval_s": 0.2, "failures_to_remove": 1},
                  **fields}
        path = tmp_path / "router.json"
        path.write_text(json.dumps(config))
        self.proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "router", "--config", str(path), "--port",
                                      str(self.port), "--processes", str(processes), "--log-level", "warning"])
        self.ids: set[str] = set()
        _wait_for(lambda: self._health_ids() >= processes, 60, f"{processes} router processes to answer /health")

    def _health_ids(self) -> int:
        assert self.proc.poll() is None, "the router exited"
        try:
            r = httpx.get(self.url + "/health", timeout=2)   # a new connection each time: any process may answer
        except httpx.HTTPError:
            return 0
        if r.status_code == 200 and r.json()["workers_up"] == r.json()["workers"]:
            self.ids.add(r.headers["x-kvlab-router-id"])
        return len(self.ids)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def cluster(serve, tmp_path):
    made: list[Routers] = []
    opened = threading.Event()

    def _start(worker_count: int = 2, **fields):
        stubs = [StubWorker(opened) for _ in range(worker_count)]
        for stub in stubs:
            stub.url = serve(stub.app).url
        routers = Routers(tmp_path, stubs, **fields)
        made.append(routers)
        return routers, stubs

    yield _start, opened
    opened.set()
    for routers in made:
        routers.stop()


def _post(url: str, headers: dict | None = None) -> int:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30).status_code


def _metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_bounded_loads_hold_across_two_processes(cluster):
    """One prompt (one ring owner), eps 0, slack 0: each placement sees the other process's requests,
    so held requests spread as one process would spread them (at most ceil(total / 2) on a worker)."""
    start, opened = cluster
    routers, stubs = start(policy="prefix_bounded", policies={"prefix_bounded": {"eps": 0.0, "slack": 0}})
    pool = ThreadPoolExecutor(16)
    answers = []
    for k in range(1, 13):   # one at a time, each on a new connection: the kernel spreads them over the processes
        answers.append(pool.submit(_post, routers.url))
        _wait_for(lambda k=k: sum(s.active for s in stubs) == k, what=f"{k} requests held")
        assert max(s.active for s in stubs) <= math.ceil(k / 2), [s.active for s in stubs]
    cluster_view = httpx.get(routers.url + "/cluster", timeout=5).json()   # whichever process answers
    assert cluster_view["cluster"]["in_flight"] == 12
    opened.set()
    assert [a.result() for a in answers] == [200] * 12
    pool.shutdown()
    _wait_for(lambda: _metric(routers.url, "kvlab_router_requests_total", endpoint="completions", status="200") == 12,
              what="every process's requests in /metrics")
    assert _metric(routers.url, "kvlab_router_decisions_total") == 12
    assert _metric(routers.url, "kvlab_router_in_flight") == 0


def test_a_tenants_request_burst_holds_exactly_across_processes(cluster):
    start, opened = cluster
    opened.set()
    tenant = {"name": "t", "api_keys": ["key-t"], "requests_per_s": 0.001, "requests_burst": 4}
    routers, _ = start(tenants=[tenant])
    statuses = [_post(routers.url, {"authorization": "Bearer key-t"}) for _ in range(12)]
    assert statuses.count(200) == 4 and statuses.count(429) == 8, statuses
    assert _metric(routers.url, "kvlab_router_rejections_total", reason="requests_per_s", tenant="t") == 8


def test_a_tenants_concurrency_cap_holds_exactly_across_processes(cluster):
    start, opened = cluster
    tenant = {"name": "c", "api_keys": ["key-c"], "max_concurrency": 3}
    routers, stubs = start(tenants=[tenant])
    with ThreadPoolExecutor(10) as pool:
        answers = [pool.submit(_post, routers.url, {"authorization": "Bearer key-c"}) for _ in range(10)]
        _wait_for(lambda: sum(a.done() for a in answers) == 7, what="the requests over the cap refused")
        assert sum(s.active for s in stubs) == 3
        opened.set()
        statuses = [a.result() for a in answers]
    assert statuses.count(200) == 3 and statuses.count(429) == 7, statuses


def test_membership_is_fixed_and_the_admin_api_says_so(cluster):
    start, opened = cluster
    opened.set()
    routers, _ = start(admin_token="secret")
    answer = httpx.post(routers.url + "/admin/workers", json={"url": "http://127.0.0.1:9", "id": "w9"},
                        headers={"authorization": "Bearer secret"}, timeout=5)
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "membership_fixed"


# -- the share itself, in one process -------------------------------------------------------------
def test_a_share_sums_every_process_row_and_forgets_a_dead_one():
    share = ProcessShare(3, ["a", "b"], [])
    for index, delta in ((0, 2), (1, 3), (2, 1)):
        share.joined(index).add(1, delta)
    assert share.total(share.worker_slot("b")) == 6 and share.total(share.worker_slot("a")) == 0
    share.clear(1)
    assert share.total(share.worker_slot("b")) == 3
    share.remove()


def test_shared_tenant_tables_are_one_table():
    """Two tables over one share (as two processes hold them) admit what one table would."""
    config = TenantConfig(name="t", requests_per_s=1.0, requests_burst=3, max_concurrency=2)
    share = ProcessShare(2, [], [config])
    a = share.joined(0).tenant_table([config], 0.0)   # as two processes hold them
    b = share.joined(1).tenant_table([config], 0.0)
    first, second = a.admit("t", 1, 0.0), b.admit("t", 1, 0.0)
    assert first.ok and second.ok
    assert b.admit("t", 1, 0.0).reason == "concurrency"   # two in flight, one in each "process"
    a.release(first, 1, 0.0)
    assert b.in_flight("t") == 1
    assert b.admit("t", 1, 0.0).ok                         # the third of a burst of 3
    a.release(second, 1, 0.0)
    assert a.admit("t", 1, 0.5).reason == "requests_per_s"   # the burst is spent, half a token refilled
    assert b.admit("t", 1, 1.0).ok                         # one second later: one more
    share.remove()


def test_the_supervisor_refuses_a_port_in_use(tmp_path):
    import socket

    from router.processes import check_port_free
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(OSError, match="cannot listen"):
            check_port_free("127.0.0.1", holder.getsockname()[1])



def _router_children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():   # not the resource tracker
                kids.append(int(child))
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_router_process_that_dies_is_replaced_and_what_it_held_is_forgotten(cluster):
    start, opened = cluster
    routers, stubs = start()
    pool = ThreadPoolExecutor(8)
    held = [pool.submit(_post_or_dropped, routers.url) for _ in range(6)]
    _wait_for(lambda: sum(s.active for s in stubs) == 6, what="6 requests held")
    victim = _router_children(routers.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: routers._health_ids() >= 3, 60, "a third router process (the replacement)")
    # What the dead process had in flight no longer counts; the survivor's requests still do.
    survivors = 6 - sum(a.done() for a in held)
    _wait_for(lambda: httpx.get(routers.url + "/cluster", timeout=5).json()["cluster"]["in_flight"] == survivors,
              what="in-flight counts without the dead process's")
    opened.set()
    statuses = [a.result() for a in held]
    assert statuses.count(200) == survivors and statuses.count("dropped") == 6 - survivors
    pool.shutdown()


def _post_or_dropped(url: str) -> int | str:
    try:
        return _post(url)
    except httpx.RemoteProtocolError:   # its router process was killed under it
        return "dropped"


def _die_holding(lock) -> None:
    lock.__enter__()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_process_killed_inside_the_tenant_lock_does_not_wedge_the_others():
    import multiprocessing as mp
    share = ProcessShare(2, [], [])
    try:
        proc = mp.get_context("spawn").Process(target=_die_holding, args=(share.joined(1).lock,))
        proc.start()
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        done = threading.Event()
        threading.Thread(target=lambda: (share.joined(0).lock.__enter__(), done.set()), daemon=True).start()
        assert done.wait(10), "the lock stayed held after its holder died"
    finally:
        share.remove()
