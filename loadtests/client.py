"""One shared HTTP client per Locust environment: sends workload requests, reports and records them."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

from loadtests.fast_http import FastClient
from loadtests.llm_measure import StreamResult, fire_locust_events, record, stream_request
from loadtests.options import LoadConfig, load_config
from loadtests.payloads import body, path_for
from loadtests.records import RecordWriter

# httpx logs every request at INFO: thousands of lines a minute under load, drowning Locust's own output.
logging.getLogger("httpx").setLevel(logging.WARNING)


class LLMClient:
    def __init__(self, config: LoadConfig, events):
        self.config = config
        self.events = events
        # One pool for every user and open-loop greenlet: hundreds of concurrent streams are normal near
        # a cluster's knee, so connections are not capped here (the open loop caps requests instead).
        self.http = _http_client(config)
        self.path = path_for(config.api)
        self.records = RecordWriter(config.records) if config.records else None

    def send(self, request, name: str | None = None, messages: Sequence[dict[str, str]] | None = None,
             **extra: Any) -> StreamResult:
        c = self.config
        payload = body(request, c.model, c.api, c.ignore_eos, messages)
        result = StreamResult(sent_at=0.0, time_scale=c.time_scale)
        try:
            stream_request(self.http, self.path, payload, c.keys.headers(request.tenant), result=result)
            fire_locust_events(self.events, result, name or request.archetype, per_gap=c.itl_per_gap,
                               time_scale=c.time_scale)
        finally:
            # Also when the test ends mid-stream (GreenletExit): the timings so far are still data.
            self._record(result, request, extra)
        return result

    def _record(self, result: StreamResult, request, extra: dict[str, Any]) -> None:
        if self.records is None:
            return
        if not result.done and result.error is None and result.sent_at:
            # Cut short: how long it had waited is a lower bound on the latencies it never finished.
            extra = {**extra, "waited": time.time() - result.sent_at}
        self.records.write(record(result, id=request.request_id, archetype=request.archetype, tenant=request.tenant,
                                  prompt_len=len(request.tokens), max_tokens=request.max_tokens, **extra))

    def write(self, row: dict[str, Any]) -> None:
        if self.records is not None:
            self.records.write(row)


def _http_client(config: LoadConfig):
    """geventhttpclient by default (loadtests.fast_http: O(1) pooling, C parsing); httpx on request (it
    honours proxy settings)."""
    if config.http_client == "httpx":
        return httpx.Client(base_url=config.host, timeout=None,
                            limits=httpx.Limits(max_connections=None, max_keepalive_connections=2048))
    return FastClient(config.host, max_connections=config.max_connections)


_clients: dict[int, LLMClient] = {}


def client_for(environment) -> LLMClient:
    client = _clients.get(id(environment))
    if client is None:
        client = _clients[id(environment)] = LLMClient(load_config(environment), environment.events)
    return client
