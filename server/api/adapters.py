"""Adapter management: upload, list, get, load/pin, evict/purge, and vLLM's load/unload aliases."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from adapters_store.format import CONFIG_FILE, WEIGHTS_FILE, read_adapter_dir
from adapters_store.store import SHARED, AdapterRecord, StoreQuota
from server.api.auth import PrincipalDep, require_manage, resolve_adapter, scope_namespace, visible_adapters
from server.api.deps import ServicesDep
from server.api.errors import APIError, error_responses
from server.api.keys import Principal
from server.api.schemas import (
    AdapterEvicted,
    AdapterInfo,
    AdapterList,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from server.api.upload import UPLOAD_BODY, read_upload_form
from server.residency import ResidencyInfo
from server.services import ResidencyAPI, Services

router = APIRouter(tags=["adapters"], responses=error_responses(400, 401, 403, 404, 413, 422, 500, 503))


async def adapter_infos(residency: ResidencyAPI, records: list[AdapterRecord]) -> list[dict]:
    """`adapter_info` of each record."""
    infos = await residency.infos(records)
    return [adapter_info(record, info) for record, info in zip(records, infos, strict=True)]


def adapter_info(record: AdapterRecord, info: ResidencyInfo) -> dict:
    """Stored metadata plus residency (tier, pin, in-flight count, requests served, last use as unix time;
    in a cluster, each replica that holds it)."""
    body = AdapterInfo(
        id=record.id, namespace=record.namespace, shared=record.namespace == SHARED, kind=record.kind,
        rank=record.rank, virtual_tokens=record.virtual_tokens, composable=record.composable,
        alpha=record.alpha, target_modules=list(record.target_modules), size_bytes=record.size_bytes,
        sha256=record.sha256, created_at=record.created_at, residency=info.tier, pinned=info.pinned,
        in_flight=info.in_flight, requests_served=info.served, last_used=info.last_used,
        replicas=[asdict(r) for r in info.replicas] or None,
    ).model_dump()
    if body["replicas"] is None:  # a single server has no replicas to list
        del body["replicas"]
    return body


def _store_quota(services: Services, namespace: str) -> StoreQuota | None:
    """The namespace's storage quota (none for shared adapters, which only admins upload)."""
    if namespace == SHARED:
        return None
    quota = services.tenants.quota(namespace)
    return StoreQuota(quota.max_adapters, quota.max_adapter_bytes)


def _pin_cap(services: Services, principal: Principal, record: AdapterRecord) -> int | None:
    """Admins pin as they decide; a user's namespace holds at most its quota of pinned slots."""
    return None if principal.is_admin else services.tenants.quota(record.namespace).max_pins


def _upload_namespace(principal: Principal, tenant: str | None, shared: bool) -> str:
    if shared:
        if tenant is not None:
            raise APIError(400, "give either shared=true or ?tenant=, not both", param="shared")
        if not principal.is_admin:
            raise APIError(403, "only admins may upload shared adapters", param="shared", reason="forbidden")
        return SHARED
    return scope_namespace(principal, tenant) or principal.namespace


async def evict(services: Services, record: AdapterRecord, purge: bool) -> None:
    """Drop from memory (in-flight requests keep their copy until they finish); `purge` deletes it from disk."""
    await services.residency.evict(record)
    if purge:
        await asyncio.to_thread(services.store.delete, record.namespace, record.id)


@router.post("/v1/adapters", status_code=201, response_model=AdapterInfo, openapi_extra=UPLOAD_BODY,
             responses={200: {"model": AdapterInfo, "description": "already stored with the same content"},
                        **error_responses(409)})
