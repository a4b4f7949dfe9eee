"""KV events leave the worker in vLLM's format: over ZMQ PUB (with replay) and over HTTP."""
import time

import httpx
import msgspec
import zmq

from kvlab.wire.block_hash import block_hashes
from kvlab.wire.kv_events import BlockRemoved, BlockStored, KVEventBatch, decode_batch

MODEL = "Llama-3.1-8B"
PROMPT = list(range(9000, 9040))   # 2 full blocks of 16 (+8 tokens)


def receive_batches(sub: zmq.Socket, want_blocks: int, timeout_s: float = 3.0) -> list[tuple[bytes, int, KVEventBatch]]:
    out, stored, deadline = [], 0, time.monotonic() + timeout_s
    while stored < want_blocks and time.monotonic() < deadline:
        if sub.poll(50):
            topic, seq, payload = sub.recv_multipart()
            batch = decode_batch(payload)
            out.append((topic, int.from_bytes(seq, "big"), batch))
            stored += sum(len(e.block_hashes) for e in batch.events if isinstance(e, BlockStored))
    return out


def subscriber(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A SUB socket that is surely connected: a PUB drops what it sends before the subscription lands."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    time.sleep(0.2)
    return sub


def test_block_stored_events_arrive_over_zmq_and_decode(start_worker, free_tcp_port):
    pub, replay = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    w = start_worker(kv_events_endpoint=pub, kv_events_replay_endpoint=replay)
    ctx = zmq.Context()
    try:
        sub = subscriber(ctx, pub)
        w.http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1})
        batches = receive_batches(sub, want_blocks=2)
        stored = [e for _, _, b in batches for e in b.events if isinstance(e, BlockStored)]
        expected = block_hashes(PROMPT)
        assert [h for e in stored for h in e.block_hashes] == expected
        assert stored[0].parent_block_hash is None and stored[0].block_size == 16
        assert [t for e in stored for t in e.token_ids] == PROMPT[:32]
        assert [seq for _, seq, _ in batches] == list(range(len(batches)))
        assert all(topic == b"" for topic, _, _ in batches)
        assert w.load()["kv_events_endpoint"] == pub
        assert replay_from(ctx, replay, 0) == [(seq, b) for _, seq, b in batches]
    finally:
        ctx.destroy(linger=0)


def replay_from(ctx: zmq.Context, endpoint: str, start: int) -> list[tuple[int, KVEventBatch]]:
    """vLLM's replay protocol: send the start sequence, read [seq, payload] until seq -1."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    dealer.send(start.to_bytes(8, "big"))
    out = []
    while True:
        assert dealer.poll(3000), "no replay answer"
        seq_bytes, payload = dealer.recv_multipart()
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        if seq == -1:
            return out
        out.append((seq, decode_batch(payload)))


def test_http_event_log_resyncs_a_router_without_zmq(start_worker):
    w = start_worker(num_blocks=4, kv_events_buffer=3)   # 64 tokens: the second prompt evicts the first
    w.http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT[:32], "max_tokens": 1})
    r = w.http.get("/v1/kv_events", params={"after": -1})
    batches = msgspec.json.decode(r.content, type=list[tuple[int, KVEventBatch]])
    assert [seq for seq, _ in batches] == [0]
    assert isinstance(batches[0][1].events[0], BlockStored)

    w.http.post("/v1/completions", json={"model": MODEL, "prompt": list(range(100, 148)), "max_tokens": 1})
    r = w.http.get("/v1/kv_events", params={"after": 0, "format": "msgpack"})
    newer = msgspec.msgpack.decode(r.content, type=list[tuple[int, KVEventBatch]])
    events = [e for _, b in newer for e in b.events]
    assert any(isinstance(e, BlockRemoved) for e in events)
    assert all(seq > 0 for seq, _ in newer)
    assert int(r.headers["x-kv-events-next-seq"]) == newer[-1][0] + 1
    assert int(r.headers["x-kv-events-first-seq"]) <= newer[0][0]
    assert httpx.get(w.url + "/v1/kv_events", params={"after": "x"}).status_code == 400


def test_host_tier_blocks_travel_as_cpu_medium_events_and_in_the_snapshot(start_worker):
    w = start_worker(num_blocks=3, host_kv_gb=0.1)   # 48 tokens of HBM: each prompt evicts the other
    first, other = list(range(500, 547)), list(range(600, 647))   # two full blocks each
    for prompt in (first, other):
        w.http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    r = w.http.get("/v1/kv_events", params={"after": -1, "format": "msgpack"})
    events = [e for _, b in msgspec.msgpack.decode(r.content, type=list[tuple[int, KVEventBatch]]) for e in b.events]
    demoted = {h for e in events if isinstance(e, BlockStored) and e.medium == "CPU" for h in e.block_hashes}
    assert set(block_hashes(first)[:2]) <= demoted
    snapshot = w.http.get("/v1/kv_events/snapshot").json()
    assert set(block_hashes(first)[:2]) <= set(snapshot["host_block_hashes"])
    assert not set(snapshot["host_block_hashes"]) & set(snapshot["block_hashes"])

    w.http.post("/v1/completions", json={"model": MODEL, "prompt": first, "max_tokens": 1})   # onboarded
    metrics = w.http.get("/metrics").text
    hits = next(line for line in metrics.splitlines() if line.startswith("vllm:external_prefix_cache_hits_total"))
    assert float(hits.split()[-1]) == 32.0   # both blocks came back from host memory
