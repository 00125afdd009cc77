"""Durable adapter store: atomic writes, conflicts, tenants, restart, quarantine and crash safety."""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

import adapters_store.files as files_mod
from adapters_store.errors import (
    AdapterConflict,
    AdapterCorrupt,
    AdapterError,
    AdapterNotFound,
    AdapterValidationError,
)
from adapters_store.format import ModuleShape, ValidationLimits, parse_adapter
from adapters_store.identity import validate_id, validate_namespace
from adapters_store.reader import StoreReader
from adapters_store.store import SHARED, AdapterStore

# q: 16 -> 16, v: 16 -> 8 (GQA-like), two layers
SHAPES = {
    f"model.layers.{i}.self_attn.{p}": ModuleShape(16, 16 if p == "q_proj" else 8)
    for i in range(2)
    for p in ("q_proj", "v_proj")
}
PARSE = functools.partial(parse_adapter, target_shapes=SHAPES, limits=ValidationLimits())


def make_adapter(seed: int = 0, r: int = 4) -> tuple[bytes, bytes]:
    """A PEFT-format adapter (config, safetensors) for SHAPES."""
    gen = torch.Generator().manual_seed(seed)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
    }
    tensors = {}
    for name, shape in SHAPES.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, shape.d_in, generator=gen) / shape.d_in**0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(shape.d_out, r, generator=gen) * 0.1
    return json.dumps(config).encode(), safetensors.torch.save(tensors)


OLD = make_adapter(0)
NEW = make_adapter(1, r=2)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root: file contents, or None for a directory."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def open_store(root: Path, parse: Callable = PARSE) -> AdapterStore:
    return AdapterStore(root, parse)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return open_store(tmp_path / "adapters")


def test_put_get_list_load(store: AdapterStore) -> None:
    record, created = store.put("acme", "a1", *OLD)
    assert created
    assert (record.namespace, record.id, record.key) == ("acme", "a1", "acme/a1")
    assert (record.rank, record.alpha, record.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert record.size_bytes == len(OLD[1])
    assert record.path == store.root / "acme" / "a1"
    assert (record.path / "adapter_config.json").read_bytes() == OLD[0]
    assert (record.path / "adapter_model.safetensors").read_bytes() == OLD[1]
    meta = json.loads((record.path / "meta.json").read_bytes())
    assert meta["sha256"] == record.sha256 and meta["created_at"] == record.created_at
    assert store.get("acme", "a1") == record
    assert store.get("acme", "nope") is None and store.get("globex", "a1") is None
    assert store.list("acme") == [record] and store.list() == [record] and store.list("globex") == []
    adapter = store.load(record)
    assert adapter.sha256 == record.sha256 and adapter.rank == 4
    assert list(adapter.weights) == sorted(SHAPES)


def test_same_content_is_a_no_op(store: AdapterStore) -> None:
    record, _ = store.put("acme", "a1", *OLD)
    before = tree(store.root)
    again, created = store.put("acme", "a1", *OLD)
    assert not created and again == record
    assert tree(store.root) == before


def test_other_content_conflicts_unless_overwrite(store: AdapterStore) -> None:
    old, _ = store.put("acme", "a1", *OLD)
    before = tree(store.root)
    with pytest.raises(AdapterConflict) as info:
        store.put("acme", "a1", *NEW)
    assert info.value.status == 409 and "'a1' already exists" in info.value.message
    assert tree(store.root) == before
    new, created = store.put("acme", "a1", *NEW, overwrite=True)
    assert created and new.sha256 != old.sha256 and new.rank == 2
    assert store.load(new).sha256 == new.sha256
    assert sorted(p.name for p in (store.root / "acme").iterdir()) == ["a1"]
    assert list((store.root / ".tmp").iterdir()) == []


def test_invalid_adapter_changes_nothing(store: AdapterStore) -> None:
    store.put("acme", "a1", *OLD)
    before = tree(store.root)
    bad_config = json.loads(OLD[0]) | {"r": 8}
    for adapter_id, overwrite in (("a2", False), ("a1", True)):
        with pytest.raises(AdapterValidationError) as info:
            store.put("acme", adapter_id, json.dumps(bad_config).encode(), OLD[1], overwrite=overwrite)
        assert info.value.status == 400 and "tensor rank 4" in info.value.message
        with pytest.raises(AdapterValidationError):
            store.put("acme", adapter_id, OLD[0], b"\x00" * 20, overwrite=overwrite)
    assert tree(store.root) == before


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "a..b", "a/b", "../x", ".hidden", "-x", "_x", "x" * 129, "a b", "é"]
)
def test_ids_and_namespaces_validated(store: AdapterStore, bad: str) -> None:
    before = tree(store.root)
    for call in (lambda: store.put("acme", bad, *OLD), lambda: store.put(bad, "a1", *OLD)):
        with pytest.raises(AdapterValidationError) as info:
            call()
        assert info.value.status == 400 and repr(bad) in info.value.message
    with pytest.raises(AdapterValidationError):
        validate_id(bad)
    with pytest.raises(AdapterValidationError, match="invalid namespace"):
        validate_namespace(bad)
    assert tree(store.root) == before


