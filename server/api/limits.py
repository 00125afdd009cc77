"""What a request may cost before a handler runs: who it is, how large its body, how slowly it arrives.

Pure ASGI middlewares (streaming and disconnects pass through untouched):
- ``GateMiddleware`` authenticates from the headers alone, before any body is read (401 at once), and
  answers 413 for a declared Content-Length over the route's cap;
- ``BodyLimitMiddleware`` enforces that cap while the body streams in (413), and cuts a client that pauses
  longer than the read timeout while sending it (408). The upload route takes `--max-upload-mb`; every
  other route `--max-body-kb`.
"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError, error_response
from server.api.keys import OPEN, KeyTable, Principal

UPLOAD_ROUTE = ("POST", "/v1/adapters")
PUBLIC_PATHS = frozenset({"/health"})


def body_cap(scope: Scope, upload_bytes: int, body_bytes: int) -> tuple[int, str]:
    """(cap, the flag that sets it) for this request's body."""
    if (scope["method"], scope["path"].rstrip("/")) == UPLOAD_ROUTE:
        return upload_bytes, "--max-upload-mb"
    return body_bytes, "--max-body-kb"


def authenticate_headers(keys: KeyTable | None, headers: list[tuple[bytes, bytes]]) -> Principal:
    """The caller's Principal from `Authorization: Bearer KEY` (OPEN without keys); APIError 401 otherwise."""
    if keys is None:
        return OPEN
    raw = dict(headers).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = raw.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", "missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"}, reason="unauthorized")
    principal = keys.lookup(token)
    if principal is None:
        raise APIError(401, "invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                       reason="unauthorized")
    return principal


class GateMiddleware:
    """Authenticates every route but /health from its headers (the principal goes to scope state), then
    refuses a declared body over the route's cap; both before a byte of the body is read."""

    def __init__(self, app: ASGIApp, keys: KeyTable | None, upload_bytes: int, body_bytes: int):
        self.app, self.keys = app, keys
        self.upload_bytes, self.body_bytes = upload_bytes, body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if scope["path"] not in PUBLIC_PATHS:
            try:
                state["principal"] = principal = authenticate_headers(self.keys, scope["headers"])
            except APIError as e:
                await _reject(scope, send, e)
                return
            if state.get("access") is not None:
                state["access"].tenant = principal.tenant
        cap, flag = body_cap(scope, self.upload_bytes, self.body_bytes)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            await _reject(scope, send, APIError(413, _too_large(cap, flag, f"is {int(declared)} bytes"),
                                                "request_too_large", headers={"Connection": "close"}))
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Counts the body as it streams in (413 past the route's cap) and times each part of it (408)."""

    def __init__(self, app: ASGIApp, upload_bytes: int, body_bytes: int, read_timeout: float):
        self.app = app
        self.upload_bytes, self.body_bytes, self.read_timeout = upload_bytes, body_bytes, read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap, flag = body_cap(scope, self.upload_bytes, self.body_bytes)
        received, complete = 0, False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: a handler waiting for the disconnect may wait as long as it likes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                raise HTTPException(408, f"the request body stalled for more than {self.read_timeout:g} s "
                                         "(--read-timeout)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > cap:
                    raise HTTPException(413, _too_large(cap, flag, f"reached {received} bytes"))
            return message

        await self.app(scope, limited_receive, send)


def _too_large(cap: int, flag: str, seen: str) -> str:
    return f"request body {seen}, over the limit of {cap} bytes ({flag})"


async def _reject(scope: Scope, send: Send, error: APIError) -> None:
    services = getattr(getattr(scope.get("app"), "state", None), "services", None)
    if services is not None and error.reason:
        services.metrics.rejections.labels(error.reason).inc()
    response = error_response(error.status, error.message, error.code, headers=error.headers)
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
