"""The workers the router knows: membership, health, engine-reported load and router-side in-flight.

A worker is *up* (routable) or *down*. Probes poll ``GET /load`` (or ``/health`` on servers without
it, such as stock vLLM) every ``interval_s``; ``failures_to_remove`` failures in a row take a worker
down, and the first successful probe brings it back. The proxy also reports failures it sees on live
traffic, which take a worker down at once: a dead worker should not wait a probe interval to stop
receiving requests. Listeners (the policy set, the KV subscriber) hear every up/down/removal, so a
down worker leaves the hash rings and comes back to the same ring positions on recovery.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import httpx
import msgspec

from kvlab.wire.background import Background
from router.config import HealthConfig, Timeouts, WorkerConfig
from router.observability.metrics import RouterMetrics
from router.policies.base import WorkerView

log = logging.getLogger("kvlab.router.workers")


class LoadReport(msgspec.Struct):
    """The fields of a worker's ``GET /load`` the router uses; others are ignored."""
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    max_num_seqs: int | None = None        # sequence slots (kvlab workers say; stock vLLM does not)
    worker_id: str | None = None
    kv_events_endpoint: str | None = None   # ZMQ PUB endpoint, if the worker publishes there


class _Models(msgspec.Struct):
    data: list[dict] = []


_load_decoder = msgspec.json.Decoder(LoadReport)
_models_decoder = msgspec.json.Decoder(_Models)


class Worker:
    """One upstream worker as the router tracks it. ``view`` is what the policies read."""

    def __init__(self, config: WorkerConfig, metrics: RouterMetrics, load: SharedLoad | None = None):
        self.config = config
        self._load = load   # several router processes: this worker's column of the shared counts
        self._slot = load.worker_slot(config.id) if load is not None else None
        self.view = WorkerView(id=config.id, role=config.role, healthy=False)
        self.failures = 0
        self.models: list[str] = []
        self.max_model_len: int | None = None   # from its /v1/models cards (vLLM's field), when given
        self.kv_endpoint = config.kv_events
        self.has_load_endpoint = True
        self.slots: int | None = None          # its sequence slots, from /load
        self._in_flight_at_poll = 0            # view.in_flight when the last /load was read
        self.in_transit = 0                    # streams sent here whose response headers have not come back
        self._urls: dict[str, httpx.URL] = {}
        gauge = metrics.in_flight.labels(config.id)   # exported (at 0) from the start
        if load is None:   # one process: the gauge reads the count when scraped, not at every change
            gauge.set_function(lambda: self.view.in_flight)
        # Several: each process's count goes to its file (prometheus_client's multiprocess mode), summed,
        # through the metrics' batched sums (in_flight_by)
        self._metrics = metrics if load is not None else None
        self._health_gauge = metrics.healthy.labels(config.id)
        self._health_gauge.set(0)

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def url(self) -> str:
        return self.config.url

    def endpoint(self, path: str) -> httpx.URL:
        """The parsed URL of `path` on this worker (parsed once: URL parsing costs ~30 us)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.config.url + path)
        return url

    @property
    def up(self) -> bool:
        return self.view.healthy

    def charge(self) -> None:
        self.view.in_flight += 1
        if self._metrics is not None:
            self._metrics.in_flight_by(self.config.id, 1)
            if self._slot is not None:
                self._load.add(self._slot, 1)   # type: ignore[union-attr]

    def release(self) -> None:
        self.view.in_flight -= 1
        if self._metrics is not None:
            self._metrics.in_flight_by(self.config.id, -1)
            if self._slot is not None:
                self._load.add(self._slot, -1)   # type: ignore[union-attr]

    def refresh(self) -> None:
        """Take the in-flight count of every router process (only with a shared load)."""
        if self._slot is not None:
            self.view.in_flight = self._load.total(self._slot)   # type: ignore[union-attr]

    def queued(self) -> int:
        """Requests waiting in its queue now, by the last /load plus this router's traffic since (all
        its processes', with a shared load)."""
        view = self.view
        return waiting_now(view.waiting, view.running, self.slots, view.in_flight - self._in_flight_at_poll)

    def read_load(self, report: LoadReport) -> None:
        self.refresh()
        view = self.view
        view.running, view.waiting, view.kv_usage = report.running, report.waiting, report.kv_usage
        self.slots = report.max_num_seqs
        # A stream still in transit was not in the worker's queue when it wrote the report: it counts
        # as sent since (a report read while one was on its way let the shedder admit one too many).
        self._in_flight_at_poll = view.in_flight - self.in_transit

    def set_up(self, up: bool) -> None:
        self.view.healthy = up
        self._health_gauge.set(1 if up else 0)


