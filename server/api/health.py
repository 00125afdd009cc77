"""Liveness (/health, never authenticated), readiness (/ready) and Prometheus metrics (/metrics)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.api.auth import PrincipalDep
from server.api.deps import ServicesDep
from server.api.errors import error_response, error_responses
from server.api.schemas import HealthStatus, ReadyStatus

router = APIRouter(tags=["health"])
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/health", response_model=HealthStatus)
async def health() -> dict:
    """The process answers (no model or engine check, no API key)."""
    return {"status": "ok"}


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
    **error_responses(401),
})
async def metrics(services: ServicesDep, principal: PrincipalDep) -> Response:
    """Prometheus text (gauges and residency counters are read from their owners at each scrape)."""
    return Response(await asyncio.to_thread(services.metrics.render), media_type=PROMETHEUS_TEXT)
