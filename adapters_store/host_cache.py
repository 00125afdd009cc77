"""The host tier: validated adapter copies in CPU memory, read from the store off the engine thread.

A request takes a *lease* on its adapter's host copy when it is accepted (``lease``, which reads the disk
if needed) and gives it back when it ends (``release``). While leased a copy stays in memory, so the
engine thread only ever copies host memory into a device slot: it never reads, hashes or validates a file.
Copies nobody leases are kept in an LRU of ``max_idle`` entries (``--max-cpu-loras``); leased copies are
bounded by the request queue.

Copies are keyed by ``AdapterIdentity``: an overwritten adapter is a new identity. ``evict`` detaches a
copy: its leases keep it until they end, a later lease reads the store anew. Thread-safe; concurrent
leases of an identity that is not in memory share one read.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Protocol

from adapters_store.format import LoraAdapter
from adapters_store.identity import AdapterIdentity
from adapters_store.store import AdapterRecord


class AdapterSource(Protocol):
    def load(self, record: AdapterRecord) -> LoraAdapter:
        """Read, verify and parse the record's files (``AdapterStore.load``)."""


@dataclass(eq=False)
class HostCopy:
    """One adapter version in host memory and the leases on it."""

    identity: AdapterIdentity
    adapter: LoraAdapter
    leases: int = 0
    detached: bool = False  # evicted: dropped when the last lease ends, never handed out again


@dataclass
class HostStats:
    loads: int = 0  # store reads
    hits: int = 0  # leases served from memory
    evictions: int = 0  # idle copies dropped (LRU or evict)
    load_seconds_total: float = 0.0
    capacity: int = 0  # idle copies kept
    idle: int = 0
    leased: int = 0


class HostCache:
    def __init__(self, source: AdapterSource, max_idle: int,
                 on_load: Callable[[float], None] | None = None) -> None:
        if max_idle < 0:
            raise ValueError(f"max_idle={max_idle} must be >= 0")
        self._source = source
        self._max_idle = max_idle
        self._on_load = on_load  # observes each store read's seconds (metrics)
        self._lock = threading.Lock()
        self._copies: dict[AdapterIdentity, HostCopy] = {}  # attached copies, leased or idle
        self._idle: OrderedDict[AdapterIdentity, None] = OrderedDict()  # attached, unleased; least recent first
        self._loading: dict[AdapterIdentity, Future[LoraAdapter]] = {}
        self._evicted_while_loading: set[AdapterIdentity] = set()
        self._stats = HostStats(capacity=max_idle)

    def lease(self, record: AdapterRecord, count: int = 1) -> HostCopy:
        """The record's host copy with `count` leases taken (reads the store if needed; blocking).

        Store errors (AdapterNotFound after a purge, AdapterCorrupt) propagate; nothing is leased then.
        """
        ident = record.identity
        while True:
            with self._lock:
                copy = self._copies.get(ident)
                if copy is not None:
                    self._stats.hits += 1
                    return self._take(copy, count)
                future = self._loading.get(ident)
                owner = future is None
                if owner:
                    future = self._loading[ident] = Future()
            if not owner:
                error = future.exception()  # waits for the other reader
                if error is not None:
                    raise error
                continue  # its copy is attached now (unless evicted meanwhile: then read anew)
            return self._read(record, future, count)

    def release(self, copy: HostCopy, count: int = 1) -> None:
        with self._lock:
            if copy.leases < count:
                raise ValueError(f"release of {count} leases on adapter {copy.identity}, which holds {copy.leases}")
            copy.leases -= count
            if copy.leases == 0 and not copy.detached:
                self._idle[copy.identity] = None
                self._trim()

    def evict(self, ident: AdapterIdentity) -> None:
        """Drop the copy from memory; its leases keep it until they end (it is never handed out again)."""
        with self._lock:
            if ident in self._loading:
                self._evicted_while_loading.add(ident)
            copy = self._copies.pop(ident, None)
            if copy is None:
                return
            copy.detached = True
            if ident in self._idle:
                del self._idle[ident]
                self._stats.evictions += 1

    def resident(self, ident: AdapterIdentity) -> bool:
        with self._lock:
            return ident in self._copies

    def identities(self) -> list[AdapterIdentity]:
        """The versions held in host memory now."""
        with self._lock:
            return list(self._copies)

    @property
    def stats(self) -> HostStats:
        with self._lock:
            leased = sum(c.leases > 0 for c in self._copies.values())
            return replace(self._stats, idle=len(self._idle), leased=leased)

    # -- internals ---------------------------------------------------------------------------------------------

    def _take(self, copy: HostCopy, count: int) -> HostCopy:
        copy.leases += count
        self._idle.pop(copy.identity, None)
        return copy

    def _read(self, record: AdapterRecord, future: Future[LoraAdapter], count: int) -> HostCopy:
        ident = record.identity
        start = time.perf_counter()
        try:
            adapter = self._source.load(record)
        except BaseException as e:
            with self._lock:
                del self._loading[ident]
                self._evicted_while_loading.discard(ident)
            future.set_exception(e)
            raise
        elapsed = time.perf_counter() - start
        if self._on_load is not None:
            self._on_load(elapsed)
        with self._lock:
            del self._loading[ident]
            self._stats.loads += 1
            self._stats.load_seconds_total += elapsed
            copy = HostCopy(ident, adapter)
            if ident in self._evicted_while_loading:  # evicted meanwhile: serve this request, keep nothing
                self._evicted_while_loading.discard(ident)
                copy.detached = True
            else:
                self._copies[ident] = copy
            self._take(copy, count)
        future.set_result(adapter)
        return copy

    def _trim(self) -> None:
        while len(self._idle) > self._max_idle:
            ident, _ = self._idle.popitem(last=False)
            del self._copies[ident]
            self._stats.evictions += 1
