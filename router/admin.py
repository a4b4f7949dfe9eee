"""The admin API: list, add and remove workers (Authorization: Bearer <admin token>).

An admin is trusted to choose workers, not to break the router by a typo: a new worker must be an
http(s) base URL (no credentials, query or path), with a known role and a short id (ids become
metric labels), not already registered under another id, and not this router itself (a router
routing to itself loops every request until its attempts run out). Everything is checked before the
pool changes, so a refused request leaves nothing behind; each refusal is a 4xx naming the field.
"""
from __future__ import annotations

import hmac
import re
import urllib.parse

import httpx
import msgspec
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from emulator.engine_config import ROLES, is_role
from kvlab.wire.http_body import read_body
from kvlab.wire.openai_api import ApiError
from router.config import WorkerConfig
from router.pool.worker_pool import Worker

ROUTER_ID_HEADER = "x-kvlab-router-id"   # on the router's /health: how it recognises its own URL
_WORKER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")


class NewWorker(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    id: str = ""
    role: str = "both"
    kv_events: str | None = None


def base_url(raw: str) -> str:
    """`raw` as a normalised http(s) base URL, or a 400 naming `url`."""
    try:
        parts = urllib.parse.urlsplit(raw.strip())
        port = parts.port
    except ValueError as exc:
        raise _bad("url", f"invalid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad("url", "url must be an http:// or https:// URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise _bad("url", "url must be a base URL: no credentials, path, query or fragment")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def checked_worker(spec: NewWorker, workers: list[Worker]) -> WorkerConfig:
    """The WorkerConfig to register, after every check that needs no network."""
    if not is_role(spec.role):
        raise _bad("role", f"role must be one of {', '.join(ROLES)}")
    if spec.kv_events is not None and not spec.kv_events.startswith("tcp://"):
        raise _bad("kv_events", "kv_events must be a tcp:// ZMQ endpoint")
    config = WorkerConfig(url=base_url(spec.url), id=spec.id, role=spec.role, kv_events=spec.kv_events)
    if not _WORKER_ID.fullmatch(config.id):
        raise _bad("id", "id must be 1-64 letters, digits or ._:@-")
    for worker in workers:
        if worker.id == config.id:
            raise ApiError(409, f"worker {config.id!r} is already registered", param="id", code="worker_exists")
        if worker.url == config.url:
            raise ApiError(409, f"{config.url} is already registered as worker {worker.id!r}", param="url",
                           code="worker_exists")
    return config


async def refuse_self(client: httpx.AsyncClient, url: str, router_id: str, timeout_s: float) -> None:
    """400 when `url` answers as this very router (whatever name or address reaches it)."""
    try:
        response = await client.get(url + "/health", timeout=timeout_s)
    except httpx.HTTPError:
        return   # nothing answers yet: a worker that is still starting may be registered
    if hmac.compare_digest(response.headers.get(ROUTER_ID_HEADER, ""), router_id):
        raise _bad("url", "url points at this router itself")


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, message, param=field, code="invalid_worker")


def bearer_ok(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def require_metrics_token(request: Request, token: str | None) -> None:
    """/metrics and /cluster name every tenant: with a metrics token set, only its holders see them."""
    if token is not None and not bearer_ok(request, token):
        raise ApiError(401, "a valid metrics token is required", code="invalid_metrics_token")


def add_admin_routes(app: FastAPI, router) -> None:
    def authorize(request: Request) -> None:
        token = router.config.admin_token
        if token is None:
            raise ApiError(403, "the admin API is disabled (no admin token configured)", code="admin_disabled")
        if not bearer_ok(request, token):
            raise ApiError(401, "a valid admin token is required", code="invalid_admin_token")

    def changeable() -> None:
        if router.pool.load is not None:   # each process has its own pool: a change would reach one of them
            raise ApiError(409, "membership is fixed while the router runs several processes (--processes 1 "
                                "lets it change at run time)", code="membership_fixed")

    @app.get("/admin/workers")
    async def list_workers(request: Request) -> Response:
        authorize(request)
        return _json([describe(w) for w in router.pool])

    @app.post("/admin/workers")
    async def add_worker(request: Request) -> Response:
        authorize(request)
        changeable()
        raw = await read_body(request, 64 * 1024)
        try:
            spec = msgspec.json.decode(raw, type=NewWorker)
        except (msgspec.MsgspecError, RecursionError) as exc:
            raise ApiError(400, f"invalid worker: {exc}", code="invalid_worker") from None
        config = checked_worker(spec, list(router.pool))
        await refuse_self(router.client, config.url, router.instance_id, router.config.timeouts.health_s)
        try:
            worker = await router.pool.add(config)
        except ValueError as exc:   # registered meanwhile by a concurrent call
            raise ApiError(409, str(exc), code="worker_exists") from None
        return _json(describe(worker), 201)

    @app.delete("/admin/workers/{worker_id:path}")
    async def remove_worker(worker_id: str, request: Request) -> Response:
        authorize(request)
        changeable()
        if router.pool.get(worker_id) is None:
            raise ApiError(404, f"no worker {worker_id!r}", type_="not_found_error", code="worker_not_found")
        return _json(describe(router.pool.remove(worker_id)))


def describe(worker: Worker) -> dict:
    v = worker.view
    return {"id": worker.id, "url": worker.url, "role": v.role, "up": v.healthy, "in_flight": v.in_flight,
            "running": v.running, "waiting": v.waiting, "kv_usage": v.kv_usage, "models": worker.models}


def _json(payload, status: int = 200) -> Response:
    return Response(msgspec.json.encode(payload), status_code=status, media_type="application/json")
