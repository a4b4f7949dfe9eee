"""The load generator's HTTP client: geventhttpclient (what Locust's FastHttpUser runs on) behind the
small part of httpx's interface that `llm_measure.stream_request` uses.

Why not httpx inside Locust: its connection pool walks every pooled connection, and for each idle one
counts them all again, on every request start and end (httpcore 1.0's `_assign_requests_to_connections`).
Near a cluster's knee an open loop keeps hundreds of streams open, so the load generator spent more CPU
on pool bookkeeping than on reading tokens. geventhttpclient keeps idle sockets in a queue (O(1)) and
parses HTTP in C. Streams are read line by line (`readline`), so each SSE event is timed as soon as its
line is complete, as with httpx's raw iterator.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import msgspec
from geventhttpclient import URL, HTTPClient

_encode = msgspec.json.Encoder().encode


class FastResponse:
    """httpx.Response's streaming subset over a geventhttpclient response."""

    def __init__(self, raw):
        self._raw = raw
        self.status_code: int = raw.status_code

    def read(self) -> bytes:
        return bytes(self._raw.read())

    def iter_raw(self) -> Iterator[bytes]:
        """The body a line at a time, each as soon as it has arrived whole."""
        while line := self._raw.readline(b"\n"):
            yield bytes(line)

    def close(self) -> None:
        self._raw.release()


class FastClient:
    """POST JSON and stream the reply, over a pool of kept-alive connections to one host."""

    def __init__(self, base_url: str, max_connections: int, timeout_s: float = 600.0):
        url = URL(base_url)
        self.base_path = url.path.rstrip("/")
        self._http = HTTPClient.from_url(url, concurrency=max_connections, connection_timeout=timeout_s,
                                         network_timeout=timeout_s)

    @contextmanager
    def stream(self, method: str, path: str, json: Any = None, headers: Mapping[str, str] | None = None,
               timeout: float | None = None) -> Iterator[FastResponse]:
        """`timeout` is the client's (per socket read), fixed when it was built; kept for httpx's signature."""
        head = {"Content-Type": "application/json", **(headers or {})}
        response = FastResponse(self._http.request(method, self.base_path + path, body=_encode(json), headers=head))
        try:
            yield response
        finally:
            response.close()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FastClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
