"""Feeds the policies' KV index from every live worker's KV events (vLLM's format).

Two transports, one per worker:
- ``http``: poll ``GET /v1/kv_events?after=SEQ&format=msgpack`` (works through anything that passes
  HTTP; latency = the poll period).
- ``zmq``: a SUB socket on the worker's PUB endpoint, multipart ``[topic, seq (8-byte BE), payload]``
  as vLLM publishes (lowest latency; needs the endpoint, from config or the worker's /load).

Sequence numbers detect trouble. A worker whose sequence went backwards restarted with an empty
cache; a gap means lost batches, whose removals we will never see. Either way the worker's entries
are dropped: a stale "cached here" would route requests to a worker that no longer holds the
prefix, which is worse than forgetting a prefix it still has.

Resync: a feed starts, and recovers from a gap, with the worker's snapshot
(``GET /v1/kv_events/snapshot``: every cached block hash as of sequence S), then takes batches from S
on (polled, or from the ZMQ socket, subscribed before the snapshot is read). So a restarted router,
or one that fell behind the worker's replay buffer, knows the whole cache, not just its last few
thousand batches. Workers without the endpoint (stock vLLM), and an index that
rehashes engine blocks (it needs token ids, which a snapshot does not carry), fall back to replaying
the buffer and forgetting what it no longer holds.
"""
from __future__ import annotations

import asyncio
import logging

import httpx
import msgspec

from kvlab.wire.block_hash import BlockHash
from kvlab.wire.kv_events import BlockStored, KVEvent, KVEventBatch, decode_batch
from router.policies.kv_index import KvIndex
from router.pool.worker_pool import Worker

log = logging.getLogger("kvlab.router.kv_events")

_batches = msgspec.msgpack.Decoder(list[tuple[int, KVEventBatch]])


class Snapshot(msgspec.Struct):
    seq: int                  # the first event batch not reflected in block_hashes
    block_size: int
    block_hashes: list[BlockHash]
    host_block_hashes: list[BlockHash] = []   # a host KV tier's blocks (medium CPU)


_snapshot = msgspec.msgpack.Decoder(Snapshot)