@pytest.mark.parametrize("good", ["a", "Z9", "my-adapter_v1.2", "x" * 128, SHARED])
def test_valid_ids(store: AdapterStore, good: str) -> None:
    assert validate_id(good) == good
    record, _ = store.put(good, good, *OLD)
    assert store.get(good, good) == record


def test_tenants_are_separate_namespaces(store: AdapterStore) -> None:
    acme, _ = store.put("acme", "x", *OLD)
    globex, created = store.put("globex", "x", *NEW)  # same id, other content: no conflict
    shared, _ = store.put(SHARED, "x", *OLD)
    assert created and acme.sha256 != globex.sha256 and shared.sha256 == acme.sha256
    assert [r.key for r in store.list()] == ["acme/x", "globex/x", "shared/x"]
    assert store.list("globex") == [globex]
    assert store.delete("acme", "x")
    assert store.get("globex", "x") == globex and store.get(SHARED, "x") == shared


def test_delete(store: AdapterStore) -> None:
    record, _ = store.put("acme", "a1", *OLD)
    store.put("acme", "a2", *NEW)
    assert store.delete("acme", "a1")
    assert not record.path.exists() and store.get("acme", "a1") is None
    assert not store.delete("acme", "a1") and not store.delete("acme", "never")
    assert list((store.root / ".tmp").iterdir()) == []
    assert [r.id for r in open_store(store.root).list()] == ["a2"]


def test_restart_rebuilds_the_same_index(store: AdapterStore) -> None:
    store.put("acme", "a1", *OLD)
    store.put("acme", "a2", *OLD)
    store.put("globex", "a1", *NEW)
    store.put("acme", "a1", *NEW, overwrite=True)
    store.delete("acme", "a2")
    reopened = open_store(store.root)
    assert reopened.list() == store.list()
    assert [r.key for r in reopened.list()] == ["acme/a1", "globex/a1"]
    assert reopened.quarantined == []
    assert reopened.load(reopened.get("acme", "a1")).rank == 2


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_startup_quarantines_what_must_not_be_served(
    store: AdapterStore, caplog: pytest.LogCaptureFixture
) -> None:
    for adapter_id in ("good", "flipped", "no-meta", "bad-meta", "lying-meta", "missing"):
        store.put("acme", adapter_id, *OLD)
    store.put("acme", "rank4", *make_adapter(3, r=4))
    root = store.root
    _flip_byte(root / "acme/flipped/adapter_model.safetensors")
    (root / "acme/no-meta/meta.json").unlink()
    (root / "acme/bad-meta/meta.json").write_text("{")
    meta = json.loads((root / "acme/lying-meta/meta.json").read_text())
    (root / "acme/lying-meta/meta.json").write_text(json.dumps(meta | {"sha256": "0" * 64}))
    (root / "acme/missing/adapter_config.json").unlink()
    (root / "acme/.tmp-junk").mkdir()  # unknown dot-names are left alone

    strict = functools.partial(parse_adapter, target_shapes=SHAPES, limits=ValidationLimits(max_rank=2))
    with caplog.at_level("ERROR", logger="adapters_store.store"):
        reopened = open_store(root, strict)
    # with max_rank=2 every rank-4 adapter no longer validates; only hash/meta problems name their cause
    reasons = {q.key: q.reason for q in reopened.quarantined}
    assert set(reasons) == {
        f"acme/{n}" for n in ("good", "flipped", "no-meta", "bad-meta", "lying-meta", "missing", "rank4")
    }
    assert "files hash to" in reasons["acme/flipped"]
    assert "unreadable" in reasons["acme/no-meta"] and "unreadable" in reasons["acme/missing"]
    assert "unreadable" in reasons["acme/bad-meta"]
    assert "files hash to" in reasons["acme/lying-meta"] and "0" * 64 in reasons["acme/lying-meta"]
    assert "no longer valid for this server" in reasons["acme/good"] and "max rank 2" in reasons["acme/good"]
    assert reopened.list() == []
    assert "quarantined adapter acme/flipped" in caplog.text
    for entry in reopened.quarantined:
        assert entry.path is not None and entry.path.parent == root / ".quarantine"
        assert entry.reason in (entry.path / "QUARANTINE_REASON.txt").read_text()
    assert sorted(p.name for p in (root / "acme").iterdir()) == [".tmp-junk"]
    again = open_store(root)
    assert again.list() == [] and again.quarantined == []


