"""Liveness (/health, never authenticated), readiness (/ready) and Prometheus metrics (/metrics)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from adapters_store.residency import ResidencyStats
from server.api.auth import Principal, authenticate
from server.api.errors import error_response, error_responses
from server.api.schemas import HealthStatus, ReadyStatus

router = APIRouter(tags=["health"])
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/health", response_model=HealthStatus)
async def health() -> dict:
    """The process answers (no model or engine check, no API key)."""
    return {"status": "ok"}


@router.get("/ready", response_model=ReadyStatus, responses=error_responses(401, 503))
async def ready(request: Request, principal: Principal = Depends(authenticate)) -> Response:
    """200 once the model is loaded and the engine thread is alive, else 503."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.alive:
        return error_response(503, "not ready: the model is loading or the engine has stopped", "not_ready",
                              headers={"Retry-After": "1"})
    stats = engine.stats()
    return JSONResponse({"status": "ready", "model": request.app.state.served_model_name, "running": stats.running,
                         "waiting": stats.waiting, "mode": stats.mode})


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
    **error_responses(401),
})
async def metrics(request: Request, principal: Principal = Depends(authenticate)) -> Response:
    """Prometheus text; the running/waiting/residency gauges are refreshed from the engine at each scrape."""
    state = request.app.state
    stats = state.engine.stats()
    m = state.metrics
    m.requests_running.set(stats.running)
    m.requests_waiting.set(stats.waiting)
    m.kv_rows_used.set(stats.kv_rows_used)
    _sync_residency(state, await asyncio.to_thread(lambda: state.residency.stats))
    return Response(m.render(), media_type=PROMETHEUS_TEXT)


def _sync_residency(state, now: ResidencyStats) -> None:
    """Copy the residency tiers' counters into the Prometheus metrics (as increments since the last scrape)."""
    m = state.metrics
    last = state.residency_seen
    for counter, tier, field in (
        (m.adapter_loads, "host", "loads_host"), (m.adapter_loads, "device", "loads_device"),
        (m.adapter_evictions, "host", "evictions_host"), (m.adapter_evictions, "device", "evictions_device"),
        (m.residency_hits, "host", "hits_host"), (m.residency_hits, "device", "hits_device"),
    ):
        delta = getattr(now, field) - getattr(last, field)
        if delta > 0:
            counter.labels(tier).inc(delta)
    state.residency_seen = now
    m.adapters_resident.labels("device").set(now.device_used)
    m.adapters_resident.labels("host").set(now.host_used)
    m.adapters_resident.labels("disk").set(len(state.store.list()))
