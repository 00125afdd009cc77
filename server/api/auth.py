"""Who is calling (the bearer key's principal) and which adapters that caller may see and manage.

A tenant never learns that another tenant's adapter exists: lookups only search the caller's own namespace
and the shared one (an admin may address one tenant's with ``?tenant=NAME``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapters_store.errors import AdapterError
from adapters_store.identity import validate_namespace
from adapters_store.store import SHARED, AdapterRecord, AdapterStore
from server.api.errors import APIError
from server.api.keys import Principal


async def authenticate(request: Request) -> Principal:
    """FastAPI dependency: the caller's Principal, which GateMiddleware authenticated from the headers."""
    principal = request.scope.get("state", {}).get("principal")
    if principal is None:  # only /health passes the gate without one
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", "missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"}, reason="unauthorized")
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def scope_namespace(principal: Principal, tenant: str | None) -> str | None:
    """The namespace an admin's ``?tenant=NAME`` addresses (None without it); 403 for a user."""
    if tenant is None:
        return None
    if not principal.is_admin:
        raise APIError(403, "only admins may address another tenant's adapters with ?tenant=", param="tenant",
                       reason="forbidden")
    try:
        return validate_namespace(tenant)
    except AdapterError as e:
        raise APIError(400, e.message, "invalid_tenant", param="tenant") from None


def visible_namespaces(principal: Principal, tenant: str | None) -> list[str]:
    """Where an adapter id is looked up, in order: ``?tenant=`` alone, else own namespace then shared."""
    scoped = scope_namespace(principal, tenant)
    if scoped is not None:
        return [scoped]
    return list(dict.fromkeys([principal.namespace, SHARED]))


def find_adapter(store: AdapterStore, principal: Principal, adapter_id: str,
                 tenant: str | None = None) -> AdapterRecord | None:
    """The adapter this caller means by ``adapter_id``, or None (another tenant's adapter is never found)."""
    for namespace in visible_namespaces(principal, tenant):
        record = store.get(namespace, adapter_id)
        if record is not None:
            return record
    return None


def resolve_adapter(store: AdapterStore, principal: Principal, adapter_id: str,
                    tenant: str | None = None) -> AdapterRecord:
    record = find_adapter(store, principal, adapter_id, tenant)
    if record is None:
        raise APIError(404, f"adapter '{adapter_id}' not found", "adapter_not_found")
    return record


def visible_adapters(store: AdapterStore, principal: Principal, tenant: str | None = None) -> list[AdapterRecord]:
    """Adapters the caller may list: admins every namespace (or the ``?tenant=`` one), users their own + shared."""
    scoped = scope_namespace(principal, tenant)
    if scoped is not None:
        return store.list(scoped)
    if principal.is_admin:
        return store.list()
    return [r for r in store.list() if r.namespace in (principal.namespace, SHARED)]


def require_manage(principal: Principal, record: AdapterRecord, action: str) -> None:
    """Only admins change the residency of shared adapters or delete them (403 for a user)."""
    if record.namespace == SHARED and not principal.is_admin:
        raise APIError(403, f"only admins may {action} the shared adapter '{record.id}'", reason="forbidden")