def test_startup_quarantines_only_corrupt_ones(store: AdapterStore) -> None:
    good, _ = store.put("acme", "good", *OLD)
    store.put("acme", "bad", *OLD)
    _flip_byte(store.root / "acme/bad/adapter_config.json")
    reopened = open_store(store.root)
    assert reopened.list() == [good]
    assert [q.key for q in reopened.quarantined] == ["acme/bad"]
    assert reopened.load(good).sha256 == good.sha256


def test_load_quarantines_corruption_found_later(store: AdapterStore) -> None:
    record, _ = store.put("acme", "a1", *OLD)
    _flip_byte(record.path / "adapter_model.safetensors")
    with pytest.raises(AdapterCorrupt) as info:
        store.load(record)
    assert info.value.status == 500 and "quarantined" in info.value.message
    assert store.get("acme", "a1") is None
    assert [q.key for q in store.quarantined] == ["acme/a1"] and "on load" in store.quarantined[0].reason
    assert not record.path.exists()
    record, created = store.put("acme", "a1", *OLD)  # the id is free again
    assert created and store.load(record).sha256 == record.sha256


def test_load_of_a_replaced_or_deleted_record_is_not_corruption(store: AdapterStore) -> None:
    old, _ = store.put("acme", "a1", *OLD)
    store.put("acme", "a1", *NEW, overwrite=True)
    with pytest.raises(AdapterNotFound, match="deleted or replaced"):
        store.load(old)
    store.delete("acme", "a1")
    with pytest.raises(AdapterNotFound):
        store.load(old)
    assert store.quarantined == []


def test_a_reader_serves_the_versions_it_is_asked_for_and_never_writes(store: AdapterStore, tmp_path: Path) -> None:
    """A cluster replica's view of the ingress's store: from its own mount point, by record."""
    old, _ = store.put("acme", "a1", *OLD)
    (store.root / ".tmp" / "staging").mkdir()  # an upload the writer is staging
    mount = tmp_path / "mounted-elsewhere"
    os.symlink(store.root, mount)
    reader = StoreReader(mount, PARSE)
    assert reader.load(old).sha256 == old.sha256
    new, _ = store.put("acme", "a1", *NEW, overwrite=True)
    before = tree(store.root)
    with pytest.raises(AdapterNotFound, match="deleted or replaced"):
        reader.load(old)  # the files are another version now: not found, never quarantined
    assert reader.load(new).sha256 == new.sha256
    assert tree(store.root) == before
    store.delete("acme", "a1")
    with pytest.raises(AdapterNotFound):
        reader.load(new)
    assert store.quarantined == [] and (store.root / ".tmp" / "staging").is_dir()


def test_errors_keep_their_status_and_code_through_pickling() -> None:
    """A replica's typed errors reach the cluster's ingress whole (Ray pickles them)."""
    error = AdapterError("could not store", status=500, code="storage_error", retry_after=2.0)
    back = pickle.loads(pickle.dumps(error))
    assert (type(back), back.message, back.status, back.code, back.retry_after) == (
        AdapterError, "could not store", 500, "storage_error", 2.0)
    assert str(back) == "could not store"


def test_startup_cleans_temp_leftovers(store: AdapterStore) -> None:
    record, _ = store.put("acme", "a1", *OLD)
    (store.root / ".tmp" / "deadbeef").mkdir()
    (store.root / ".tmp" / "deadbeef" / "adapter_model.safetensors").write_bytes(b"half")
    (store.root / ".tmp" / "stray").write_bytes(b"x")
    reopened = open_store(store.root)
    assert list((store.root / ".tmp").iterdir()) == []
    assert reopened.list() == [record]


