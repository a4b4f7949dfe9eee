"""KV-cache events in vLLM's wire format, so any router that reads vLLM's stream can read ours.

Field names, order and tagging follow vLLM's ``vllm.distributed.kv_events`` (msgpack, array-like
structs, the class name as tag). On ZMQ, vLLM publishes multipart messages
``[topic, sequence number (8-byte big-endian), payload]``; ``encode_batch``/``decode_batch`` do the
payload, the publisher adds the rest.
"""
from __future__ import annotations

import msgspec

from kvlab.wire.block_hash import BlockHash


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of all KV-cache events."""


class BlockStored(KVCacheEvent):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"


class BlockRemoved(KVCacheEvent):
    block_hashes: list[BlockHash]
    medium: str | None = "GPU"


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    return _decoder.decode(payload)
