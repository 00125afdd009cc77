"""Tiered residency with a fake store and a fake slot loader: LRU, pinning, refcounts, draining evictions."""

from __future__ import annotations

import itertools
import random
import threading
from pathlib import Path

import pytest
import torch

from adapters_store.errors import AdapterNotFound, NoFreeSlot
from adapters_store.format import LoraAdapter, LoraWeights
from adapters_store.residency import Residency
from adapters_store.store import AdapterRecord


def record(adapter_id: str, sha: str = "v1", namespace: str = "acme") -> AdapterRecord:
    return AdapterRecord(
        namespace=namespace,
        id=adapter_id,
        sha256=sha,
        rank=2,
        alpha=4.0,
        target_modules=("q_proj",),
        size_bytes=0,
        created_at=0.0,
        path=Path("/nonexistent"),
    )


class FakeStore:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.gate: threading.Event | None = None
        self.fail: Exception | None = None

    def load(self, rec: AdapterRecord) -> LoraAdapter:
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail is not None:
            raise self.fail
        self.loads.append(rec.key)
        weights = {
            "model.layers.0.self_attn.q_proj": LoraWeights(A=torch.zeros(2, 4), B=torch.zeros(4, 2), scale=2)
        }
        return LoraAdapter(
            id=rec.id,
            sha256=rec.sha256,
            rank=2,
            alpha=4.0,
            use_rslora=False,
            target_modules=("q_proj",),
            weights=weights,
            size_bytes=0,
        )


