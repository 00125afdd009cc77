"""The scheduler: the waiting queue, admission into the running batch, and which adapter is merged.

Each step (engine thread): admit waiting sequences into free KV rows, oldest first, as the router allows,
each taking a reference on its adapter's device slot (a copy from the host copy its request leased when
it was accepted; never a disk read); then apply the router's choice of merged adapter, which is always the
adapter of running sequences (so its slot is resident). A sequence that finds no free slot waits.
``submit`` and ``cancel_waiting`` may be called from other threads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from adapters_store.errors import NoFreeSlot, ServingError
from adapters_store.host_cache import HostCache
from adapters_store.identity import AdapterIdentity
from server.engine_types import Mode
from server.errors import EngineOverloaded, GenerationFailed
from server.lora.slots import SlotTable
from server.metrics import Metrics
from server.router import Router, RouterConfig
from server.sequence import Sequence


@dataclass
class SchedulerConfig:
    mode: Mode = "auto"
    max_batch_size: int = 32  # running sequences (one KV row each)
    max_waiting: int = 256
    merge_share: float = 0.75
    unmerge_share: float = 0.5
    max_turn_s: float = 2.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_rows: int, slots: SlotTable, host: HostCache, metrics: Metrics):
        self.config = config
        self.slots = slots
        self.host = host
        self.metrics = metrics
        self.router = Router(RouterConfig(config.mode, config.merge_share, config.unmerge_share,
                                          max_turn_s=config.max_turn_s))
        self.running: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()  # guards _waiting against submitters
        self._free_rows = list(range(min(config.max_batch_size, kv_rows)))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self.running and not self._waiting

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the samples of one request (all or none); EngineOverloaded when the queue is full."""
        with self._lock:
            if len(self._waiting) + len(seqs) > self.config.max_waiting:
                self.metrics.rejections.labels("queue_full").inc()
                raise EngineOverloaded(
                    f"the waiting queue is full ({len(self._waiting)} of {self.config.max_waiting} sequences)")
            self._waiting.extend(seqs)

    def take_waiting(self, request_id: str | None = None) -> list[Sequence]:
        """Remove and return the waiting sequences of a request (every waiting one for None)."""
        with self._lock:
            taken = [s for s in self._waiting if request_id is None or s.req.request_id == request_id]
            for seq in taken:
                self._waiting.remove(seq)
        return taken

    def schedule(self) -> list[tuple[Sequence, ServingError]]:
        """Admit what fits, then merge what the router picks; returns the sequences that failed to admit."""
        failed = self._admit(time.monotonic())
        self._apply_router()
        return failed

    def release(self, seq: Sequence) -> None:
        """Give back what a finished sequence holds: its KV row, its slot reference, its host lease."""
        if seq in self.running:
            self.running.remove(seq)
            self._free_rows.append(seq.row)
            self._free_rows.sort()
            if seq.slot >= 0:
                self.slots.release(seq.slot)
        seq.row = None
        if seq.host is not None:
            self.host.release(seq.host)
            seq.host = None

    def merged_adapter(self) -> AdapterIdentity | None:
        merged = self.slots.merged_slot
        return None if merged is None else self.slots.identity(merged)

    # -- internals ---------------------------------------------------------------------------------------------

    def _admit(self, now: float) -> list[tuple[Sequence, ServingError]]:
        with self._lock:
            candidates = list(self._waiting)
        self.router.begin_step((s.adapter for s in self.running), [(s.adapter, s.req.arrival) for s in candidates],
                               now)
        failed: list[tuple[Sequence, ServingError]] = []
        for seq in candidates:
            if not self._free_rows:
                break
            if not self.router.may_admit(seq.adapter):
                continue
            if seq.host is not None:
                try:
                    seq.slot = self.slots.acquire(seq.adapter, seq.host.adapter)
                except NoFreeSlot:
                    continue  # waits for a slot
                except Exception as exc:  # the copy into the slot failed: this request fails, not the engine
                    error = exc if isinstance(exc, ServingError) else GenerationFailed(
                        f"could not load adapter '{seq.adapter.id}' into a device slot: {exc}")
                    failed.append((seq, error))
                    self._drop_waiting(seq)
                    continue
            self._drop_waiting(seq)
            seq.row = self._free_rows.pop(0)
            seq.t_admitted = now
            self.metrics.queue_time.observe(now - seq.req.arrival)
            self.running.append(seq)
        return failed

    def _drop_waiting(self, seq: Sequence) -> None:
        with self._lock:
            self._waiting.remove(seq)

    def _apply_router(self) -> None:
        current = self.merged_adapter()
        target = self.router.merged_key([s.adapter for s in self.running], current)
        if target == current:
            return
        slot = None if target is None else next((s.slot for s in self.running if s.adapter == target), None)
        if target is not None and slot is None:  # merged mode: the turn's sequences are not admitted yet
            return
        t0 = time.perf_counter()
        self.slots.merge(slot)
        self.metrics.mode_switches.inc()
        self.metrics.swap_seconds.observe(time.perf_counter() - t0)
