"""Where an adapter lives (disk -> host -> device) and the operations that move it, for the HTTP layer.

The host tier is the host cache (``adapters_store/host_cache.py``), the device tier the slot table
(``server/lora/slots.py``). Moves that touch a slot run on the engine thread (``Engine.call``), after the
disk read has happened in a worker thread; reads are thread-safe snapshots.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from adapters_store.host_cache import HostCache
from adapters_store.store import AdapterRecord
from server.engine import Engine
from server.errors import TenantOverQuota
from server.lora.slots import SlotTable


@dataclass(frozen=True)
class ResidencyInfo:
    tier: Literal["disk", "host", "device"]
    slot: int | None  # device slot of the live copy
    pinned: bool
    in_flight: int  # sequences running on it, draining copies included
    served: int  # slot acquisitions so far
    last_used: float | None  # time.monotonic() of the last one


class Residency:
    def __init__(self, host: HostCache, slots: SlotTable, engine: Engine):
        self.host = host
        self.slots = slots
        self.engine = engine

    def info(self, record: AdapterRecord) -> ResidencyInfo:
        ident = record.identity
        device = self.slots.info(ident)
        tier = "device" if device.slot is not None else "host" if self.host.resident(ident) else "disk"
        return ResidencyInfo(tier=tier, slot=device.slot, pinned=device.pinned, in_flight=device.in_flight,
                             served=device.served, last_used=device.last_used)

    async def load(self, record: AdapterRecord, pin: bool | None, pin_cap: int | None = None) -> int:
        """Make resident in a device slot now; `pin` true keeps it there, false unpins, None keeps the pin.

        `pin_cap`: the most slots the adapter's namespace may hold pinned (TenantOverQuota beyond it).
        """
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

    async def evict(self, record: AdapterRecord) -> None:
        """Drop from host and device memory; requests in flight finish with the copy they hold."""
        ident = record.identity
        self.host.evict(ident)
        await self.engine.call(lambda: self.slots.evict(ident))
