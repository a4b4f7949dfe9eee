"""Reading request bodies with a size cap and a deadline: shared by the worker and router servers."""
from __future__ import annotations

import asyncio

from starlette.requests import Request

from kvlab.wire.openai_api import ApiError

BODY_TIMEOUT_S = 30.0   # a body slower than this (a trickling sender) is refused: 8 MiB in 30 s is ~280 KB/s


async def read_body(request: Request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The raw body, refusing (413) anything over `limit` bytes without reading it all, and (408)
    a body that has not fully arrived within `timeout_s`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(request, limit)
    except TimeoutError:
        raise ApiError(408, f"request body not received within {timeout_s:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None


async def _read(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> ApiError:
    # Connection: close, because the rest of the body is never read from this connection.
    return ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large",
                    headers={"Connection": "close"})
