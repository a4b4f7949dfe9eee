"""kvlab's router with aiohttp's client in place of its own HTTP/1.1 transport, for benchmarks/router_peers.py.

``AiohttpTransport`` is an httpx transport over one aiohttp ClientSession (its C parser and its
connection pool), so the router's code is unchanged: only the layer that router.forwarding.transport
implements is swapped. Timeouts come from httpx's per-request extensions as there; aiohttp's errors
become the httpx errors the router handles.

Run: python benchmarks/aiohttp_router.py [kvlab router flags]   (aiohttp must be importable)
"""
from __future__ import annotations

import sys

import httpx


class _Body(httpx.AsyncByteStream):
    def __init__(self, response) -> None:
        self.response = response

    async def __aiter__(self):
        import aiohttp
        try:
            async for part in self.response.content.iter_any():
                yield part
        except aiohttp.ClientPayloadError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc)) from exc

    async def aclose(self) -> None:
        self.response.release()   # back to the pool if read to its end; closed otherwise


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self._session = None

    def _client(self):
        import aiohttp
        if self._session is None:
            # No limit on connections (the router's admission bounds them, as with its own transport).
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
                                                  auto_decompress=False, skip_auto_headers=("User-Agent",))
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import aiohttp
        timeout = request.extensions.get("timeout", {})
        limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout.get("connect"), sock_read=timeout.get("read"))
        body = request.content if request.method != "GET" else None
        try:
            response = await self._client().request(request.method, str(request.url), data=body,
                                                    headers=dict(request.headers), timeout=limits)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc)) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc
        return httpx.Response(response.status, headers=list(response.raw_headers), stream=_Body(response),
                              request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def main() -> int:
    import router.server
    from kvlab.cli import main as kvlab_main
    router.server.LeanTransport = AiohttpTransport   # type: ignore[misc,assignment]  (the one line swapped)
    return kvlab_main(["router", *sys.argv[1:], "--processes", "1"])   # one process: the swap is made here


if __name__ == "__main__":
    sys.exit(main())
