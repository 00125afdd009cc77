"""OpenAI error bodies (`{"error": {"message", "type", "code", "param"}}`) for every error the server returns."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store.errors import ServingError
from server.api.schemas import ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    422: "invalid_request",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}

_DESCRIPTIONS = {
    400: "invalid request", 401: "missing or invalid API key", 403: "not allowed for this key's role",
    404: "not found", 409: "conflict", 413: "body or adapter too large", 422: "invalid request fields",
    429: "tenant over its concurrency limit (see Retry-After)", 500: "internal error",
    503: "overloaded or not ready (see Retry-After)",
}

_REASONS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 413: "body_too_large",
            422: "invalid_request", 429: "tenant_limit"}


class APIError(Exception):
    """An error answered with an OpenAI error body; `headers` (e.g. Retry-After) are sent with it."""

    def __init__(self, status: int, message: str, code: str | None = None, *, param: str | None = None,
                 headers: dict[str, str] | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.param = param
        self.headers = headers or {}
        self.reason = reason or _REASONS.get(status)  # rejection reason for metrics, None if not a rejection


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries: these statuses answer with the OpenAI error body."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(status, "error")} for status in statuses}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "code": code or _CODES.get(status, "error"),
                      "param": param}}


def error_response(status: int, message: str, code: str | None = None, *, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


# Rejection reasons (metrics) beyond those a status implies; the engine counts a full queue itself.
_ERROR_REASONS = {"engine_stopped": "engine_stopped"}


def to_api_error(exc: ServingError | APIError) -> APIError:
    """The HTTP answer of a typed engine or store error: its status, code, message and Retry-After."""
    if isinstance(exc, APIError):
        return exc
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
    return APIError(exc.status, exc.message, exc.code, headers=headers, reason=_ERROR_REASONS.get(exc.code))


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    first = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(p) for p in first if p not in ("body", "query", "path", "header")) or None
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included (422 validation, 404/405 routing), gets the OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _count_rejection(request, exc.reason)
        return error_response(exc.status, exc.message, exc.code, param=exc.param, headers=exc.headers)

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return await _api_error(request, to_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe(list(exc.errors()))
        _count_rejection(request, "invalid_request")
        return error_response(422, message, "invalid_request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        if exc.status_code == 413:
            _count_rejection(request, "body_too_large")
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", "internal_error")


def _count_rejection(request: Request, reason: str | None) -> None:
    services = getattr(request.app.state, "services", None)
    if reason and services is not None:
        services.metrics.rejections.labels(reason).inc()
