"""One structured JSON log line per request, request ids, and HTTP-level Prometheus counters."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import LATENCY_BUCKETS

access_log = logging.getLogger("loramux.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class AccessRecord:
    """What the handlers learn about a request; logged as one JSON line when its response ends."""

    request_id: str
    method: str
    path: str
    tenant: str | None = None
    adapter: str | None = None  # "<namespace>/<id>", None for the base model or no generation
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None  # handler start to the first generated token
    queue_s: float | None = None  # arrival at the engine to admission into the running batch
    error: str | None = None
    disconnected: bool = False
    start: float = field(default_factory=time.perf_counter, repr=False)


def access_record(request: Request) -> AccessRecord | None:
    return request.scope.get("state", {}).get("access")


class HttpMetrics:
    """HTTP counters added to the server's Metrics registry."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("loramux_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("loramux_http_request_seconds", "HTTP request duration, to the last body byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=registry)


class AccessLogMiddleware:
    """Pure ASGI (streaming and disconnects pass through untouched): assigns the request id (an incoming
    valid `X-Request-Id` is kept), returns it as a header, and logs the request when its response ends."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        record = AccessRecord(request_id=request_id, method=scope["method"], path=scope["path"])
        scope.setdefault("state", {})["access"] = record
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._finish(scope, record, status)

    @staticmethod
    def _finish(scope: Scope, record: AccessRecord, status: int) -> None:
        elapsed = time.perf_counter() - record.start
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        services = getattr(getattr(scope.get("app"), "state", None), "services", None)
        if services is not None:
            services.http_metrics.requests.labels(record.method, route, str(status)).inc()
            services.http_metrics.latency.labels(route).observe(elapsed)
        line = {k: v for k, v in asdict(record).items() if k != "start" and v is not None and v is not False}
        line.update(event="request", route=route, status=status, e2e_s=round(elapsed, 6))
        if "ttft_s" in line:
            line["ttft_s"] = round(line["ttft_s"], 6)
        access_log.info(json.dumps(line, separators=(",", ":")))
