"""API keys and the principals they stand for.

The keys file (YAML or JSON) maps keys to tenants: ``keys: {sk-acme-1: {tenant: acme, role: user}}``, and may
set quotas per tenant (``tenants:``, see ``server/tenancy.py``).
Keys are kept only as sha256 digests, compared with ``hmac.compare_digest`` against every entry (no early
exit), and never logged. Without a keys file the server runs open: one local user with admin rights whose
uploads go to the shared namespace.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from adapters_store.errors import AdapterError
from adapters_store.identity import validate_namespace
from adapters_store.store import SHARED
from server.tenancy import parse_overrides

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

    def __init__(self, keys: dict[str, Principal], quotas: dict[str, dict[str, float]] | None = None):
        if not keys:
            raise ValueError("the API keys file defines no keys")
        self._entries = [(_digest(k), p) for k, p in keys.items()]
        self.quotas = quotas or {}  # tenant -> quota overrides (server/tenancy.py)

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
        return cls(keys, parse_overrides(data.get("tenants"), f"API keys file {path}"))

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


def create_keys_file(path: Path) -> bool:
    """Write a keys file with one fresh admin key if `path` does not exist (mode 0600); True if written."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"sk-admin-{secrets.token_urlsafe(24)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump({"keys": {key: {"tenant": "admin", "role": "admin"}}}, f)
    return True