class SharedLoad(Protocol):
    """In-flight counts shared by several router processes (router.shared_state.ProcessShare)."""
    def worker_slot(self, worker_id: str) -> int | None: ...
    def add(self, slot: int, delta: int) -> None: ...
    def total(self, slot: int) -> int: ...


def waiting_now(waiting: int, running: int, slots: int | None, sent_since: int) -> int:
    """A worker's waiting queue now, from its last report (`waiting`, `running`, `slots`) and the net
    number of requests this router has sent it since (`sent_since`: sent less finished, may be < 0).

    A poll is up to a probe interval old, and at 3x overload ~30 requests arrive in that second: a
    shedder that trusts the poll admits them all and the queue swings between empty and twice its
    limit, so admitted requests miss the TTFT SLO in waves. A worker with a queue is saturated, so
    each request sent since joins the queue and each one finished lets one in; one without a queue
    fills its free slots first; with its slots unknown (no /load, e.g. stock vLLM) the poll is all
    there is. Other routers' traffic since the poll is unseen until the next one.
    """
    if waiting > 0:
        return max(0, waiting + sent_since)
    return max(0, running + sent_since - slots) if slots is not None else 0


class PoolListener(Protocol):
    def worker_up(self, worker: Worker) -> None: ...
    def worker_down(self, worker: Worker) -> None: ...
    def worker_removed(self, worker: Worker) -> None: ...
    def worker_suspect(self, worker: Worker) -> None: ...   # a probe failed; not yet out of routing


