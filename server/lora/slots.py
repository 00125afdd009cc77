"""The slot table: the one place that says which adapter version sits in which device slot.

The LoRA runtime preallocates a fixed number of slots (A/B buffers); the table maps each slot to what it
holds: adapter identity, rank, the projection groups it adapts, the sequences running on it, its pin, and
whether it is folded into the base weights (merged). The planner's ranks, the merge and the HTTP listing
all read the table; only the table writes a slot (through its ``SlotDevice``).

A slot is reused only when it is unpinned, not merged and no sequence runs on it; the least recently used
such slot goes first. An adapter evicted while in use *drains*: it is never handed out again, and its slot
is cleared when its last user lets go. An overwritten adapter is a new identity (another slot); the old
version drains. Loading is a copy from a host copy: the table never touches the disk.

Mutations happen on the engine thread (between forwards); reads may come from any thread (a lock keeps
them consistent).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from adapters_store.errors import NoFreeSlot
from adapters_store.format import LoraAdapter
from adapters_store.identity import AdapterIdentity
from server.lora.merge import MergeRefused
from server.lora.plan import ranges, rank_bucket


class SlotDevice(Protocol):
    """The buffers behind the table (the LoRA runtime)."""

    def write_slot(self, slot: int, adapter: LoraAdapter) -> frozenset[int]:
        """Copy the adapter into the slot, overwriting all a previous one left; returns the groups it adapts."""

    def clear_slot(self, slot: int) -> None:
        """Zero the slot so that it contributes nothing."""

    def fold(self, slot: int | None, rank: int, groups: frozenset[int], dora: bool = False) -> None:
        """Make the base weights hold the slot's delta (exactly the originals for None; `dora`: with its row
        scales); MergeRefused, with the weights left at the originals, when that would make them non-finite."""


@dataclass
class Slot:
    identity: AdapterIdentity
    rank: int
    groups: frozenset[int]  # projection groups the adapter adapts
    users: int = 0  # sequences running on it
    pinned: bool = False
    merged: bool = False  # folded into the base weights
    mergeable: bool = True  # False once a fold was refused (non-finite weights): served by side paths only
    draining: bool = False  # evicted while in use: cleared when idle, never handed out again
    kind: str = "lora"  # dora: its tokens are rescaled, and merged it must run alone; ia3: rescaled, never merged
    # (nor is an adapter of the embedding or the head: `mergeable` is False)

    @property
    def busy(self) -> bool:
        return self.users > 0 or self.merged


@dataclass(frozen=True)
class SlotInfo:
    slot: int | None  # the live copy's slot (None: not resident)
    pinned: bool
    in_flight: int  # sequences running on this identity, draining copies included
    served: int  # acquires so far
    last_used: float | None  # clock() of the last acquire


@dataclass
class SlotStats:
    slots: int = 0
    used: int = 0  # slots holding an adapter (draining ones included)
    loads: int = 0  # host -> slot copies
    hits: int = 0  # acquires that found the adapter resident
    evictions: int = 0
    load_seconds_total: float = 0.0


@dataclass
class _Usage:
    served: int = 0
    last_used: float | None = None


class SlotTable:
    def __init__(self, n_slots: int, device: SlotDevice, clock: Callable[[], float] = time.monotonic,
                 on_load: Callable[[float], None] | None = None) -> None:
        self._device = device
        self._clock = clock
        self._on_load = on_load  # observes each host -> slot copy's seconds (metrics)
        self._lock = threading.Lock()
        self._slots: list[Slot | None] = [None] * n_slots
        self._live: OrderedDict[AdapterIdentity, int] = OrderedDict()  # not draining; least recent first
        self._usage: dict[AdapterIdentity, _Usage] = {}
        self._stats = SlotStats(slots=n_slots)

    # -- engine thread -----------------------------------------------------------------------------------------

    def acquire(self, ident: AdapterIdentity, adapter: LoraAdapter) -> int:
        """The adapter's slot (copied in from `adapter`, its host copy, if not resident) with one more user.

        Raises NoFreeSlot when every slot is pinned, merged or in use. Pair with ``release(slot)``.
        """
        with self._lock:
            slot = self._resident(ident)
            if slot is None:
                slot = self._load(ident, adapter)
            self._slots[slot].users += 1
            usage = self._usage.setdefault(ident, _Usage())
            usage.served += 1
            usage.last_used = self._clock()
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            entry = self._slots[slot] if 0 <= slot < len(self._slots) else None
            if entry is None or entry.users == 0:
                raise ValueError(f"release of slot {slot}, which has no users")
            entry.users -= 1
            self._clear_if_drained(slot)

    def pin(self, ident: AdapterIdentity, adapter: LoraAdapter) -> int:
        """Make resident and keep it so until ``unpin`` or ``evict``; returns the slot."""
        with self._lock:
            slot = self._resident(ident)
            if slot is None:
                slot = self._load(ident, adapter)
            self._slots[slot].pinned = True
            return slot

    def unpin(self, ident: AdapterIdentity) -> None:
        with self._lock:
            slot = self._live.get(ident)
            if slot is not None:
                self._slots[slot].pinned = False

    def evict(self, ident: AdapterIdentity) -> None:
        """Free the adapter's slot; if sequences run on it (or it is merged) it drains first."""
        with self._lock:
            slot = self._live.pop(ident, None)
            if slot is None:
                return
            entry = self._slots[slot]
            entry.pinned = False
            entry.draining = True
            self._clear_if_drained(slot)

    def merge(self, slot: int | None) -> bool:
        """Fold the adapter in `slot` into the base weights (None: restore the originals); False if refused.

        The merged slot counts as in use: it is never reused or cleared while merged. A slot whose fold comes
        out non-finite is refused (and never tried again); the weights are then the originals.
        """
        with self._lock:
            current = self._merged()
            if slot == current:
                return True
            entry = self._slots[slot] if slot is not None else None
            if slot is not None and entry is None:
                raise ValueError(f"merge of slot {slot}, which is empty")
            if entry is not None and not entry.mergeable:
                return False
            refused = False
            try:
                self._device.fold(slot, entry.rank if entry else 0, entry.groups if entry else frozenset(),
                                  entry is not None and entry.kind == "dora")
            except MergeRefused:
                entry.mergeable, refused = False, True
            if current is not None:
                self._slots[current].merged = False
                self._clear_if_drained(current)
            if entry is not None and not refused:
                entry.merged = True
            return not refused

    def mergeable(self, slot: int) -> bool:
        with self._lock:
            entry = self._slots[slot]
            return entry is not None and entry.mergeable

    # -- any thread --------------------------------------------------------------------------------------------

    @property
    def merged_slot(self) -> int | None:
        with self._lock:
            return self._merged()

    def ranks(self) -> list[int]:
        """Rank held by each slot (0 when empty)."""
        with self._lock:
            return [e.rank if e is not None else 0 for e in self._slots]

    def dora_slots(self) -> frozenset[int]:
        """Slots holding DoRA adapters."""
        return self._of_kind("dora")

    def rescaled_slots(self) -> frozenset[int]:
        """Slots whose tokens' outputs are rescaled after their side paths (DoRA and IA3 adapters)."""
        return self._of_kind("dora", "ia3")

    def _of_kind(self, *kinds: str) -> frozenset[int]:
        with self._lock:
            return frozenset(s for s, e in enumerate(self._slots) if e is not None and e.kind in kinds)

    def groups(self) -> list[frozenset[int]]:
        """Projection groups each slot's adapter adapts (empty when the slot is)."""
        with self._lock:
            return [e.groups if e is not None else frozenset() for e in self._slots]

    def identity(self, slot: int) -> AdapterIdentity | None:
        with self._lock:
            entry = self._slots[slot]
            return entry.identity if entry is not None else None

    def slot_of(self, ident: AdapterIdentity) -> int | None:
        with self._lock:
            return self._live.get(ident)

    def pinned_in(self, namespace: str) -> int:
        """Slots pinned by adapters of one namespace."""
        with self._lock:
            return sum(1 for e in self._slots if e is not None and e.pinned and e.identity.namespace == namespace)

    def info(self, ident: AdapterIdentity) -> SlotInfo:
        with self._lock:
            slot = self._live.get(ident)
            usage = self._usage.get(ident, _Usage())
            users = sum(e.users for e in self._slots if e is not None and e.identity == ident)
            pinned = slot is not None and self._slots[slot].pinned
            return SlotInfo(slot=slot, pinned=pinned, in_flight=users, served=usage.served,
                            last_used=usage.last_used)

    @property
    def stats(self) -> SlotStats:
        with self._lock:
            return replace(self._stats, used=sum(e is not None for e in self._slots))

    # -- internals (lock held) ---------------------------------------------------------------------------------

    def _merged(self) -> int | None:
        return next((s for s, e in enumerate(self._slots) if e is not None and e.merged), None)

    def _resident(self, ident: AdapterIdentity) -> int | None:
        slot = self._live.get(ident)
        if slot is not None:
            self._live.move_to_end(ident)
            self._stats.hits += 1
        return slot

    def _load(self, ident: AdapterIdentity, adapter: LoraAdapter) -> int:
        slot = self._take_slot(ident, adapter.rank)
        start = time.perf_counter()
        try:
            groups = self._device.write_slot(slot, adapter)
        except BaseException:
            self._device.clear_slot(slot)
            raise
        elapsed = time.perf_counter() - start
        self._stats.loads += 1
        self._stats.load_seconds_total += elapsed
        if self._on_load is not None:
            self._on_load(elapsed)
        mergeable = adapter.kind != "ia3" and not adapter.edges and adapter.replaces is None
        self._slots[slot] = Slot(ident, adapter.rank, groups, mergeable=mergeable, kind=adapter.kind)
        self._live[ident] = slot
        return slot

    def _take_slot(self, ident: AdapterIdentity, rank: int) -> int:
        """A free slot (placed by rank bucket), else the least recently used idle unpinned one (evicted)."""
        free = [s for s, e in enumerate(self._slots) if e is None]
        if free:
            return place_slot([e.rank if e else 0 for e in self._slots], rank, free)
        for other, slot in self._live.items():
            entry = self._slots[slot]
            if not entry.pinned and not entry.busy:
                del self._live[other]
                self._slots[slot] = None
                self._stats.evictions += 1
                return slot
        live = [self._slots[s] for s in self._live.values()]
        pinned = sum(e.pinned for e in live)
        merged = sum(e.merged and not e.pinned for e in live)
        busy = sum(not e.pinned and not e.merged for e in live)
        raise NoFreeSlot(
            f"no free device slot for adapter '{ident.id}': all {len(self._slots)} slots are taken "
            f"({pinned} pinned, {merged} merged, {busy} in use by in-flight requests, "
            f"{len(self._slots) - len(live)} draining after eviction)"
        )

    def _clear_if_drained(self, slot: int) -> None:
        entry = self._slots[slot]
        if entry.draining and not entry.busy:
            self._slots[slot] = None
            self._stats.evictions += 1
            self._device.clear_slot(slot)


def place_slot(slot_ranks: list[int], rank: int, free: list[int]) -> int:
    """The free slot for a new adapter, keeping each rank bucket's slots contiguous where possible.

    Contiguous slots of one bucket are read as a view by one batched matmul; scattered ones must be
    gathered (copied) every step. A bucket already resident grows into the nearest free slot (the side
    with more room on a tie); a new bucket starts in the largest free range: at its edge when that touches
    the end of the table, else in its middle, leaving room to grow both ways.
    slot_ranks: rank held by each slot (0 when empty); free: the free slots, ascending, not empty.
    """
    runs = ranges(free)
    room = {slot: end - start for start, end in runs for slot in range(start, end)}
    bucket = rank_bucket(rank)
    same = [s for s, r in enumerate(slot_ranks) if r and s not in room and rank_bucket(r) == bucket]
    if same:
        return min(free, key=lambda f: (min(abs(f - s) for s in same), -room[f], f))
    start, end = max(runs, key=lambda run: (run[1] - run[0], -run[0]))
    if start == 0:
        return 0
    if end == len(slot_ranks):
        return end - 1
    return (start + end) // 2
