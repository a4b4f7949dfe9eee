"""OpenAI-shaped error responses and the exception handlers both HTTP servers install."""
from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from kvlab.wire.openai_api import ApiError


def error_response(err: ApiError) -> Response:
    return Response(err.body(), status_code=err.status, headers=err.headers, media_type="application/json")


def install_error_handlers(app: FastAPI, component: str, log: logging.Logger) -> None:
    """Every error leaves as an OpenAI error body; a bug is logged and answered 500, never a crash."""
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), type_=kind,
                                        headers=dict(exc.headers) if exc.headers else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return error_response(ApiError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, f"internal error in the {component}", type_="server_error"))
