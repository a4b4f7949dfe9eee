"""Reading request bodies with a size cap: shared by the worker and router servers."""
from __future__ import annotations

from starlette.requests import Request

from kvlab.wire.openai_api import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) anything over `limit` bytes without reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
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
