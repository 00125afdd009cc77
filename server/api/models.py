"""GET /v1/models: the base model and every adapter the caller can name as `model`."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.auth import PrincipalDep, visible_namespaces
from server.api.deps import ServicesDep
from server.api.errors import error_responses
from server.api.schemas import ModelList

router = APIRouter(tags=["models"], responses=error_responses(401, 403, 422))


@router.get("/v1/models", response_model=ModelList)
async def list_models(services: ServicesDep, principal: PrincipalDep) -> dict:
    """The base model, then the caller's adapters and the shared ones (an own adapter hides a shared one of
    the same id); adapters carry `parent` = the base model."""
    base = services.served_model_name
    max_len = services.engine.max_model_len
    cards = [{"id": base, "object": "model", "created": int(services.started_at), "owned_by": "loramux",
              "root": services.model.source, "parent": None, "max_model_len": max_len}]
    seen = {base}
    for namespace in visible_namespaces(principal, None):
        for record in services.store.list(namespace):
            if record.id in seen:
                continue
            seen.add(record.id)
            cards.append({"id": record.id, "object": "model", "created": int(record.created_at),
                          "owned_by": record.namespace, "root": record.sha256, "parent": base,
                          "max_model_len": max_len})
    return {"object": "list", "data": cards}