class FakeLoader:
    """Records calls; ``contents[slot]`` is (id, sha) of what the slot holds, None when cleared."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.contents: dict[int, tuple[str, str] | None] = {}
        self.fail = False
        self.prefer_last = False
        self.choices: list[tuple[int, tuple[int, ...]]] = []

    def load_slot(self, slot: int, adapter: LoraAdapter) -> None:
        self.calls.append(("load", slot, adapter.id))
        if self.fail:
            self.contents[slot] = ("half-written", "")
            raise RuntimeError("device copy failed")
        self.contents[slot] = (adapter.id, adapter.sha256)

    def clear_slot(self, slot: int) -> None:
        self.calls.append(("clear", slot))
        self.contents[slot] = None

    def choose_slot(self, rank: int, free: list[int]) -> int:
        self.choices.append((rank, tuple(free)))
        return free[-1] if self.prefer_last else free[0]


def make(max_device: int = 2, max_host: int = 8) -> tuple[Residency, FakeStore, FakeLoader]:
    store, loader = FakeStore(), FakeLoader()
    ticks = itertools.count(1)
    return Residency(store, loader, max_device, max_host, clock=lambda: float(next(ticks))), store, loader


def use(res: Residency, rec: AdapterRecord) -> int:
    slot = res.acquire(rec)
    res.release(rec, slot)
    return slot


def test_the_loader_places_adapters_among_the_free_slots() -> None:
    res, _, loader = make(max_device=3)
    loader.prefer_last = True
    a, b = record("a"), record("b")
    assert use(res, a) == 2 and use(res, b) == 1
    assert loader.choices == [(2, (0, 1, 2)), (2, (0, 1))]
    assert loader.contents[2] == ("a", "v1") and loader.contents[1] == ("b", "v1")


def test_acquire_loads_through_the_tiers() -> None:
    res, store, loader = make()
    a = record("a")
    assert res.info(a).tier == "disk" and res.slot_of(a) is None
    slot = res.acquire(a)
    assert slot == 0 and loader.contents[0] == ("a", "v1") and store.loads == ["acme/a"]
    info = res.info(a)
    assert (info.tier, info.slot, info.in_flight, info.served, info.pinned) == ("device", 0, 1, 1, False)
    assert res.acquire(a) == 0 and res.info(a).in_flight == 2
    res.release(a)
    res.release(a, 0)
    info = res.info(a)
    assert (info.tier, info.in_flight, info.served) == ("device", 0, 2) and info.last_used is not None
    stats = res.stats
    assert (stats.loads_host, stats.loads_device, stats.hits_device, stats.hits_host) == (1, 1, 1, 0)
    assert (stats.device_slots, stats.device_used, stats.host_used) == (2, 1, 1)
    assert stats.load_host_seconds_total >= stats.load_host_seconds_last >= 0
    assert stats.load_device_seconds_total >= stats.load_device_seconds_last >= 0


def test_lru_evicts_least_recently_used_idle_slot() -> None:
    res, store, loader = make(max_device=2)
    a, b, c = record("a"), record("b"), record("c")
    assert use(res, a) == 0 and use(res, b) == 1
    use(res, a)  # b is now least recently used
    assert use(res, c) == 1
    assert res.info(b).tier == "host" and res.info(a).tier == "device"
    assert loader.calls[-1] == ("load", 1, "c")
    assert use(res, b) == 0  # a is now the least recently used
    assert res.info(a).tier == "host"
    stats = res.stats
    assert (stats.evictions_device, stats.hits_host, store.loads.count("acme/b")) == (2, 1, 1)


def test_pinned_and_in_flight_slots_are_never_taken() -> None:
    res, _, _ = make(max_device=2)
    a, b, c = record("a"), record("b"), record("c")
    assert res.pin(a) == 0
    slot_b = res.acquire(b)
    with pytest.raises(NoFreeSlot) as info:
        res.acquire(c)
    err = info.value
    assert err.status == 503 and err.code == "no_free_slot"
    assert "'c'" in err.message and "all 2 slots" in err.message
    assert "1 pinned" in err.message and "1 in use by in-flight requests" in err.message
    assert res.info(c).tier == "host"  # the disk read happened; nothing else changed
    res.release(b, slot_b)
    assert res.acquire(c) == slot_b
    assert res.info(a).pinned and res.slot_of(a) == 0


def test_pin_makes_resident_and_unpin_makes_evictable() -> None:
    res, _, loader = make(max_device=1)
    a, b = record("a"), record("b")
    assert res.pin(a) == 0 and loader.contents[0] == ("a", "v1")
    assert res.pin(a) == 0 and len(loader.calls) == 1
    with pytest.raises(NoFreeSlot, match="1 pinned"):
        res.acquire(b)
    res.unpin(a)
    assert not res.info(a).pinned
    assert use(res, b) == 0 and res.info(a).tier == "host"
    res.unpin(record("never-loaded"))


def test_evict_idle_adapter() -> None:
    res, store, loader = make()
    a = record("a")
    res.pin(a)
    res.evict(a)
    assert loader.calls[-1] == ("clear", 0) and loader.contents[0] is None
    assert res.info(a).tier == "disk" and not res.info(a).pinned
    stats = res.stats
    assert (stats.evictions_device, stats.evictions_host, stats.device_used, stats.host_used) == (1, 1, 0, 0)
    assert use(res, a) == 0 and store.loads == ["acme/a", "acme/a"]
    res.evict(record("never-loaded"))


def test_evict_while_in_flight_drains_and_never_hands_it_out() -> None:
    res, store, loader = make(max_device=2)
    a, b = record("a"), record("a-other")
    old_slot = res.acquire(a)
    res.evict(a)
    assert loader.contents[old_slot] == ("a", "v1")  # requests in flight finish with it
    info = res.info(a)
    assert (info.tier, info.slot, info.in_flight) == ("disk", None, 1)
    new_slot = res.acquire(a)  # a fresh copy, from disk, into another slot
    assert new_slot != old_slot and store.loads == ["acme/a", "acme/a"]
    assert res.slot_of(a) == new_slot and res.info(a).in_flight == 2
    with pytest.raises(NoFreeSlot, match="1 draining after eviction"):
        res.acquire(b)
    with pytest.raises(ValueError, match="ambiguous"):
        res.release(a)
    res.release(a, old_slot)
    assert loader.calls[-1] == ("clear", old_slot) and loader.contents[old_slot] is None
    assert res.acquire(b) == old_slot
    res.release(a)  # unambiguous again
    assert res.info(a).in_flight == 0 and res.info(a).tier == "device"


def test_overwritten_adapter_is_a_new_identity() -> None:
    res, _, loader = make(max_device=2)
    v1, v2 = record("a", "sha-1"), record("a", "sha-2")
    s1 = res.acquire(v1)
    s2 = res.acquire(v2)
    assert s1 != s2 and loader.contents[s1] == ("a", "sha-1") and loader.contents[s2] == ("a", "sha-2")
    assert res.info(v1).in_flight == 1 and res.info(v2).in_flight == 1
    res.release(v1)
    res.evict(v1)
    assert loader.contents[s1] is None and res.info(v2).tier == "device"
    assert loader.contents[s2] == ("a", "sha-2")


def test_host_tier_is_an_lru_of_its_own() -> None:
    res, store, _ = make(max_device=4, max_host=1)
    a, b = record("a"), record("b")
    first = res.ensure_host(a)
    assert res.ensure_host(a) is first and res.stats.hits_host == 1
    res.ensure_host(b)
    assert res.info(a).tier == "disk" and res.stats.evictions_host == 1
    use(res, a)  # device copy independent of the host copy
    assert res.info(b).tier == "disk" and res.info(a).tier == "device"
    assert store.loads == ["acme/a", "acme/b", "acme/a"]
    uncached, store, _ = make(max_host=0)
    uncached.ensure_host(a)
    uncached.ensure_host(a)
    assert store.loads == ["acme/a", "acme/a"] and uncached.stats.host_used == 0


def test_concurrent_prefetch_reads_disk_once() -> None:
    res, store, _ = make()
    store.gate = threading.Event()
    a = record("a")
    results: list[LoraAdapter] = []
    threads = [threading.Thread(target=lambda: results.append(res.ensure_host(a))) for _ in range(4)]
    for t in threads:
        t.start()
    store.gate.set()
    for t in threads:
        t.join()
    assert store.loads == ["acme/a"] and len(results) == 4 and all(r is results[0] for r in results)


def test_evict_during_host_load_does_not_cache_it() -> None:
    res, store, _ = make()
    store.gate = threading.Event()
    a = record("a")
    worker = threading.Thread(target=res.ensure_host, args=(a,))
    worker.start()
    while not res._loading:
        threading.Event().wait(0.001)
    res.evict(a)
    store.gate.set()
    worker.join()
    assert res.info(a).tier == "disk"


def test_failed_loads_leave_no_trace() -> None:
    res, store, loader = make(max_device=1)
    a = record("a")
    store.fail = AdapterNotFound("gone")
    with pytest.raises(AdapterNotFound):
        res.acquire(a)
    store.fail = None
    loader.fail = True
    with pytest.raises(RuntimeError, match="device copy failed"):
        res.acquire(a)
    assert loader.calls[-1] == ("clear", 0) and loader.contents[0] is None
    assert res.info(a).tier == "host" and res.stats.device_used == 0
    loader.fail = False
    assert res.acquire(a) == 0 and res.info(a).served == 1


def test_release_without_acquire_is_an_error() -> None:
    res, _, _ = make()
    a, b = record("a"), record("b")
    with pytest.raises(ValueError, match="without a matching acquire"):
        res.release(a)
    slot = res.acquire(a)
    with pytest.raises(ValueError, match="without an acquire"):
        res.release(b, slot)
    with pytest.raises(ValueError):
        res.release(a, 99)
    res.release(a, slot)
    with pytest.raises(ValueError):
        res.release(a, slot)


def test_no_device_slots() -> None:
    res, _, _ = make(max_device=0)
    with pytest.raises(NoFreeSlot, match="all 0 slots"):
        res.acquire(record("a"))
    with pytest.raises(ValueError):
        Residency(FakeStore(), FakeLoader(), -1, 1)


def test_concurrent_requests_always_see_their_own_adapter() -> None:
    res, _, loader = make(max_device=3, max_host=2)
    records = [record(f"a{i}") for i in range(6)]
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            rec = rng.choice(records)
            if rng.random() < 0.05:
                res.evict(rec)
                continue
            try:
                slot = res.acquire(rec)
            except NoFreeSlot:
                continue
            if loader.contents[slot] != (rec.id, rec.sha256):
                errors.append(f"slot {slot} holds {loader.contents[slot]}, expected {rec.id}")
            res.release(rec, slot)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(res.info(r).in_flight == 0 for r in records)
