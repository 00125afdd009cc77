"""The slot table with a recording slot device: placement, LRU, pinning, users, merging, draining evictions."""

from __future__ import annotations

import itertools
import random
import threading

import pytest
import torch

from adapters_store.errors import NoFreeSlot
from adapters_store.format import LoraAdapter, LoraWeights
from adapters_store.identity import AdapterIdentity
from server.lora.slots import SlotTable


def ident(adapter_id: str, sha: str = "v1") -> AdapterIdentity:
    return AdapterIdentity("acme", adapter_id, sha)


def adapter(i: AdapterIdentity, rank: int = 2) -> LoraAdapter:
    weights = {"model.layers.0.self_attn.q_proj": LoraWeights(A=torch.zeros(rank, 4), B=torch.zeros(4, rank), scale=2)}
    return LoraAdapter(id=i.id, sha256=i.sha256, rank=rank, alpha=4.0, use_rslora=False, target_modules=("q_proj",),
                       weights=weights, size_bytes=0)


class FakeDevice:
    """Records calls; ``contents[slot]`` is (id, sha) of what the slot holds, None when cleared."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.contents: dict[int, tuple[str, str] | None] = {}
        self.folded: int | None = None
        self.fail = False

    def write_slot(self, slot: int, a: LoraAdapter) -> frozenset[int]:
        self.calls.append(("write", slot, a.id))
        if self.fail:
            self.contents[slot] = ("half-written", "")
            raise RuntimeError("device copy failed")
        self.contents[slot] = (a.id, a.sha256)
        return frozenset({slot % 3})

    def clear_slot(self, slot: int) -> None:
        self.calls.append(("clear", slot))
        self.contents[slot] = None

    def fold(self, slot: int | None, rank: int, groups: frozenset[int], dora: bool = False) -> None:
        self.calls.append(("fold", slot, rank, groups))
        self.folded = slot


def make(n_slots: int = 2) -> tuple[SlotTable, FakeDevice]:
    device = FakeDevice()
    ticks = itertools.count(1)
    return SlotTable(n_slots, device, clock=lambda: float(next(ticks))), device


def use(table: SlotTable, i: AdapterIdentity, rank: int = 2) -> int:
    slot = table.acquire(i, adapter(i, rank))
    table.release(slot)
    return slot


def test_acquire_copies_in_once_and_counts_users() -> None:
    table, device = make()
    a = ident("a")
    assert table.slot_of(a) is None and table.info(a).slot is None
    slot = table.acquire(a, adapter(a))
    assert device.contents[slot] == ("a", "v1") and table.identity(slot) == a
    assert table.acquire(a, adapter(a)) == slot and table.info(a).in_flight == 2
    assert [c[0] for c in device.calls] == ["write"]
    table.release(slot)
    table.release(slot)
    info = table.info(a)
    assert (info.slot, info.in_flight, info.served, info.pinned) == (slot, 0, 2, False) and info.last_used == 2.0
    stats = table.stats
    assert (stats.slots, stats.used, stats.loads, stats.hits) == (2, 1, 1, 1)
    assert stats.load_seconds_total > 0
    assert table.ranks()[slot] == 2 and table.groups()[slot] == frozenset({slot % 3})


def test_ranks_are_placed_by_bucket() -> None:
    table, _ = make(n_slots=6)
    slots = [use(table, ident(f"a{i}"), rank) for i, rank in enumerate([4, 16, 4, 16])]
    assert slots == [0, 5, 1, 4]  # each bucket grows from its own end of the table
    assert table.ranks() == [4, 4, 0, 0, 16, 16]


def test_lru_reuses_the_least_recently_used_idle_slot() -> None:
    table, device = make(n_slots=2)
    a, b, c = ident("a"), ident("b"), ident("c")
    slot_a, slot_b = use(table, a), use(table, b)
    use(table, a)  # b is now least recently used
    assert use(table, c) == slot_b and table.slot_of(b) is None
    assert device.calls[-1] == ("write", slot_b, "c")
    assert use(table, b) == slot_a  # a is now the least recently used
    assert table.slot_of(a) is None and table.stats.evictions == 2


def test_pinned_merged_and_in_use_slots_are_never_taken() -> None:
    table, _ = make(n_slots=3)
    a, b, c, d = ident("a"), ident("b"), ident("c"), ident("d")
    table.pin(a, adapter(a))
    slot_b = table.acquire(b, adapter(b))
    slot_c = use(table, c)
    table.merge(slot_c)
    with pytest.raises(NoFreeSlot) as info:
        table.acquire(d, adapter(d))
    err = info.value
    assert err.status == 503 and err.code == "no_free_slot" and err.retry_after == 1.0
    assert "'d'" in err.message and "all 3 slots" in err.message
    assert "1 pinned, 1 merged, 1 in use by in-flight requests" in err.message
    table.merge(None)
    assert table.acquire(d, adapter(d)) == slot_c
    table.release(slot_b)


def test_pin_makes_resident_and_unpin_makes_evictable() -> None:
    table, device = make(n_slots=1)
    a, b = ident("a"), ident("b")
    assert table.pin(a, adapter(a)) == 0 and device.contents[0] == ("a", "v1")
    assert table.pin(a, adapter(a)) == 0 and len(device.calls) == 1 and table.info(a).pinned
    with pytest.raises(NoFreeSlot, match="1 pinned"):
        table.acquire(b, adapter(b))
    table.unpin(a)
    assert not table.info(a).pinned
    assert use(table, b) == 0 and table.slot_of(a) is None
    table.unpin(ident("never-loaded"))


def test_evict_idle_clears_the_slot() -> None:
    table, device = make()
    a = ident("a")
    slot = table.pin(a, adapter(a))
    table.evict(a)
    assert device.calls[-1] == ("clear", slot) and device.contents[slot] is None
    assert table.slot_of(a) is None and not table.info(a).pinned and table.stats.used == 0
    table.evict(ident("never-loaded"))


def test_evict_while_in_use_drains_and_never_hands_it_out() -> None:
    table, device = make(n_slots=2)
    a, other = ident("a"), ident("a-other")
    old = table.acquire(a, adapter(a))
    table.evict(a)
    assert device.contents[old] == ("a", "v1")  # sequences in flight finish with it
    assert (table.info(a).slot, table.info(a).in_flight) == (None, 1)
    new = table.acquire(a, adapter(a))  # a fresh copy, into another slot
    assert new != old and table.slot_of(a) == new and table.info(a).in_flight == 2
    with pytest.raises(NoFreeSlot, match="1 draining after eviction"):
        table.acquire(other, adapter(other))
    table.release(old)
    assert device.calls[-1] == ("clear", old) and device.contents[old] is None
    assert table.acquire(other, adapter(other)) == old
    table.release(new)
    assert table.info(a).in_flight == 0 and table.slot_of(a) == new


def test_a_merged_slot_drains_only_once_unmerged() -> None:
    table, device = make(n_slots=2)
    a = ident("a")
    slot = use(table, a)
    table.merge(slot)
    assert device.folded == slot and table.merged_slot == slot
    assert device.calls[-1] == ("fold", slot, 2, frozenset({slot % 3}))
    table.evict(a)
    assert device.contents[slot] == ("a", "v1") and table.merged_slot == slot
    table.merge(None)
    assert device.folded is None and table.merged_slot is None and device.contents[slot] is None
    with pytest.raises(ValueError, match="empty"):
        table.merge(slot)


def test_overwritten_adapter_is_a_new_identity() -> None:
    table, device = make(n_slots=2)
    v1, v2 = ident("a", "sha-1"), ident("a", "sha-2")
    s1, s2 = table.acquire(v1, adapter(v1)), table.acquire(v2, adapter(v2))
    assert s1 != s2 and device.contents[s1] == ("a", "sha-1") and device.contents[s2] == ("a", "sha-2")
    table.release(s1)
    table.evict(v1)
    assert device.contents[s1] is None and device.contents[s2] == ("a", "sha-2") and table.slot_of(v2) == s2


def test_a_failed_copy_leaves_the_slot_free() -> None:
    table, device = make(n_slots=1)
    a = ident("a")
    device.fail = True
    with pytest.raises(RuntimeError, match="device copy failed"):
        table.acquire(a, adapter(a))
    assert device.calls[-1] == ("clear", 0) and device.contents[0] is None
    assert table.slot_of(a) is None and table.stats.used == 0
    device.fail = False
    assert table.acquire(a, adapter(a)) == 0 and table.info(a).served == 1


def test_release_without_users_is_an_error() -> None:
    table, _ = make()
    with pytest.raises(ValueError, match="no users"):
        table.release(0)
    with pytest.raises(ValueError, match="no users"):
        table.release(99)
    slot = use(table, ident("a"))
    with pytest.raises(ValueError, match="no users"):
        table.release(slot)


def test_no_slots() -> None:
    table, _ = make(n_slots=0)
    with pytest.raises(NoFreeSlot, match="all 0 slots"):
        table.acquire(ident("a"), adapter(ident("a")))


def test_concurrent_readers_always_see_a_consistent_table() -> None:
    """One writer (the engine thread) churns the slots; readers (HTTP threads) see each slot's own adapter."""
    table, device = make(n_slots=3)
    ids = [ident(f"a{i}") for i in range(6)]
    errors: list[str] = []
    done = threading.Event()

    def writer() -> None:
        rng = random.Random(0)
        for _ in range(2000):
            i = rng.choice(ids)
            if rng.random() < 0.05:
                table.evict(i)
                continue
            try:
                slot = table.acquire(i, adapter(i))
            except NoFreeSlot:
                continue
            if device.contents[slot] != (i.id, i.sha256):
                errors.append(f"slot {slot} holds {device.contents[slot]}, expected {i.id}")
            table.release(slot)
        done.set()

    def reader() -> None:  # each call is one consistent snapshot
        while not done.is_set():
            ranks, stats = table.ranks(), table.stats
            if set(ranks) - {0, 2} or stats.used > 3:
                errors.append(f"inconsistent table: ranks {ranks}, {stats.used} used")
            errors.extend(f"{i}: {info}" for i in ids if (info := table.info(i)).in_flight not in (0, 1))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(table.info(i).in_flight == 0 for i in ids)
