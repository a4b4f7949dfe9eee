"""KV-cache events out of the worker, in vLLM's wire format.

``KvEventLog`` numbers every non-empty batch of engine events and keeps the last N (a bounded
replay buffer) so a router can resync over HTTP (``GET /v1/kv_events?after=SEQ``). When an endpoint
is configured, ``ZmqKvPublisher`` also sends each batch on a ZMQ PUB socket as vLLM does:
multipart ``[topic, sequence (8-byte big-endian), msgpack KVEventBatch]``; an optional ROUTER
socket answers replay requests (start sequence, 8-byte big-endian) with every buffered batch from
there on, then an end marker of sequence -1 and an empty payload, like vLLM's publisher.

Unlike vLLM (which connects unless the address has a wildcard) the worker always binds: each worker
is a stable publisher, and a router's SUB socket connects to all of them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import zmq
import zmq.asyncio

from kvlab.wire.kv_events import KVEvent, KVEventBatch, encode_batch

log = logging.getLogger(__name__)
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


class KvEventLog:
    """Sequence-numbered event batches, the last `capacity` of them kept."""

    def __init__(self, capacity: int = 4096):
        self._buffer: deque[tuple[int, KVEventBatch, bytes]] = deque(maxlen=max(1, capacity))
        self.next_seq = 0
        self.listeners: list[Callable[[int, bytes], None]] = []   # told (seq, payload) of each new batch

    def append(self, events: list[KVEvent]) -> int:
        batch = KVEventBatch(ts=time.time(), events=events)
        seq, payload = self.next_seq, encode_batch(batch)
        self.next_seq += 1
        self._buffer.append((seq, batch, payload))
        for listener in self.listeners:
            listener(seq, payload)
        return seq

    @property
    def first_seq(self) -> int:
        """Oldest sequence still buffered (next_seq when empty): older ones need a full resync."""
        return self._buffer[0][0] if self._buffer else self.next_seq

    def since(self, after: int) -> list[tuple[int, KVEventBatch]]:
        return [(seq, batch) for seq, batch, _ in self._buffer if seq > after]

    def payloads_from(self, start: int) -> list[tuple[int, bytes]]:
        return [(seq, payload) for seq, _, payload in self._buffer if seq >= start]


class ZmqKvPublisher:
    """PUB (and optional replay ROUTER) sockets fed from a KvEventLog, on the running event loop."""

    def __init__(self, log_: KvEventLog, endpoint: str, replay_endpoint: str | None = None,
                 topic: str = "", queue_size: int = 10_000, hwm: int = 100_000):
        self.log = log_
        self.topic = topic.encode()
        self.dropped = 0
        self._ctx = zmq.asyncio.Context()
        self._pub = self._bind(zmq.PUB, endpoint, hwm)
        self._replay = self._bind(zmq.ROUTER, replay_endpoint, hwm) if replay_endpoint else None
        self._queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(maxsize=queue_size)
        self._tasks: list[asyncio.Task] = []
        log_.listeners.append(self._enqueue)

    def _bind(self, kind: int, endpoint: str, hwm: int) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        sock.set_hwm(hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        return sock

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._send_loop()))
        if self._replay is not None:
            self._tasks.append(loop.create_task(self._replay_loop(self._replay)))

    def _enqueue(self, seq: int, payload: bytes) -> None:
        try:
            self._queue.put_nowait((seq, payload))
        except asyncio.QueueFull:
            # Subscribers see the gap in sequence numbers and can replay from the buffer.
            self.dropped += 1

    async def _send_loop(self) -> None:
        while True:
            seq, payload = await self._queue.get()
            try:
                await self._pub.send_multipart((self.topic, seq_bytes(seq), payload))
            except zmq.ZMQError:
                log.exception("KV event batch %d not published", seq)

    async def _replay_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                await self._answer_replay(sock, frames)
            except (zmq.ZMQError, ValueError):
                log.exception("KV event replay request failed")

    async def _answer_replay(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        # REQ clients send [identity, b"", start]; DEALER clients [identity, start].
        if len(frames) not in (2, 3) or len(frames[-1]) != 8:
            log.warning("malformed KV event replay request: %d frames", len(frames))
            return
        envelope, start = frames[:-1], int.from_bytes(frames[-1], "big", signed=True)
        for seq, payload in self.log.payloads_from(start):
            await sock.send_multipart((*envelope, seq_bytes(seq), payload))
        await sock.send_multipart((*envelope, END_SEQ, b""))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.log.listeners.remove(self._enqueue)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