class KvSubscriber:
    def __init__(self, index: KvIndex, client: httpx.AsyncClient, mode: str = "http", poll_s: float = 0.05,
                 timeout_s: float = 1.0):
        self.index = index
        self.client = client
        self.mode = mode
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.batches = 0                      # batches applied, all workers (tests and debugging)
        self.resyncs = 0
        self.snapshots = 0                    # full-state loads (HTTP feed)
        self._tasks: dict[str, asyncio.Task] = {}

    # -- pool listener ---------------------------------------------------------------------------
    def worker_up(self, worker: Worker) -> None:
        if self.mode == "off" or worker.id in self._tasks:
            return
        feed = self._zmq if self.mode == "zmq" and worker.kv_endpoint else self._poll
        self._tasks[worker.id] = asyncio.get_running_loop().create_task(feed(worker))

    def worker_down(self, worker: Worker) -> None:
        task = self._tasks.pop(worker.id, None)
        if task is not None:
            task.cancel()

    def worker_removed(self, worker: Worker) -> None:
        self.worker_down(worker)

    def worker_suspect(self, worker: Worker) -> None:
        pass   # its feed reconnects on its own; nothing to do until it is down

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- feeds -----------------------------------------------------------------------------------
    def _resync(self, worker_id: str, why: str) -> None:
        log.info("KV events of %s: %s; dropping its index entries", worker_id, why)
        self.resyncs += 1
        self.index.remove_worker(worker_id)

    def _apply(self, worker_id: str, batch: KVEventBatch) -> None:
        try:
            self.index.apply(worker_id, batch)
            self.batches += 1
        except (ValueError, TypeError) as exc:   # one bad batch must not stop the feed
            log.warning("KV event batch from %s not applied: %s", worker_id, exc)

    async def _poll(self, worker: Worker) -> None:
        after = None   # None: no known position; start (again) from a snapshot
        url = worker.url + "/v1/kv_events"
        snapshots = not self.index.rehash
        while True:
            try:
                if after is None:
                    after, snapshots = await self._from_snapshot(worker) if snapshots else (-1, False)
                response = await self.client.get(url, params={"after": after, "format": "msgpack"},
                                                 timeout=self.timeout_s)
                if response.status_code == 404:
                    log.info("worker %s serves no /v1/kv_events; no KV feed", worker.id)
                    return
                after = self._take(worker.id, after, response, snapshots)
            except (httpx.HTTPError, msgspec.MsgspecError, ValueError) as exc:
                log.debug("KV event poll of %s failed: %r", worker.id, exc)
            await asyncio.sleep(self.poll_s)

    async def _from_snapshot(self, worker: Worker) -> tuple[int, bool]:
        """Load the worker's whole cache into the index: (the sequence to poll after, whether the worker
        serves snapshots). Without them, (-1, False): replay the buffer from its start."""
        response = await self.client.get(worker.url + "/v1/kv_events/snapshot", params={"format": "msgpack"},
                                         timeout=self.timeout_s)
        if response.status_code == 404:
            return -1, False
        response.raise_for_status()
        snap = _snapshot.decode(response.content)
        self.index.remove_worker(worker.id)
        events: list[KVEvent] = [BlockStored(block_hashes=snap.block_hashes, parent_block_hash=None,
                                             token_ids=[], block_size=snap.block_size)]
        if snap.host_block_hashes:
            events.append(BlockStored(block_hashes=snap.host_block_hashes, parent_block_hash=None, token_ids=[],
                                      block_size=snap.block_size, medium="CPU"))
        self._apply(worker.id, KVEventBatch(ts=0.0, events=events))
        self.snapshots += 1
        return snap.seq - 1, True

    def _take(self, worker_id: str, after: int, response: httpx.Response, snapshots: bool = False) -> int | None:
        next_seq = int(response.headers.get("x-kv-events-next-seq", after + 1))
        first_seq = int(response.headers.get("x-kv-events-first-seq", 0))
        if next_seq < after + 1:
            self._resync(worker_id, "sequence went back (restart)")
            return None if snapshots else -1
        if after >= 0 and first_seq > after + 1:
            self._resync(worker_id, f"missed batches {after + 1}..{first_seq - 1}")
            if snapshots:
                return None
        for seq, batch in _batches.decode(response.content):
            self._apply(worker_id, batch)
            after = seq
        return after

    async def _zmq(self, worker: Worker) -> None:
        import zmq
        import zmq.asyncio
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        assert worker.kv_endpoint is not None, "worker_up picks this feed only for workers with one"
        sock.connect(worker.kv_endpoint)
        # Subscribed first, then the snapshot: batches published meanwhile arrive on the socket, and
        # those the snapshot already holds (sequence below its own) are skipped.
        expected = floor = await self._zmq_snapshot(worker)
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                if floor is not None and seq < floor:
                    continue   # already in the snapshot
                if expected is not None and seq != expected:
                    self._resync(worker.id, f"sequence {seq}, expected {expected}")
                    expected = floor = await self._zmq_snapshot(worker)
                    if floor is not None and seq < floor:
                        continue
                floor, expected = None, seq + 1
                self._apply(worker.id, decode_batch(frames[2]))
        finally:
            sock.close(linger=0)

    async def _zmq_snapshot(self, worker: Worker) -> int | None:
        """The sequence the worker's snapshot (over HTTP) reaches, once loaded; None without one."""
        if self.index.rehash:
            return None
        try:
            after, served = await self._from_snapshot(worker)
        except (httpx.HTTPError, msgspec.MsgspecError, ValueError) as exc:
            log.debug("KV snapshot of %s failed: %r", worker.id, exc)
            return None
        return after + 1 if served else None
