"""Where an adapter lives (disk -> host -> device) and the operations that move it, for the HTTP layer.

The host tier is the host cache (``adapters_store/host_cache.py``), the device tier the slot table
(``server/lora/slots.py``). Moves that touch a slot run on the engine thread (``Engine.call``), after the
disk read has happened in a worker thread; reads are thread-safe snapshots.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

from adapters_store.host_cache import HostCache
from adapters_store.identity import AdapterIdentity
from adapters_store.store import AdapterRecord
from server.engine import Engine
from server.errors import InvalidRequest, TenantOverQuota
from server.lora.slots import SlotTable
from server.validation import KIND_NAMES, VIRTUAL_KINDS

Tier = Literal["disk", "host", "device"]


@dataclass(frozen=True)
class ReplicaResidency:
    """Where one cluster replica holds an adapter version."""

    replica: str
    tier: Tier
    slot: int | None
    pinned: bool
    in_flight: int


@dataclass(frozen=True)
class ResidencyInfo:
    tier: Tier  # in a cluster: the best tier over its replicas
    slot: int | None  # device slot of the live copy
    pinned: bool
    in_flight: int  # sequences running on it, draining copies included
    served: int  # slot acquisitions so far
    last_used: float | None  # time.time() of the last one
    replicas: tuple[ReplicaResidency, ...] = ()  # in a cluster: each replica that holds it


class Residency:
    def __init__(self, host: HostCache, slots: SlotTable, engine: Engine):
        self.host = host
        self.slots = slots
        self.engine = engine

    def info(self, ident: AdapterIdentity) -> ResidencyInfo:
        device = self.slots.info(ident)
        tier = "device" if device.slot is not None else "host" if self.host.resident(ident) else "disk"
        last_used = None if device.last_used is None else time.time() - (time.monotonic() - device.last_used)
        return ResidencyInfo(tier=tier, slot=device.slot, pinned=device.pinned, in_flight=device.in_flight,
                             served=device.served, last_used=last_used)

    async def infos(self, records: list[AdapterRecord]) -> list[ResidencyInfo]:
        """`info` of each record, in a worker thread (the slot table's lock is held while a slot loads)."""
        return await asyncio.to_thread(lambda: [self.info(r.identity) for r in records])

    async def load(self, record: AdapterRecord, pin: bool | None, pin_cap: int | None = None) -> int:
        """Make resident in a device slot now; `pin` true keeps it there, false unpins, None keeps the pin.

        `pin_cap`: the most slots the adapter's namespace may hold pinned (TenantOverQuota beyond it).
        """
        if record.kind in VIRTUAL_KINDS:
            return await self._load_virtual(record, pin)
        copy = await asyncio.to_thread(self.host.lease, record)  # the disk read, off the engine thread
        ident = record.identity

        def load() -> int:
            pinned = self.slots.info(ident).pinned
            if pin and not pinned and pin_cap is not None:
                held = self.slots.pinned_in(ident.namespace)
                if held >= pin_cap:
                    raise TenantOverQuota(f"tenant '{ident.namespace}' already pins {held} device slots (limit "
                                          f"{pin_cap}, --max-pins-per-tenant); unpin one first")
            keep = pinned if pin is None else pin
            slot = self.slots.pin(ident, copy.adapter)
            if not keep:
                self.slots.unpin(ident)
            return slot

        try:
            return await self.engine.call(load)
        finally:
            self.host.release(copy)

    async def _load_virtual(self, record: AdapterRecord, pin: bool | None) -> int:
        """A prompt or prefix tuning adapter has no device slot: its host copy is read (and stays cached as the
        host cache's idle copies do); -1. It cannot be pinned (InvalidRequest)."""
        if pin:
            raise InvalidRequest(f"adapter '{record.id}' is {KIND_NAMES[record.kind]} adapter: it holds no device "
                                 "slot, so there is nothing to pin (its virtual tokens are copied per request)")
        self.host.release(await asyncio.to_thread(self.host.lease, record))
        return -1

    async def evict(self, record: AdapterRecord) -> None:
        """Drop from host and device memory; requests in flight finish with the copy they hold."""
        await self.evict_identity(record.identity)

    async def evict_identity(self, ident: AdapterIdentity) -> None:
        self.host.evict(ident)
        await self.engine.call(lambda: self.slots.evict(ident))

    def held(self) -> dict[AdapterIdentity, ResidencyInfo]:
        """Every version resident in host memory or a device slot, with where (a cluster replica reports this;
        an evicted copy still draining is not held)."""
        slots = self.slots
        idents = set(self.host.identities())
        idents.update(i for i in map(slots.identity, range(slots.stats.slots)) if i is not None)
        infos = {ident: self.info(ident) for ident in idents}
        return {ident: info for ident, info in infos.items() if info.tier != "disk"}
