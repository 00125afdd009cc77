"""The host tier with a fake store: leases, the LRU of idle copies, evictions, shared reads, failures."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from adapters_store.errors import AdapterNotFound
from adapters_store.format import LoraAdapter, LoraWeights
from adapters_store.host_cache import HostCache
from adapters_store.identity import AdapterIdentity
from adapters_store.store import AdapterRecord


def record(adapter_id: str, sha: str = "v1") -> AdapterRecord:
    return AdapterRecord(identity=AdapterIdentity("acme", adapter_id, sha), rank=2, alpha=4.0,
                         target_modules=("q_proj",), size_bytes=0, created_at=0.0, path=Path("/nonexistent"))


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
        weights = {"model.layers.0.self_attn.q_proj": LoraWeights(A=torch.zeros(2, 4), B=torch.zeros(4, 2), scale=2)}
        return LoraAdapter(id=rec.id, sha256=rec.sha256, rank=2, alpha=4.0, use_rslora=False,
                           target_modules=("q_proj",), weights=weights, size_bytes=0)


def make(max_idle: int = 8) -> tuple[HostCache, FakeStore, list[float]]:
    store, observed = FakeStore(), []
    return HostCache(store, max_idle, on_load=observed.append), store, observed


def test_a_lease_reads_once_and_holds_the_copy() -> None:
    cache, store, observed = make()
    a = record("a")
    assert not cache.resident(a.identity)
    first = cache.lease(a, count=2)
    assert first.leases == 2 and cache.resident(a.identity) and store.loads == ["acme/a"]
    assert cache.lease(a) is first and first.leases == 3
    cache.release(first, 3)
    stats = cache.stats
    assert (stats.loads, stats.hits, stats.idle, stats.leased) == (1, 1, 1, 0)
    assert len(observed) == 1 and observed[0] >= 0 and stats.load_seconds_total >= observed[0]
    with pytest.raises(ValueError, match="holds 0"):
        cache.release(first)


def test_idle_copies_are_an_lru_and_leased_ones_stay() -> None:
    cache, store, _ = make(max_idle=1)
    a, b, c = record("a"), record("b"), record("c")
    held = cache.lease(a)
    cache.release(cache.lease(b))
    cache.release(cache.lease(c))  # b was the only idle copy: c replaces it
    assert cache.resident(a.identity) and not cache.resident(b.identity) and cache.resident(c.identity)
    assert cache.stats.evictions == 1 and cache.stats.leased == 1
    cache.release(held)  # now two idle copies: the least recently used (c) goes
    assert cache.resident(a.identity) and not cache.resident(c.identity)
    assert store.loads == ["acme/a", "acme/b", "acme/c"]


def test_no_idle_copies_with_max_idle_0() -> None:
    cache, store, _ = make(max_idle=0)
    a = record("a")
    held = cache.lease(a)
    assert cache.lease(a) is held  # leased: in memory, shared
    cache.release(held, 2)
    assert not cache.resident(a.identity) and cache.stats.idle == 0
    cache.release(cache.lease(a))
    assert store.loads == ["acme/a", "acme/a"]


def test_evict_detaches_a_leased_copy() -> None:
    cache, store, _ = make()
    a = record("a")
    held = cache.lease(a)
    cache.evict(a.identity)
    assert not cache.resident(a.identity) and held.detached
    fresh = cache.lease(a)  # never handed the evicted copy: read anew
    assert fresh is not held and store.loads == ["acme/a", "acme/a"]
    cache.release(held)
    assert cache.stats.idle == 0  # the detached copy is dropped, not cached
    cache.release(fresh)
    assert cache.stats.idle == 1
    cache.evict(a.identity)
    assert cache.stats.idle == 0 and cache.stats.evictions == 1
    cache.evict(record("never-loaded").identity)


def test_an_overwritten_adapter_is_another_copy() -> None:
    cache, store, _ = make()
    v1, v2 = record("a", "sha-1"), record("a", "sha-2")
    c1, c2 = cache.lease(v1), cache.lease(v2)
    assert c1 is not c2 and (c1.adapter.sha256, c2.adapter.sha256) == ("sha-1", "sha-2")


def test_concurrent_leases_read_the_store_once() -> None:
    cache, store, _ = make()
    store.gate = threading.Event()
    a = record("a")
    copies = []
    threads = [threading.Thread(target=lambda: copies.append(cache.lease(a))) for _ in range(4)]
    for t in threads:
        t.start()
    store.gate.set()
    for t in threads:
        t.join()
    assert store.loads == ["acme/a"] and len(copies) == 4 and all(c is copies[0] for c in copies)
    assert copies[0].leases == 4


def test_evict_during_a_read_keeps_nothing() -> None:
    cache, store, _ = make()
    store.gate = threading.Event()
    a = record("a")
    got = []
    worker = threading.Thread(target=lambda: got.append(cache.lease(a)))
    worker.start()
    while not cache._loading:
        threading.Event().wait(0.001)
    cache.evict(a.identity)
    store.gate.set()
    worker.join()
    assert got[0].detached and not cache.resident(a.identity)  # the request is served, nothing is cached
    cache.release(got[0])
    assert cache.stats.idle == 0


def test_a_failed_read_leaves_no_trace() -> None:
    cache, store, _ = make()
    a = record("a")
    store.fail = AdapterNotFound("gone")
    with pytest.raises(AdapterNotFound):
        cache.lease(a)
    assert not cache.resident(a.identity) and cache.stats.loads == 0 and not cache._loading
    store.fail = None
    assert cache.lease(a).leases == 1


def test_waiters_of_a_failed_read_get_its_error() -> None:
    cache, store, _ = make()
    store.gate, store.fail = threading.Event(), AdapterNotFound("gone")
    a = record("a")
    errors = []

    def lease() -> None:
        try:
            cache.lease(a)
        except AdapterNotFound as e:
            errors.append(e)

    threads = [threading.Thread(target=lease) for _ in range(3)]
    for t in threads:
        t.start()
    store.gate.set()
    for t in threads:
        t.join()
    assert len(errors) == 3 and store.loads == []


def test_negative_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="max_idle=-1"):
        HostCache(FakeStore(), -1)