async def upload_adapter(request: Request, services: ServicesDep, principal: PrincipalDep, overwrite: bool = False,
                         tenant: str | None = None) -> JSONResponse:
    """Upload a PEFT adapter (multipart `id`, `config`, `weights`; `shared=true` for admins)."""
    with services.tenants.request(principal.tenant):  # an upload counts against the tenant's concurrency
        form = await read_upload_form(request)
        namespace = _upload_namespace(principal, tenant, form.shared)
        store = services.store
        old = store.get(namespace, form.id)
        record, changed = await asyncio.to_thread(store.put, namespace, form.id, form.config, form.weights, overwrite,
                                                  _store_quota(services, namespace))
    if changed and old is not None:
        await services.residency.evict(old)
    [info] = await adapter_infos(services.residency, [record])
    return JSONResponse(info, status_code=201 if changed else 200)


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(services: ServicesDep, principal: PrincipalDep, tenant: str | None = None) -> dict:
    """Adapters the caller can see: users their own and shared ones, admins all (or one tenant's)."""
    records = visible_adapters(services.store, principal, tenant)
    return {"object": "list", "data": await adapter_infos(services.residency, records)}


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterInfo)
async def get_adapter(adapter_id: str, services: ServicesDep, principal: PrincipalDep,
                      tenant: str | None = None) -> dict:
    record = resolve_adapter(services.store, principal, adapter_id, tenant)
    [info] = await adapter_infos(services.residency, [record])
    return info


@router.post("/v1/adapters/{adapter_id}/load", response_model=AdapterInfo)
async def load_adapter(adapter_id: str, services: ServicesDep, principal: PrincipalDep, pin: bool | None = None,
                       tenant: str | None = None) -> dict:
    """Make resident in a device slot now; `?pin=true` keeps it resident, `?pin=false` unpins."""
    record = resolve_adapter(services.store, principal, adapter_id, tenant)
    if pin is not None:
        require_manage(principal, record, "pin or unpin")
    await services.residency.load(record, pin, _pin_cap(services, principal, record))
    [info] = await adapter_infos(services.residency, [record])
    return info


@router.delete("/v1/adapters/{adapter_id}", response_model=AdapterEvicted)
async def evict_adapter(adapter_id: str, services: ServicesDep, principal: PrincipalDep, purge: bool = False,
                        tenant: str | None = None) -> dict:
    """Evict from memory (it stays on disk); `?purge=true` also deletes it from the store."""
    record = resolve_adapter(services.store, principal, adapter_id, tenant)
    require_manage(principal, record, "delete" if purge else "evict")
    await evict(services, record, purge)
    return {"id": record.id, "object": "adapter", "namespace": record.namespace, "evicted": True, "purged": purge}


def _allowed_path(root: Path | None, lora_path: str) -> Path:
    if root is None:
        raise APIError(404, "the vLLM-style adapter routes are off: start the server with --vllm-lora-dir DIR",
                       "not_enabled")
    try:
        root = root.resolve()
        path = (root / lora_path).resolve()
        inside = all(p.resolve().is_relative_to(root) for p in [path, path / CONFIG_FILE, path / WEIGHTS_FILE])
    except (OSError, ValueError) as e:
        raise APIError(400, f"invalid lora_path {lora_path!r}: {e}", param="lora_path") from None
    if not inside:
        raise APIError(403, f"lora_path {lora_path!r} is outside the allow-listed directory --vllm-lora-dir",
                       param="lora_path", reason="forbidden")
    return path


_PLAIN = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "a success message"}}


@router.post("/v1/load_lora_adapter", response_model=None, responses=_PLAIN | error_responses(409))
async def vllm_load_lora_adapter(body: LoadLoraAdapterRequest, services: ServicesDep,
                                 principal: PrincipalDep) -> PlainTextResponse:
    """vLLM alias: store the PEFT directory `lora_path` (under --vllm-lora-dir) as `lora_name` and load it."""
    path = _allowed_path(services.settings.vllm_lora_dir, body.lora_path)
    config, weights = await asyncio.to_thread(read_adapter_dir, path, services.limits)
    record, _ = await asyncio.to_thread(services.store.put, principal.namespace, body.lora_name, config, weights,
                                        False, _store_quota(services, principal.namespace))
    await services.residency.load(record, None)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_model=None, responses=_PLAIN)
async def vllm_unload_lora_adapter(body: UnloadLoraAdapterRequest, services: ServicesDep,
                                   principal: PrincipalDep) -> PlainTextResponse:
    """vLLM alias: evict `lora_name` and delete it from the store."""
    _allowed_path(services.settings.vllm_lora_dir, ".")
    record = resolve_adapter(services.store, principal, body.lora_name)
    require_manage(principal, record, "delete")
    await evict(services, record, purge=True)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
