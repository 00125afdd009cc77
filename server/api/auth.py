"""API keys, tenants and who may see which adapter.

The keys file (YAML or JSON) maps keys to tenants: ``keys: {sk-acme-1: {tenant: acme, role: user}}``.
Keys are kept only as sha256 digests, compared with ``hmac.compare_digest`` against every entry (no early
exit), and never logged. Without a keys file the server runs open: one local user with admin rights whose
uploads go to the shared namespace.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from fastapi import Request

from adapters_store.errors import AdapterError
from adapters_store.store import SHARED, AdapterRecord, AdapterStore, validate_namespace
from server.api.errors import APIError

Role = Literal["user", "admin"]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (None when the server runs open), its role and its own namespace."""

    tenant: str | None
    role: Role
    namespace: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


OPEN = Principal(tenant=None, role="admin", namespace=SHARED)


class KeyTable:
    """Digests of the API keys and the principal each one stands for."""

    def __init__(self, keys: dict[str, Principal]):
        if not keys:
            raise ValueError("the API keys file defines no keys")
        self._entries = [(_digest(k), p) for k, p in keys.items()]

    @classmethod
    def from_file(cls, path: Path) -> KeyTable:
        """Read a YAML or JSON keys file; ValueError names the problem (never the key)."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read the API keys file {path}: {e}") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise ValueError(f"API keys file {path}: expected a mapping 'keys: {{KEY: {{tenant, role}}}}'")
        keys: dict[str, Principal] = {}
        for i, (key, spec) in enumerate(entries.items()):
            where = f"API keys file {path}, entry #{i + 1}"
            if not isinstance(key, str) or len(key) < 8:
                raise ValueError(f"{where}: keys must be strings of at least 8 characters")
            if not isinstance(spec, dict) or not isinstance(spec.get("tenant"), str):
                raise ValueError(f"{where}: expected {{tenant: NAME, role: user|admin}}")
            tenant, role = spec["tenant"], spec.get("role", "user")
            try:
                validate_namespace(tenant)
            except AdapterError as e:
                raise ValueError(f"{where}: {e.message}") from None
            if tenant == SHARED:
                raise ValueError(f"{where}: tenant name {SHARED!r} is reserved for shared adapters")
            if role not in ("user", "admin"):
                raise ValueError(f"{where}: role must be 'user' or 'admin', got {role!r}")
            keys[key] = Principal(tenant=tenant, role=role, namespace=tenant)
        return cls(keys)

    def lookup(self, key: str) -> Principal | None:
        presented = _digest(key)
        found = None
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, presented):
                found = principal
        return found

    @property
    def tenants(self) -> int:
        return len({p.tenant for _, p in self._entries})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


async def authenticate(request: Request) -> Principal:
    """FastAPI dependency: the caller's Principal; 401 without a valid bearer key when keys are configured."""
    keys: KeyTable | None = request.app.state.keys
    if keys is None:
        principal = OPEN
    else:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", "missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"}, reason="unauthorized")
        principal = keys.lookup(token)
        if principal is None:
            raise APIError(401, "invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                           reason="unauthorized")
    access = request.scope.get("state", {}).get("access")
    if access is not None:
        access.tenant = principal.tenant
    return principal


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
