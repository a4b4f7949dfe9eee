"""The worker's HTTP server: an OpenAI-compatible API in front of one emulated engine.

``create_app(config)`` builds a FastAPI app around a ``WorkerRuntime``; the driver runs while the
app's lifespan does. Bodies are read raw (bounded) and decoded with msgspec, never pydantic, and
every error, malformed input or real bug alike, answers with an OpenAI-shaped error body.

Endpoints
- POST /v1/completions, /v1/chat/completions   OpenAI API (+ vLLM's kv_transfer_params handoff)
- GET  /v1/models, /health, /metrics, /load     discovery, liveness, Prometheus, router snapshot
- POST /v1/kv/release                           prefill role: a decode worker has pulled the KV
- GET  /v1/kv_events?after=SEQ[&format=msgpack] buffered KV event batches, [[seq, batch], ...]
- GET  /v1/kv_events/snapshot[?format=msgpack]  every cached block hash, as of sequence `seq` (resync)
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import msgspec
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from emulator.physics.catalog import Catalog
from kvlab.wire import openai_api as api
from kvlab.wire.http_body import read_body
from kvlab.wire.http_errors import install_error_handlers
from kvlab.wire.openai_api import ApiError
from workers import serving
from workers.config import WorkerConfig
from workers.runtime import WorkerRuntime
from workers.serving import json_response

log = logging.getLogger(__name__)


class ReleaseRequest(msgspec.Struct):
    request_id: str


def create_app(config: WorkerConfig, catalog: Catalog | None = None) -> FastAPI:
    runtime = WorkerRuntime(config, catalog)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title=f"kvlab worker {config.worker_id}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    install_error_handlers(app, "worker", log)
    _add_openai_routes(app, runtime)
    _add_ops_routes(app, runtime)
    _add_handoff_routes(app, runtime)
    return app


# -- routes ----------------------------------------------------------------------------------
def _add_openai_routes(app: FastAPI, rt: WorkerRuntime) -> None:
    limit = rt.cfg.max_body_bytes

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = api.decode_request(await read_body(request, limit), api.CompletionRequest)
        return await serving.respond(serving.completion_job(body, rt), rt, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = api.decode_request(await read_body(request, limit), api.ChatCompletionRequest)
        return await serving.respond(serving.chat_job(body, rt), rt, request)

    @app.get("/v1/models")
    async def models() -> Response:
        served = rt.cfg.model_name
        body = api.models_body([served, *sorted(rt.cfg.accepted_models - {served})])
        for card in body["data"]:
            card["max_model_len"] = rt.engine.max_model_len
        return json_response(body)


def _add_ops_routes(app: FastAPI, rt: WorkerRuntime) -> None:
    @app.get("/health")
    async def health() -> Response:
        if rt.healthy:
            return json_response({"status": "ok"})
        return json_response({"status": "engine stopped"}, status=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/load")
    async def load() -> Response:
        return json_response(rt.load())


def _add_handoff_routes(app: FastAPI, rt: WorkerRuntime) -> None:
    @app.post("/v1/kv/release")
    async def kv_release(request: Request) -> Response:
        body = api.decode_request(await read_body(request, 4096), ReleaseRequest)
        return json_response({"request_id": body.request_id, "released": rt.release(body.request_id)})

    @app.get("/v1/kv_events")
    async def kv_events(request: Request) -> Response:
        after, fmt = _int_query(request, "after", -1), request.query_params.get("format", "json")
        batches = rt.events.since(after)
        headers = {"X-KV-Events-First-Seq": str(rt.events.first_seq),
                   "X-KV-Events-Next-Seq": str(rt.events.next_seq)}
        if fmt == "msgpack":
            return Response(msgspec.msgpack.encode(batches), headers=headers, media_type="application/msgpack")
        return json_response(batches, headers=headers)

    @app.get("/v1/kv_events/snapshot")
    async def kv_snapshot(request: Request) -> Response:
        snapshot = rt.kv_snapshot()
        if request.query_params.get("format") == "msgpack":
            return Response(msgspec.msgpack.encode(snapshot), media_type="application/msgpack")
        return json_response(snapshot)


def _int_query(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name} must be an integer", param=name) from None


# -- errors ----------------------------------------------------------------------------------
