"""Tiered residency of adapters: disk (the store) -> host (CPU copies, LRU) -> device slots.

Device slots are a fixed table (the LoRA runtime preallocates one A/B buffer set per slot). An entry is
identified by ``(record.key, record.sha256)``, so an overwritten adapter is a new entry and the old one keeps
its slot until its last in-flight request releases it. A slot is reused only when its entry is unpinned and
has no in-flight requests; the least recently used such entry goes first. An evicted entry that is still in
flight *drains*: it is never handed out again, and its slot is cleared when its refcount reaches 0.

All methods are thread-safe. Disk reads happen outside the lock (one load per adapter, however many threads
ask); ``SlotLoader`` calls happen under it, so slot contents always match the table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from adapters_store.errors import NoFreeSlot
from adapters_store.format import LoraAdapter
from adapters_store.store import AdapterRecord, AdapterStore

logger = logging.getLogger(__name__)

Identity = tuple[str, str]  # (record.key, record.sha256)


class SlotLoader(Protocol):
    """Device side of residency, implemented by the server's LoRA runtime."""

    def load_slot(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy the adapter's A/B and scales into the slot, overwriting all a previous adapter left."""

    def clear_slot(self, slot: int) -> None:
        """Zero the slot so that it contributes nothing."""

    def choose_slot(self, rank: int, free: list[int]) -> int:
        """Which of the free slots (ascending, never empty) an adapter of this rank should take."""


@dataclass
class ResidencyInfo:
    tier: Literal["disk", "host", "device"]
    slot: int | None  # device slot of the live copy
    pinned: bool
    in_flight: int  # requests holding this adapter, draining copies included
    served: int  # acquires so far
    last_used: float | None  # clock() of the last acquire


@dataclass
class ResidencyStats:
    """Counters for metrics; ``Residency.stats`` returns a snapshot."""

    loads_host: int = 0  # disk -> host
    loads_device: int = 0  # host -> device slot
    evictions_host: int = 0
    evictions_device: int = 0
    hits_device: int = 0  # acquire found the adapter in a slot
    hits_host: int = 0  # host copy found (no disk read)
    load_host_seconds_last: float = 0.0
    load_host_seconds_total: float = 0.0
    load_device_seconds_last: float = 0.0
    load_device_seconds_total: float = 0.0
    device_slots: int = 0
    device_used: int = 0  # slots holding an adapter (draining ones included)
    host_capacity: int = 0
    host_used: int = 0


@dataclass
class _DeviceEntry:
    ident: Identity
    record: AdapterRecord
    slot: int
    pinned: bool = False
    in_flight: int = 0
    draining: bool = False  # evicted while in flight: cleared when in_flight reaches 0


@dataclass
class _Usage:
    served: int = 0
    last_used: float | None = None


class Residency:
    def __init__(
        self,
        store: AdapterStore,
        loader: SlotLoader,
        max_device: int,
        max_host: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_device < 0 or max_host < 0:
            raise ValueError(f"max_device={max_device} and max_host={max_host} must be >= 0")
        self._store = store
        self._loader = loader
        self._max_host = max_host
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: list[_DeviceEntry | None] = [None] * max_device
        self._device: OrderedDict[Identity, _DeviceEntry] = OrderedDict()  # live entries, least recent first
        self._host: OrderedDict[Identity, LoraAdapter] = OrderedDict()  # least recent first
        self._loading: dict[Identity, Future[LoraAdapter]] = {}
        self._evicted_while_loading: set[Identity] = set()
        self._usage: dict[Identity, _Usage] = {}
        self._stats = ResidencyStats(device_slots=max_device, host_capacity=max_host)

    # -- host tier -----------------------------------------------------------------------------------------

    def ensure_host(self, record: AdapterRecord) -> LoraAdapter:
        """Return the host copy, reading it from the store if needed (concurrent callers share one read)."""
        ident = _ident(record)
        with self._lock:
            adapter = self._host.get(ident)
            if adapter is not None:
                self._host.move_to_end(ident)
                self._stats.hits_host += 1
                return adapter
            future = self._loading.get(ident)
            owner = future is None
            if owner:
                future = self._loading[ident] = Future()
        if not owner:
            return future.result()
        start = time.perf_counter()
        try:
            adapter = self._store.load(record)
        except BaseException as e:
            with self._lock:
                del self._loading[ident]
                self._evicted_while_loading.discard(ident)
            future.set_exception(e)
            raise
        elapsed = time.perf_counter() - start
        with self._lock:
            del self._loading[ident]
            self._stats.loads_host += 1
            self._stats.load_host_seconds_last = elapsed
            self._stats.load_host_seconds_total += elapsed
            if ident in self._evicted_while_loading:
                self._evicted_while_loading.discard(ident)
            elif self._max_host > 0:
                self._host[ident] = adapter
                while len(self._host) > self._max_host:
                    self._host.popitem(last=False)
                    self._stats.evictions_host += 1
        future.set_result(adapter)
        return adapter

    # -- device tier ---------------------------------------------------------------------------------------

    def acquire(self, record: AdapterRecord) -> int:
        """Make the adapter resident in a device slot and take a reference; returns the slot index.

        Raises NoFreeSlot when every slot is pinned or in use. Pair with ``release(record, slot)``.
        """
        ident = _ident(record)
        with self._lock:
            entry = self._device_hit(ident)
            if entry is not None:
                return self._use(entry)
        adapter = self.ensure_host(record)
        with self._lock:
            entry = self._device_hit(ident) or self._load_device(ident, record, adapter)
            return self._use(entry)

    def release(self, record: AdapterRecord, slot: int | None = None) -> None:
        """Drop a reference taken by ``acquire``. Pass the slot it returned: after an evict or while a
        draining copy exists, the same adapter can hold two slots and only the slot says which one."""
        with self._lock:
            entry = self._in_flight_entry(record, slot)
            entry.in_flight -= 1
            if entry.in_flight == 0 and entry.draining:
                self._clear(entry)

    def pin(self, record: AdapterRecord) -> int:
        """Make device-resident and keep it there until ``unpin`` or ``evict``; returns the slot."""
        ident = _ident(record)
        with self._lock:
            entry = self._device.get(ident)
            if entry is not None:
                entry.pinned = True
                self._device.move_to_end(ident)
                return entry.slot
        adapter = self.ensure_host(record)
        with self._lock:
            entry = self._device.get(ident) or self._load_device(ident, record, adapter)
            entry.pinned = True
            return entry.slot

    def unpin(self, record: AdapterRecord) -> None:
        with self._lock:
            entry = self._device.get(_ident(record))
            if entry is not None:
                entry.pinned = False

    def evict(self, record: AdapterRecord) -> None:
        """Drop from host and device. An in-flight device copy drains: its requests finish with it, it is
        never handed out again, and its slot is cleared on the last release. A later acquire loads anew."""
        ident = _ident(record)
        with self._lock:
            if self._host.pop(ident, None) is not None:
                self._stats.evictions_host += 1
            if ident in self._loading:
                self._evicted_while_loading.add(ident)
            entry = self._device.pop(ident, None)
            if entry is None:
                return
            entry.pinned = False
            if entry.in_flight == 0:
                self._clear(entry)
            else:
                entry.draining = True

    # -- queries -------------------------------------------------------------------------------------------

    def info(self, record: AdapterRecord) -> ResidencyInfo:
        ident = _ident(record)
        with self._lock:
            entry = self._device.get(ident)
            usage = self._usage.get(ident, _Usage())
            in_flight = sum(e.in_flight for e in self._slots if e is not None and e.ident == ident)
            if entry is not None:
                tier = "device"
            elif ident in self._host:
                tier = "host"
            else:
                tier = "disk"
            return ResidencyInfo(
                tier=tier,
                slot=entry.slot if entry else None,
                pinned=entry.pinned if entry else False,
                in_flight=in_flight,
                served=usage.served,
                last_used=usage.last_used,
            )

    def slot_of(self, record: AdapterRecord) -> int | None:
        with self._lock:
            entry = self._device.get(_ident(record))
            return entry.slot if entry else None

    @property
    def stats(self) -> ResidencyStats:
        with self._lock:
            used = sum(e is not None for e in self._slots)
            return replace(self._stats, device_used=used, host_used=len(self._host))

    # -- internals (called with the lock held) -------------------------------------------------------------

    def _device_hit(self, ident: Identity) -> _DeviceEntry | None:
        entry = self._device.get(ident)
        if entry is not None:
            self._device.move_to_end(ident)
            self._stats.hits_device += 1
        return entry

    def _use(self, entry: _DeviceEntry) -> int:
        entry.in_flight += 1
        usage = self._usage.setdefault(entry.ident, _Usage())
        usage.served += 1
        usage.last_used = self._clock()
        self._device.move_to_end(entry.ident)
        return entry.slot

    def _load_device(self, ident: Identity, record: AdapterRecord, adapter: LoraAdapter) -> _DeviceEntry:
        slot = self._take_slot(record, adapter.rank)
        start = time.perf_counter()
        try:
            self._loader.load_slot(slot, adapter)
        except BaseException:
            try:
                self._loader.clear_slot(slot)
            except Exception:
                logger.exception("could not clear slot %d after a failed load", slot)
            raise
        elapsed = time.perf_counter() - start
        entry = _DeviceEntry(ident=ident, record=record, slot=slot)
        self._slots[slot] = entry
        self._device[ident] = entry
        self._stats.loads_device += 1
        self._stats.load_device_seconds_last = elapsed
        self._stats.load_device_seconds_total += elapsed
        return entry

    def _take_slot(self, record: AdapterRecord, rank: int) -> int:
        """A free slot (the loader picks which), else the slot of the least recently used unpinned idle
        entry (evicted)."""
        free = [slot for slot, entry in enumerate(self._slots) if entry is None]
        if free:
            return self._loader.choose_slot(rank, free)
        for ident, entry in self._device.items():
            if not entry.pinned and entry.in_flight == 0:
                del self._device[ident]
                self._slots[entry.slot] = None
                self._stats.evictions_device += 1
                return entry.slot
        live = list(self._device.values())
        pinned = sum(e.pinned for e in live)
        busy = sum(not e.pinned for e in live)
        draining = len(self._slots) - len(live)
        raise NoFreeSlot(
            f"no free device slot for adapter '{record.id}': all {len(self._slots)} slots are taken "
            f"({pinned} pinned, {busy} in use by in-flight requests, {draining} draining after eviction)"
        )

    def _in_flight_entry(self, record: AdapterRecord, slot: int | None) -> _DeviceEntry:
        ident = _ident(record)
        if slot is not None:
            entry = self._slots[slot] if 0 <= slot < len(self._slots) else None
            if entry is None or entry.ident != ident or entry.in_flight == 0:
                raise ValueError(f"release of adapter '{record.key}' from slot {slot} without an acquire")
            return entry
        held = [e for e in self._slots if e is not None and e.ident == ident and e.in_flight > 0]
        if not held:
            raise ValueError(f"release of adapter '{record.key}' without a matching acquire")
        if len(held) > 1:
            raise ValueError(
                f"release of adapter '{record.key}' without a slot is ambiguous: it is in "
                f"flight in slots {[e.slot for e in held]}; pass the slot acquire returned"
            )
        return held[0]

    def _clear(self, entry: _DeviceEntry) -> None:
        self._slots[entry.slot] = None
        self._stats.evictions_device += 1
        try:
            self._loader.clear_slot(entry.slot)
        except Exception:
            logger.exception("could not clear slot %d", entry.slot)


def _ident(record: AdapterRecord) -> Identity:
    return (record.key, record.sha256)