class WorkerPool:
    def __init__(self, client: httpx.AsyncClient, health: HealthConfig, timeouts: Timeouts,
                 metrics: RouterMetrics, load: SharedLoad | None = None):
        self.client = client
        self.load = load
        self.health = health
        self.timeouts = timeouts
        self.metrics = metrics
        self.listeners: list[PoolListener] = []
        self._workers: dict[str, Worker] = {}
        self._views: list[WorkerView] = []
        self._roles: set[str] = set()
        self._version = 0   # bumped by _changed; _served_cache is (version, models, context length)
        self._served_cache: tuple[int, list[str], int | None] | None = None
        self._background = Background(self._run)
        # See every /load body (router.observability.dashboard).
        self.load_hooks: list[Callable[[str, bytes], None]] = []

    # -- membership ------------------------------------------------------------------------------
    def views(self, queued: bool = False) -> list[WorkerView]:
        """Snapshots for the policies (live objects: in-flight counts are always current; with
        several router processes they are refreshed here, before every decision, from the share).
        `queued`: also set each view's waiting requests now (Worker.queued), for the shedder's lines."""
        if self.load is not None or queued:
            for worker in self._workers.values():
                if self.load is not None:
                    worker.refresh()
                if queued:
                    worker.view.queued = worker.queued()
        return self._views

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def __getitem__(self, worker_id: str) -> Worker:
        return self._workers[worker_id]

    def __iter__(self):
        return iter(list(self._workers.values()))

    def up_count(self) -> int:
        return sum(1 for w in self._workers.values() if w.up)

    def queued(self) -> int:
        """Requests waiting in the up workers' queues now (Worker.queued), for the shedder."""
        up = [w for w in self._workers.values() if w.up]
        if self.load is not None:
            for worker in up:
                worker.refresh()   # every process's requests sent since the last /load count
        return sum(w.queued() for w in up)

    def has_role(self, role: str) -> bool:
        return role in self._roles

    def models(self) -> list[str]:
        """The up workers' models, each once (the same list until they change: read, never changed)."""
        return self._served()[1]

    def context_length(self) -> int | None:
        """The largest context an up worker reported: a longer request fits none of them."""
        return self._served()[2]

    def _served(self) -> tuple[int, list[str], int | None]:
        """(version, models, context length) of the up workers, derived once per change (``_changed``):
        every request reads them. Also read from the intake thread: a result derived while the loop
        changed the workers carries the version it started from, so the next read derives it again."""
        served = self._served_cache
        version = self._version
        if served is None or served[0] != version:
            names: dict[str, None] = {}
            lengths = []
            for worker in list(self._workers.values()):   # a copy: also read from the intake thread
                if worker.up:
                    names.update(dict.fromkeys(worker.models))
                    if worker.max_model_len:
                        lengths.append(worker.max_model_len)
            served = self._served_cache = (version, list(names), max(lengths) if lengths else None)
        return served

    def _changed(self) -> None:
        """A worker came or went, went up or down, or reported its models: derive what they serve again."""
        self._version += 1

    async def add(self, config: WorkerConfig) -> Worker:
        """Register a worker and probe it once, so a live worker is routable when this returns."""
        if config.id in self._workers:
            raise ValueError(f"worker {config.id!r} is already registered")
        if self.load is not None and self.load.worker_slot(config.id) is None:
            raise ValueError(f"worker {config.id!r} is not among the configured workers: with several router "
                             "processes membership is fixed at start (run one process to change it at run time)")
        worker = Worker(config, self.metrics, self.load)
        self._workers[config.id] = worker
        self._membership_changed()
        try:
            await self.probe(worker)
        except BaseException:   # all or nothing: a worker whose first probe blew up is not left behind
            if self._workers.get(config.id) is worker:
                self.remove(config.id)
            raise
        return worker

    def remove(self, worker_id: str) -> Worker:
        worker = self._workers.pop(worker_id)
        self._membership_changed()
        if worker.up:
            worker.set_up(False)
            self._changed()
            self._notify("worker_down", worker)
        self._notify("worker_removed", worker)
        return worker

    def _membership_changed(self) -> None:
        # Derived once per change, not per request: the hot path reads these on every decision.
        self._views = [w.view for w in self._workers.values()]
        self._roles = {w.config.role for w in self._workers.values()}
        self._changed()

    # -- health ----------------------------------------------------------------------------------
    def report_failure(self, worker_id: str, reason: str) -> None:
        """Live traffic saw this worker fail (refused, reset, timed out): stop routing to it now."""
        self.metrics.worker_failures.labels(worker_id, reason).inc()
        worker = self._workers.get(worker_id)
        if worker is not None and worker.up:
            log.warning("worker %s failed on live traffic (%s): out of routing until a probe succeeds",
                        worker_id, reason)
            self._mark(worker, False)

    async def probe(self, worker: Worker) -> bool:
        ok = await self._probe_once(worker)
        if ok:
            worker.failures = 0
            if not worker.up:
                if not worker.models:
                    await self._fetch_models(worker)
                self._mark(worker, True)
        else:
            worker.failures += 1
            if worker.up and worker.failures >= self.health.failures_to_remove:
                self._mark(worker, False)
            elif worker.up:
                self._notify("worker_suspect", worker)   # still routable; its stalled streams may move
        return ok

    async def _probe_once(self, worker: Worker) -> bool:
        timeout = self.timeouts.health_s
        try:
            if worker.has_load_endpoint:
                response = await self.client.get(worker.url + "/load", timeout=timeout)
                if response.status_code == 404:
                    worker.has_load_endpoint = False   # e.g. stock vLLM: health only
                else:
                    return response.status_code == 200 and self._read_load(worker, response.content)
            response = await self.client.get(worker.url + "/health", timeout=timeout)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    def _read_load(self, worker: Worker, body: bytes) -> bool:
        try:
            report = _load_decoder.decode(body)
        except msgspec.MsgspecError:
            return False
        worker.read_load(report)
        if report.kv_events_endpoint and not worker.config.kv_events:
            worker.kv_endpoint = report.kv_events_endpoint
        for hook in self.load_hooks:
            hook(worker.id, body)
        return True

    async def _fetch_models(self, worker: Worker) -> None:
        try:
            response = await self.client.get(worker.url + "/v1/models", timeout=self.timeouts.health_s)
            cards = _models_decoder.decode(response.content).data
            worker.models = [m["id"] for m in cards if "id" in m]
            lengths = [m["max_model_len"] for m in cards if type(m.get("max_model_len")) is int]
            worker.max_model_len = min(lengths) if lengths else None
        except (httpx.HTTPError, msgspec.MsgspecError, TypeError):
            pass  # the model list is advisory; an unknown list accepts any model name
        finally:
            self._changed()

    def _mark(self, worker: Worker, up: bool) -> None:
        if self._workers.get(worker.id) is not worker:
            return  # removed while a probe was in flight
        worker.set_up(up)
        self._changed()
        log.info("worker %s is %s", worker.id, "up" if up else "down")
        self._notify("worker_up" if up else "worker_down", worker)

    def _notify(self, event: str, worker: Worker) -> None:
        for listener in self.listeners:
            handler = getattr(listener, event, None)
            if handler is not None:
                handler(worker)

    # -- the probe loop --------------------------------------------------------------------------
    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _run(self) -> None:
        # Fixed rate: a round starts every interval_s, however long the last one took. Waiting the
        # interval after a hung worker's probe timed out would double the time to mark it down.
        # The first round waits an interval too: ``add`` has just probed every worker, and a second
        # round at once would only race whatever happens to the workers right after start-up.
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            await asyncio.sleep(max(0.0, self.health.interval_s - (loop.time() - started)))
            started = loop.time()
            workers = list(self._workers.values())
            await asyncio.gather(*(self.probe(w) for w in workers), return_exceptions=True)
