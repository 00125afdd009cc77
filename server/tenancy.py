"""Per-tenant quotas: what one tenant may hold of the server's shared capacity.

Each tenant (with API keys) gets the flags' defaults, which the keys file may change per tenant:

    tenants:
      acme: {max_concurrent: 16, max_waiting: 64, max_pins: 2, max_adapters: 32, max_adapter_mb: 1024}

Without a keys file the server has one local user, bounded by the server's own limits only (the queue, the
slots): no quota applies. ``None`` in a quota means unbounded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from server.errors import TenantOverQuota

_FIELDS = {"max_concurrent": 1, "max_waiting": 1, "max_pins": 0, "max_adapters": 0, "max_adapter_mb": 0}


@dataclass(frozen=True)
class TenantQuota:
    max_concurrent: int | None = None  # generation and upload requests in progress
    max_waiting: int | None = None  # sequences queued in the engine
    max_pins: int | None = None  # device slots pinned
    max_adapters: int | None = None  # adapters stored
    max_adapter_mb: float | None = None  # adapter bytes stored, MiB

    @property
    def max_adapter_bytes(self) -> int | None:
        return None if self.max_adapter_mb is None else int(self.max_adapter_mb * 2**20)


def parse_overrides(raw: Any, where: str) -> dict[str, dict[str, float]]:
    """The keys file's `tenants:` section: {tenant: {field: number}}; ValueError naming the problem."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: 'tenants' must map tenant names to quotas")
    out: dict[str, dict[str, float]] = {}
    for tenant, fields in raw.items():
        if not isinstance(fields, dict) or not set(fields) <= set(_FIELDS):
            raise ValueError(f"{where}: quotas of tenant {tenant!r} must be a mapping with keys from {sorted(_FIELDS)}")
        for name, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < _FIELDS[name]:
                raise ValueError(f"{where}: tenant {tenant!r}: {name} must be a number >= {_FIELDS[name]}, "
                                 f"got {value!r}")
        out[str(tenant)] = dict(fields)
    return out


class TenantPolicy:
    """Quotas by tenant, and the count of each tenant's requests in progress."""

    def __init__(self, default: TenantQuota, overrides: Mapping[str, Mapping[str, float]] | None = None,
                 open_mode: bool = False):
        self.open_mode = open_mode
        self._default = default
        self._overrides = {t: replace(default, **fields) for t, fields in (overrides or {}).items()}
        self._lock = threading.Lock()
        self._in_progress: dict[str | None, int] = {}

    def quota(self, tenant: str | None) -> TenantQuota:
        if self.open_mode:
            return TenantQuota()
        return self._overrides.get(tenant, self._default) if tenant is not None else self._default

    def waiting_cap(self, tenant: str | None) -> int | None:
        return self.quota(tenant).max_waiting

    @contextmanager
    def request(self, tenant: str | None) -> Iterator[None]:
        """Hold one of the tenant's concurrent-request places (429 with Retry-After when none is left)."""
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def acquire(self, tenant: str | None) -> None:
        cap = self.quota(tenant).max_concurrent
        with self._lock:
            count = self._in_progress.get(tenant, 0)
            if cap is not None and count >= cap:
                raise TenantOverQuota(f"tenant '{tenant}' already has {count} requests in progress (limit {cap}, "
                                      "--max-concurrent-per-tenant); retry later")
            self._in_progress[tenant] = count + 1

    def release(self, tenant: str | None) -> None:
        with self._lock:
            count = self._in_progress.get(tenant, 0) - 1
            if count > 0:
                self._in_progress[tenant] = count
            else:
                self._in_progress.pop(tenant, None)

    def in_progress(self, tenant: str | None) -> int:
        with self._lock:
            return self._in_progress.get(tenant, 0)