def test_interrupted_overwrite_restores_old_version(store: AdapterStore) -> None:
    old, _ = store.put("acme", "a1", *OLD)
    staged = store.root / ".tmp" / "new"
    shutil.copytree(old.path, staged)  # a complete new version waiting in .tmp
    os.replace(old.path, store.root / "acme" / ".a1.old")  # crash right after renaming the old one aside
    reopened = open_store(store.root)
    assert reopened.list() == [old]
    assert sorted(p.name for p in (store.root / "acme").iterdir()) == ["a1"]
    assert reopened.load(old).sha256 == old.sha256


def test_interrupted_overwrite_keeps_committed_new_version(store: AdapterStore, tmp_path: Path) -> None:
    old, _ = store.put("acme", "a1", *OLD)
    shutil.copytree(old.path, tmp_path / "old-copy")
    new, _ = store.put("acme", "a1", *NEW, overwrite=True)
    aside = store.root / "acme" / ".a1.old"
    shutil.copytree(
        tmp_path / "old-copy", aside
    )  # crash after the new version was renamed in, before cleanup
    reopened = open_store(store.root)
    assert reopened.list() == [new]
    assert not aside.exists()


class Faults:
    """Counts filesystem operations of the store; fails the n-th (and, for a crash, every later one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None, crash: bool) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.crash = crash
        targets = [(os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "open"), (shutil, "rmtree")]
        for module, name in targets:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))
        monkeypatch.setattr(files_mod, "open", self._wrap(open), raising=False)

    def _wrap(self, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.fail_at is not None and (
                self.calls == self.fail_at or (self.crash and self.calls > self.fail_at)
            ):
                raise OSError(f"injected fault at operation {self.calls}")
            return fn(*args, **kwargs)

        return wrapper


def _count_ops(
    tmp_path: Path, action: Callable[[AdapterStore], object], setup: Callable[[AdapterStore], object]
) -> int:
    with pytest.MonkeyPatch.context() as mp:
        store = open_store(tmp_path / "count")
        setup(store)
        faults = Faults(mp, None, crash=False)
        action(store)
        return faults.calls


def _state(store: AdapterStore) -> str | None:
    record = store.get("acme", "a1")
    return None if record is None else record.sha256


SCENARIOS = {
    "new": (lambda s: None, lambda s: s.put("acme", "a1", *NEW)),
    "overwrite": (lambda s: s.put("acme", "a1", *OLD), lambda s: s.put("acme", "a1", *NEW, overwrite=True)),
    "delete": (lambda s: s.put("acme", "a1", *OLD), lambda s: s.delete("acme", "a1")),
}


@pytest.mark.parametrize("crash", [False, True], ids=["fault", "crash"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_interrupted_write_leaves_old_or_new_state(tmp_path: Path, scenario: str, crash: bool) -> None:
    """Fail each filesystem step in turn (a crash: that step and all later ones). The operation either
    raises and the old state survives a restart, or returns and the new state does; nothing is left over."""
    setup, action = SCENARIOS[scenario]
    total = _count_ops(tmp_path, action, setup)
    assert total >= 5
    for n in range(1, total + 1):
        root = tmp_path / f"{scenario}-{n}"
        store = open_store(root)
        setup(store)
        old = _state(store)
        with pytest.MonkeyPatch.context() as mp:
            Faults(mp, n, crash)
            try:
                action(store)
                done = True
            except Exception:
                done = False
        if not crash:
            assert (_state(store) != old) == done, n
        reopened = open_store(root)
        assert (_state(reopened) != old) == done, n
        if not crash:
            assert _state(reopened) == _state(store), n
        assert reopened.quarantined == [], n
        record = reopened.get("acme", "a1")
        if record is not None:
            assert reopened.load(record).sha256 == record.sha256
        assert list((root / ".tmp").iterdir()) == []
        ns_dir = root / "acme"
        names = [p.name for p in ns_dir.iterdir()] if ns_dir.exists() else []
        assert names in ([], ["a1"]), (n, names)


def test_concurrent_puts(store: AdapterStore) -> None:
    results: list[tuple[str, bool]] = []
    errors: list[Exception] = []

    def worker(i: int) -> None:
        try:
            record, created = store.put("acme", "same", *OLD)
            results.append((record.sha256, created))
            store.put("acme", f"own-{i}", *make_adapter(i))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(created for _, created in results) == 1 and len({sha for sha, _ in results}) == 1
    assert len(store.list("acme")) == 7
    assert open_store(store.root).list() == store.list()
