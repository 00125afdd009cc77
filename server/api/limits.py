"""Request limits: per-tenant concurrency (429), body size while it streams in (413), sampling bounds (400)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError, error_response

RETRY_AFTER_S = "1"


class TenantLimiter:
    """Counts each tenant's generation requests in progress; beyond the cap a request gets 429 + Retry-After."""

    def __init__(self, max_concurrent: int):
        self.max_concurrent = max_concurrent
        self._lock = threading.Lock()
        self._counts: dict[str | None, int] = {}

    def acquire(self, tenant: str | None) -> None:
        with self._lock:
            count = self._counts.get(tenant, 0)
            if count >= self.max_concurrent:
                who = f"tenant '{tenant}'" if tenant is not None else "this server"
                raise APIError(429, f"{who} already has {count} requests in progress (limit "
                               f"{self.max_concurrent}); retry later", "too_many_concurrent_requests",
                               headers={"Retry-After": RETRY_AFTER_S}, reason="tenant_limit")
            self._counts[tenant] = count + 1

    def release(self, tenant: str | None) -> None:
        with self._lock:
            count = self._counts.get(tenant, 0) - 1
            if count > 0:
                self._counts[tenant] = count
            else:
                self._counts.pop(tenant, None)

    @contextmanager
    def hold(self, tenant: str | None) -> Iterator[None]:
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def in_progress(self, tenant: str | None) -> int:
        with self._lock:
            return self._counts.get(tenant, 0)


class BodyLimitMiddleware:
    """Caps every request body at `limit` bytes while it streams in: a larger Content-Length is answered 413
    before anything is read; a body that passes the limit while it is read fails with 413 right there."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _reject_too_large(scope, send, self.limit, f"is {int(declared)} bytes (Content-Length)")
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, _too_large_message(self.limit, f"reached {received} bytes"))
            return message

        await self.app(scope, counting_receive, send)


def _too_large_message(limit: int, seen: str) -> str:
    return f"request body {seen}, over the limit of {limit} bytes (--max-upload-mb)"


async def _reject_too_large(scope: Scope, send: Send, limit: int, seen: str) -> None:
    services = getattr(getattr(scope.get("app"), "state", None), "services", None)
    if services is not None:
        services.metrics.rejections.labels("body_too_large").inc()
    response = error_response(413, _too_large_message(limit, seen), "request_too_large",
                              headers={"Connection": "close"})
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def check_sampling_limits(*, n: int, stop: list[str], max_n: int, max_stop: int) -> None:
    """Bounds set by the server's flags (400 naming the numbers)."""
    if n > max_n:
        raise APIError(400, f"n={n} is above the server's limit of {max_n} (--max-n, --max-waiting)", param="n",
                       reason="invalid_request")
    if len(stop) > max_stop:
        raise APIError(400, f"{len(stop)} stop strings given, the server's limit is {max_stop} (--max-stop)",
                       param="stop", reason="invalid_request")
