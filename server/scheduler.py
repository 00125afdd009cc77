"""The scheduler: the waiting queue, admission into the running batch, and which adapter is merged.

Each step (engine thread): end the sequences that waited longer than the queue timeout; admit waiting
sequences into free KV rows as the router allows, tenants in turn (each tenant's oldest first, so one
tenant's burst never holds back another's request), each taking a reference on its adapter's device slot
(a copy from the host copy its request leased when it was accepted; never a disk read); then apply the
router's choice of merged adapter, which is always the adapter of running sequences (so its slot is
resident). A composed sequence takes a reference on each of its adapters' slots, all or none; it is never
merged. A sequence that finds no free slot waits. Each tenant may hold `waiting_cap(tenant)` queued
sequences. ``submit`` and ``take_waiting`` may be called from other threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from adapters_store.errors import NoFreeSlot, ServingError
from adapters_store.host_cache import HostCache
from adapters_store.identity import AdapterIdentity
from server.engine_types import Mode
from server.errors import EngineOverloaded, GenerationFailed, TenantOverQuota
from server.kv_cache import KVCache
from server.lora.slots import SlotTable
from server.metrics import Metrics
from server.router import Router, RouterConfig
from server.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    mode: Mode = "auto"
    max_batch_size: int = 64  # running sequences
    max_waiting: int = 256
    merge_share: float = 0.75
    unmerge_share: float = 0.5
    max_turn_s: float = 2.0
    queue_timeout: float | None = 120.0  # seconds a sequence may wait for admission (None: forever)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache, slots: SlotTable, host: HostCache, metrics: Metrics,
                 waiting_cap: Callable[[str | None], int | None] = lambda tenant: None):
        self.config = config
        self.cache = cache
        self.waiting_cap = waiting_cap  # tenant -> most sequences it may have queued (None: the queue's size)
        self.slots = slots
        self.host = host
        self.metrics = metrics
        self.router = Router(RouterConfig(config.mode, config.merge_share, config.unmerge_share,
                                          max_turn_s=config.max_turn_s))
        self.running: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        self._queued: Counter[str | None] = Counter()  # waiting sequences per tenant
        self._lock = threading.Lock()  # guards _waiting and _queued against submitters

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self.running and not self._waiting

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the samples of one request (all or none): EngineOverloaded (503) when the queue is full,
        TenantOverQuota (429) when the request's tenant already holds its share of it."""
        tenant = seqs[0].req.tenant
        cap = self.waiting_cap(tenant)
        with self._lock:
            if len(self._waiting) + len(seqs) > self.config.max_waiting:
                self.metrics.rejections.labels("queue_full").inc()
                raise EngineOverloaded(
                    f"the waiting queue is full ({len(self._waiting)} of {self.config.max_waiting} sequences)")
            if cap is not None and self._queued[tenant] + len(seqs) > cap:
                self.metrics.rejections.labels("tenant_queue").inc()
                raise TenantOverQuota(f"tenant '{tenant}' has {self._queued[tenant]} sequences queued and asked "
                                      f"for {len(seqs)} more; its limit is {cap} (--max-waiting-per-tenant)")
            self._waiting.extend(seqs)
            self._queued[tenant] += len(seqs)

    def take_waiting(self, request_id: str | None = None) -> list[Sequence]:
        """Remove and return the waiting sequences of a request (every waiting one for None)."""
        with self._lock:
            taken = [s for s in self._waiting if request_id is None or s.req.request_id == request_id]
            for seq in taken:
                self._unqueue(seq)
        return taken

    def schedule(self) -> list[tuple[Sequence, ServingError]]:
        """Expire, admit what fits, then merge what the router picks; returns the sequences that leave the
        queue with an error (waited too long, or their adapter could not be loaded)."""
        now = time.monotonic()
        self._grow()
        failed = self._expire(now) + self._admit(now)
        self._apply_router()
        return failed

    def release(self, seq: Sequence) -> None:
        """Give back what a finished sequence holds: its KV block (cleared), its slot reference, its host lease."""
        if seq in self.running:
            self.running.remove(seq)
            self._free_block(seq)
            self._release_slots(seq)
        for holder in (seq, *seq.mix):
            if holder.host is not None:
                self.host.release(holder.host)
                holder.host = None
        if seq.virtual_host is not None:
            self.host.release(seq.virtual_host)
            seq.virtual_host = None

    def forget(self, seq: Sequence) -> None:
        """Drop a sequence from the batch whatever it holds (its release failed): its KV block is reusable."""
        if seq in self.running:
            self.running.remove(seq)
            if seq.block is not None:
                self.cache.blocks.free(seq.block)
                seq.block = None

    def merged_adapter(self) -> AdapterIdentity | None:
        merged = self.slots.merged_slot
        return None if merged is None else self.slots.identity(merged)

    # -- internals ---------------------------------------------------------------------------------------------

    def _expire(self, now: float) -> list[tuple[Sequence, ServingError]]:
        timeout = self.config.queue_timeout
        if timeout is None:
            return []
        with self._lock:
            old = [s for s in self._waiting if now - s.req.arrival > timeout]
            for seq in old:
                self._unqueue(seq)
        if old:
            self.metrics.rejections.labels("queue_timeout").inc(len(old))
        return [(seq, EngineOverloaded(f"the request waited {now - seq.req.arrival:.0f} s without a free KV row or "
                                       f"adapter slot (limit {timeout:g} s, --queue-timeout)")) for seq in old]

    def _admit(self, now: float) -> list[tuple[Sequence, ServingError]]:
        with self._lock:
            waiting = list(self._waiting)
        self.router.begin_step((s.adapter for s in self.running), [(s.adapter, s.req.arrival) for s in waiting], now)
        failed: list[tuple[Sequence, ServingError]] = []
        for seq in _tenants_in_turn(waiting):
            if len(self.running) >= self.config.max_batch_size:
                break
            if not self.router.may_admit(seq.adapter):
                continue
            seq.block = self.cache.blocks.alloc(_first_block_tokens(seq, self.cache.max_len))
            if seq.block is None:
                continue  # waits for KV space
            try:
                self._acquire_slots(seq)
            except Exception as exc:
                self.cache.blocks.free(seq.block)
                seq.block = None
                if isinstance(exc, NoFreeSlot):
                    continue  # waits for a slot
                # the copy into the slot failed: this request fails, not the engine
                error = exc if isinstance(exc, ServingError) else GenerationFailed(
                    f"could not load {seq.describe} into device slots: {exc}")
                failed.append((seq, error))
                self._drop_waiting(seq)
                continue
            self._drop_waiting(seq)
            virtual = seq.virtual
            if virtual is not None and virtual.kind == "prefix":  # its keys and values go first in its block
                self.cache.write(seq.block, virtual.tensor)
                seq.fed = virtual.count
            seq.t_admitted = now
            self.metrics.queue_time.observe(now - seq.req.arrival)
            self.running.append(seq)
        return failed

    def _grow(self) -> None:
        """A decoding sequence whose block is full moves to one twice the size; where the arena has none, the
        youngest running sequences give theirs back (preempted, recomputed when re-admitted)."""
        unit = self.cache.unit
        for seq in [s for s in self.running if not s.in_prefill and s.fed >= s.block.tokens(unit)]:
            if seq not in self.running:  # preempted meanwhile
                continue
            want = seq.block.tokens(unit) * 2
            bigger = self.cache.blocks.alloc(want)
            while bigger is None:
                youngest = max(self.running, key=lambda s: (s.t_admitted, s.block.start))
                self._preempt(youngest)
                if youngest is seq:
                    break
                bigger = self.cache.blocks.alloc(want)
            if bigger is not None:
                self.cache.move(seq.block, bigger, seq.fed)
                self._free_block(seq)
                seq.block = bigger

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_block(seq)
        self._release_slots(seq)
        seq.preempted()
        self.metrics.preemptions.inc()
        with self._lock:  # first in line again
            self._waiting.appendleft(seq)
            self._queued[seq.req.tenant] += 1

    def _acquire_slots(self, seq: Sequence) -> None:
        """A slot reference for the sequence's adapter, or for each adapter of its composition (all or none)."""
        if seq.host is not None:
            seq.slot = self.slots.acquire(seq.merge_key, seq.host.adapter)
        taken: list[int] = []
        try:
            for part in seq.mix:
                part.slot = self.slots.acquire(part.identity, part.host.adapter)
                taken.append(part.slot)
        except BaseException:
            for slot in taken:
                self.slots.release(slot)
            for part in seq.mix:
                part.slot = -1
            raise

    def _release_slots(self, seq: Sequence) -> None:
        for holder in (seq, *seq.mix):
            if holder.slot >= 0:
                self.slots.release(holder.slot)
                holder.slot = -1

    def _free_block(self, seq: Sequence) -> None:
        if seq.block is not None:
            self.cache.clear(seq.block, seq.fed)
            self.cache.blocks.free(seq.block)
            seq.block = None

    def _drop_waiting(self, seq: Sequence) -> None:
        with self._lock:
            self._unqueue(seq)

    def _unqueue(self, seq: Sequence) -> None:  # lock held
        self._waiting.remove(seq)
        self._queued[seq.req.tenant] -= 1
        if self._queued[seq.req.tenant] <= 0:
            del self._queued[seq.req.tenant]

    def _apply_router(self) -> None:
        current = self.merged_adapter()
        keys = [s.merge_key for s in self.running]
        target = self.router.merged_key(keys, current)
        if target is not None and any(k != target for k in keys) and self._is_dora(target):
            target = None  # a merged DoRA adapter runs alone: its fold is not a low-rank delta others could subtract
        if target == current:
            return
        slot = None if target is None else next((s.slot for s in self.running if s.merge_key == target), None)
        if target is not None and slot is None:  # merged mode: the turn's sequences are not admitted yet
            return
        if slot is not None and not self.slots.mergeable(slot):  # served by side paths only
            if current is None:
                return
            slot = None
        t0 = time.perf_counter()
        if not self.slots.merge(slot):
            log.warning("adapter %s was not merged: its fold came out non-finite; it runs on side paths", target)
        self.metrics.mode_switches.inc()
        self.metrics.swap_seconds.observe(time.perf_counter() - t0)


    def _is_dora(self, ident: AdapterIdentity) -> bool:
        slot = self.slots.slot_of(ident)
        return slot is not None and slot in self.slots.dora_slots()


def _tenants_in_turn(waiting: list[Sequence]) -> list[Sequence]:
    """The waiting sequences, tenants taking turns (each tenant's in arrival order)."""
    by_tenant: dict[str | None, list[Sequence]] = {}
    for seq in waiting:
        by_tenant.setdefault(seq.req.tenant, []).append(seq)
    queues = list(by_tenant.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


FIRST_OUTPUT_TOKENS = 64  # output tokens the first block of a sequence makes room for; it grows after


def _first_block_tokens(seq: Sequence, max_len: int) -> int:
    """What a sequence's first block must hold: what it prefills, and its first outputs (within its bound)."""
    final = seq.offset + seq.prompt_len + seq.req.params.max_tokens
    return min(final, seq.prefill_to + FIRST_OUTPUT_TOKENS, max_len)
