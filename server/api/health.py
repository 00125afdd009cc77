"""Liveness (/health, never authenticated), readiness (/ready) and Prometheus metrics (/metrics)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.auth import PrincipalDep
from server.api.deps import ServicesDep
from server.api.errors import APIError, error_response, error_responses
from server.api.schemas import HealthStatus, ReadyStatus

router = APIRouter(tags=["health"])
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/health", response_model=HealthStatus, responses=error_responses(503))
async def health(request: Request) -> Response:
    """Liveness, no API key: 200 while the process serves (the model may still be loading); 503 once the engine
    has stopped, so that an orchestrator restarts the process."""
    services = getattr(request.app.state, "services", None)
    if services is not None and not services.engine.alive:
        return error_response(503, "the engine has stopped: restart the server", "engine_stopped")
    return JSONResponse({"status": "ok"})


@router.get("/ready", response_model=ReadyStatus, responses=error_responses(401, 503))
async def ready(services: ServicesDep, principal: PrincipalDep) -> Response:
    """200 once the model is loaded and the engine thread is alive, else 503."""
    if not services.engine.alive:
        return error_response(503, "not ready: the model is loading or the engine has stopped", "not_ready",
                              headers={"Retry-After": "1"})
    stats = services.engine.stats()
    return JSONResponse({"status": "ready", "model": services.served_model_name, "running": stats.running,
                         "waiting": stats.waiting, "mode": stats.mode})


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
    **error_responses(401, 403),
})
async def metrics(services: ServicesDep, principal: PrincipalDep) -> Response:
    """Prometheus text, for admins: its series name every tenant's adapters (gauges and residency counters are
    read from their owners at each scrape)."""
    if not principal.is_admin:
        raise APIError(403, "only admins may read /metrics: its series name every tenant's adapters",
                       reason="forbidden")
    return Response(await asyncio.to_thread(services.metrics.render), media_type=PROMETHEUS_TEXT)
