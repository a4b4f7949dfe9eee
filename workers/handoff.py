"""Prefill -> decode handoff through vLLM-style ``kv_transfer_params``.

A router drives it, as vLLM's disaggregated proxies do:

1. It sends the request to a prefill worker with ``kv_transfer_params: {"do_remote_decode": true}``.
   The prefill worker computes the prompt, samples the first token, keeps the KV held and answers
   (one JSON body) with ``kv_transfer_params`` ready to forward (see ``prefill_params``).
2. It sends the same request to a decode worker with those params (``do_remote_prefill: true``).
   The decode worker accepts a ``remote_url`` only among its configured prefill peers
   (WorkerConfig.peers): it calls that URL, so a client must never choose it.
   The decode worker pays the transfer time for the blocks it lacks, then streams tokens 2..N;
   once the KV has landed it tells the prefill worker ``POST /v1/kv/release`` (``KvReleaser``).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import httpx
import msgspec

from kvlab.wire.openai_api import ApiError
from workers.core.request import RemotePrefill

log = logging.getLogger(__name__)


class RemoteSource(msgspec.Struct, frozen=True):
    """Decode role: where a request's KV was prefilled and is held."""
    remote_request_id: str
    remote_url: str
    first_token: int


class Handoff(msgspec.Struct, frozen=True):
    """What a request's kv_transfer_params ask of this worker."""
    remote_decode: bool = False              # prefill role: hold the KV for a decode worker
    source: RemoteSource | None = None       # decode role: the KV comes from here

    @property
    def remote(self) -> RemotePrefill | None:
        return None if self.source is None else RemotePrefill(first_token=self.source.first_token)


def parse_handoff(params: dict[str, Any] | None, role: str, peers: Iterable[str] = ()) -> Handoff:
    """Validate kv_transfer_params against this worker's role and its configured prefill peers;
    ApiError(400) names the bad field."""
    if not params:
        return Handoff()
    remote_decode = params.get("do_remote_decode") is True
    remote_prefill = params.get("do_remote_prefill") is True
    if remote_decode and remote_prefill:
        raise _bad("do_remote_decode and do_remote_prefill are exclusive", "do_remote_prefill")
    if remote_decode and role != "prefill":
        raise _bad(f"do_remote_decode needs a prefill worker; this one's role is {role!r}", "do_remote_decode")
    if remote_prefill and role == "prefill":
        raise _bad("do_remote_prefill needs a decode (or both) worker; this one is a prefill worker",
                   "do_remote_prefill")
    return Handoff(remote_decode=remote_decode, source=_source(params, peers) if remote_prefill else None)


def normalize_url(url: str) -> str:
    """Scheme and host compared case-insensitively, a trailing slash ignored."""
    scheme, sep, rest = url.strip().rstrip("/").partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower()}{slash}{path}"


def _source(params: dict[str, Any], peers: Iterable[str]) -> RemoteSource:
    rid, url, first = params.get("remote_request_id"), params.get("remote_url"), params.get("first_token")
    if not isinstance(rid, str) or not rid:
        raise _bad("remote_request_id must be a non-empty string", "remote_request_id")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise _bad("remote_url must be the prefill worker's http(s) base URL", "remote_url")
    if normalize_url(url) not in {normalize_url(peer) for peer in peers}:
        # The worker will POST to this URL: only prefill workers it was configured with qualify.
        raise _bad("remote_url is not one of this worker's prefill peers", "remote_url")
    if type(first) is not int or first < 0:
        raise _bad("first_token must be a non-negative token id", "first_token")
    return RemoteSource(remote_request_id=rid, remote_url=url.rstrip("/"), first_token=first)


def _bad(message: str, field: str) -> ApiError:
    return ApiError(400, message, param=f"kv_transfer_params.{field}")


def prefill_params(request_id: str, base_url: str, worker_id: str, first_token: int,
                   prompt_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """The prefill response's kv_transfer_params: forwardable as-is to a decode worker."""
    return {"do_remote_prefill": True, "do_remote_decode": False,
            "remote_request_id": request_id, "remote_url": base_url, "remote_worker_id": worker_id,
            "first_token": first_token, "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens}


class KvReleaser:
    """Decode role: tells prefill workers their held KV was pulled. Fire-and-forget, bounded."""

    def __init__(self, timeout_s: float = 5.0, max_pending: int = 1024):
        self._client: httpx.AsyncClient | None = None
        self._timeout = timeout_s
        self._max_pending = max_pending
        self._pending: set[asyncio.Task] = set()
        self.failures = 0

    def open(self) -> httpx.AsyncClient:
        # Built up front: creating a client loads CA certificates (tens of ms) and would stall the
        # event loop, and every token stream on it, at the first release.
        self._client = httpx.AsyncClient(timeout=self._timeout, trust_env=False)
        return self._client

    def release(self, source: RemoteSource) -> None:
        if len(self._pending) >= self._max_pending:
            self.failures += 1
            log.warning("release of %s dropped: %d releases pending", source.remote_request_id, len(self._pending))
            return
        task = asyncio.get_running_loop().create_task(self._post(source))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _post(self, source: RemoteSource) -> None:
        client = self._client or self.open()
        try:
            resp = await client.post(f"{source.remote_url}/v1/kv/release",
                                           json={"request_id": source.remote_request_id})
            if resp.status_code >= 400:
                self.failures += 1
                log.warning("KV release of %s at %s answered %d", source.remote_request_id,
                            source.remote_url, resp.status_code)
        except httpx.HTTPError as exc:
            self.failures += 1
            log.warning("KV release of %s at %s failed: %r", source.remote_request_id, source.remote_url, exc)

    async def aclose(self, grace_s: float = 1.0) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=grace_s)
        for task in self._pending:
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
