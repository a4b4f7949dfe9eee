"""Upstream request bodies: the client's JSON with a few fields added or overridden.

Re-encoding a 32K-token prompt costs far more than the routing decision, so overrides are spliced in
as raw bytes just before the object's closing brace. JSON decoders keep the last of duplicate keys
(msgspec, Python's json, and the pydantic parsing vLLM uses), so a spliced field always wins over a
client's own value: a tenant cannot pick another tenant's cache salt.
"""
from __future__ import annotations

from typing import Any

import msgspec

_encode = msgspec.json.encode


def with_fields(raw: bytes, fields: dict[str, Any]) -> bytes:
    """`raw` (a JSON object the router has already decoded, so it is valid) with `fields` set."""
    if not fields:
        return raw
    end = raw.rstrip().rfind(b"}")
    head = raw[:end].rstrip()
    extra = b",".join(_encode(k) + b":" + _encode(v) for k, v in fields.items())
    separator = b"" if head.endswith(b"{") else b","
    return head + separator + extra + b"}"


def rebuilt(raw: bytes, fields: dict[str, Any], drop: tuple[str, ...] = ()) -> bytes:
    """Decode, change and re-encode the body: for rare paths (migration) that replace big fields."""
    body = msgspec.json.decode(raw)
    for key in drop:
        body.pop(key, None)
    body.update(fields)
    return _encode(body)
