"""Durable on-disk adapter store, scoped by namespace (tenant) and indexed in memory.

Layout::

    root/<namespace>/<id>/{adapter_config.json, adapter_model.safetensors, meta.json}
    root/.tmp/          staging area: complete new versions are written and fsynced here, then renamed
    root/.quarantine/   adapters found corrupt (or no longer valid for the base model), never served

A write is committed by one atomic rename of a fully written, fsynced directory. An overwrite first renames
the old version aside to ``root/<namespace>/.<id>.old`` (a name no valid id can take), renames the new one
in, then deletes the old. Start-up empties ``.tmp`` and resolves an interrupted overwrite: if ``<id>`` exists
it is the complete new version and ``.<id>.old`` is deleted, otherwise ``.<id>.old`` is renamed back.
Start-up then rebuilds the index from disk, re-hashing and re-validating every adapter.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from adapters_store.errors import (
    AdapterConflict,
    AdapterCorrupt,
    AdapterError,
    AdapterNotFound,
    AdapterValidationError,
    StorageQuotaExceeded,
)
from adapters_store.files import fsync_dir, fsync_dir_quietly, remove_quietly, replace_directory, stage_directory
from adapters_store.format import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, adapter_sha256
from adapters_store.identity import AdapterIdentity, validate_id, validate_namespace

logger = logging.getLogger(__name__)

SHARED = "shared"  # namespace of adapters usable by every tenant
META_FILE = "meta.json"
TMP_DIR = ".tmp"
QUARANTINE_DIR = ".quarantine"
REASON_FILE = "QUARANTINE_REASON.txt"

ParseFn = Callable[[str, bytes, bytes], LoraAdapter]


@dataclass(frozen=True)
class AdapterRecord:
    """What the index knows about one stored adapter version (the weights stay on disk)."""

    identity: AdapterIdentity
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    created_at: float  # time.time() of the upload
    path: Path  # root/<namespace>/<id>
    kind: str = "lora"  # "lora", "dora", "ia3", "prompt" or "prefix" (LoraAdapter.kind)
    virtual_tokens: int = 0  # prompt and prefix tuning: the positions its virtual tokens take before the prompt
    composable: bool = True  # LoraAdapter.composable: may be weighted or composed

    @property
    def namespace(self) -> str:
        return self.identity.namespace

    @property
    def id(self) -> str:
        return self.identity.id

    @property
    def sha256(self) -> str:
        return self.identity.sha256

    @property
    def key(self) -> str:
        return self.identity.key


@dataclass(frozen=True)
class QuarantineEntry:
    key: str  # "<namespace>/<id>" it was stored under
    reason: str
    path: Path | None  # where it now lies under root/.quarantine (None if it could not be moved)
    at: float  # time.time()


@dataclass(frozen=True)
class StoreQuota:
    """What one namespace may store (None: unbounded)."""

    max_adapters: int | None = None
    max_bytes: int | None = None


class _Corrupt(Exception):
    """An adapter directory that must not be served; the message is the reason."""


class AdapterStore:
    """Thread-safe store of validated adapters; ``parse`` is validation bound to the base model."""

    def __init__(self, root: Path, parse: ParseFn) -> None:
        self.root = Path(root)
        self._parse = parse
        self._lock = threading.Lock()
        self._index: dict[str, AdapterRecord] = {}
        self._quarantined: list[QuarantineEntry] = []
        self._tmp = self.root / TMP_DIR
        self._quarantine_dir = self.root / QUARANTINE_DIR
        self._start_up()

    # -- queries -------------------------------------------------------------------------------------------

    def get(self, namespace: str, adapter_id: str) -> AdapterRecord | None:
        with self._lock:
            return self._index.get(f"{namespace}/{adapter_id}")

    def list(self, namespace: str | None = None) -> list[AdapterRecord]:
        """Records sorted by (namespace, id); ``None`` lists every namespace."""
        with self._lock:
            records = [r for r in self._index.values() if namespace is None or r.namespace == namespace]
        return sorted(records, key=lambda r: (r.namespace, r.id))

    @property
    def quarantined(self) -> list[QuarantineEntry]:
        """What this process quarantined (at start-up or on load) and why."""
        with self._lock:
            return list(self._quarantined)

    # -- writes --------------------------------------------------------------------------------------------

    def put(
        self,
        namespace: str,
        adapter_id: str,
        config_bytes: bytes,
        weights_bytes: bytes,
        overwrite: bool = False,
        quota: StoreQuota | None = None,
    ) -> tuple[AdapterRecord, bool]:
        """Validate, then store atomically. Returns (record, created_or_changed).

        Same id and same content: (existing record, False), nothing written. Same id and other content:
        AdapterConflict unless ``overwrite``. Invalid input, or a namespace over its ``quota`` (the new version
        replaces an overwritten one in the count), raises before anything is written.
        """
        validate_namespace(namespace)
        validate_id(adapter_id)
        config_bytes, weights_bytes = bytes(config_bytes), bytes(weights_bytes)
        sha = adapter_sha256(config_bytes, weights_bytes)
        key = f"{namespace}/{adapter_id}"
        with self._lock:
            existing = self._check_existing(key, sha, overwrite)
            if existing is None:
                self._check_quota(namespace, key, len(weights_bytes), quota)
        if existing is not None:
            return existing, False
        adapter = self._parse(adapter_id, config_bytes, weights_bytes)
        created_at = time.time()
        staged = None
        try:
            staged = self._stage(namespace, adapter_id, config_bytes, weights_bytes, adapter, created_at)
            with self._lock:
                existing = self._check_existing(key, sha, overwrite)
                if existing is not None:
                    return existing, False
                self._check_quota(namespace, key, len(weights_bytes), quota)
                final = self.root / namespace / adapter_id
                self._commit(staged, final)
                record = _record(namespace, adapter_id, adapter, created_at, final)
                self._index[key] = record
        except OSError as e:
            raise AdapterError(
                f"could not store adapter '{adapter_id}': {e}", status=500, code="storage_error"
            ) from e
        finally:
            if staged is not None:
                remove_quietly(staged)
        logger.info("stored adapter %s (sha256 %s, %d bytes)", key, sha, len(weights_bytes))
        return record, True

    def delete(self, namespace: str, adapter_id: str) -> bool:
        """Remove an adapter from disk and the index; False if it was not there."""
        key = f"{namespace}/{adapter_id}"
        with self._lock:
            record = self._index.pop(key, None)
            if record is None:
                return False
            trash = self._tmp / f"{uuid.uuid4().hex}.del"
            try:
                os.replace(record.path, trash)
            except FileNotFoundError:
                pass
            except OSError as e:
                self._index[key] = record
                raise AdapterError(
                    f"could not delete adapter '{adapter_id}': {e}", status=500, code="storage_error"
                ) from e
            fsync_dir_quietly(record.path.parent)
        remove_quietly(trash)
        logger.info("deleted adapter %s", key)
        return True

    # -- reads ---------------------------------------------------------------------------------------------

    def load(self, record: AdapterRecord) -> LoraAdapter:
        """Read the files, check they hash to ``record.sha256`` and parse them.

        A mismatch on the current version quarantines it and raises AdapterCorrupt; a record replaced or
        deleted meanwhile raises AdapterNotFound.
        """
        try:
            config_bytes, weights_bytes = read_version(record)
        except VersionMismatch as e:
            self._raise_stale_or_corrupt(record, str(e))
        return self._parse(record.id, config_bytes, weights_bytes)

    # -- internals -----------------------------------------------------------------------------------------

    def _check_existing(self, key: str, sha: str, overwrite: bool) -> AdapterRecord | None:
        """The existing record if it has this content; AdapterConflict if it differs and not ``overwrite``."""
        existing = self._index.get(key)
        if existing is None:
            return None
        if existing.sha256 == sha:
            return existing
        if not overwrite:
            raise AdapterConflict(
                f"adapter '{existing.id}' already exists with other content (sha256 {existing.sha256}); "
                "upload with overwrite to replace it"
            )
        return None

    def _check_quota(self, namespace: str, key: str, size: int, quota: StoreQuota | None) -> None:
        if quota is None:
            return
        others = [r for r in self._index.values() if r.namespace == namespace and r.key != key]
        if quota.max_adapters is not None and len(others) + 1 > quota.max_adapters:
            raise StorageQuotaExceeded(f"namespace '{namespace}' already stores {len(others)} adapters, its limit "
                                       f"is {quota.max_adapters} (--max-adapters-per-tenant)")
        used = sum(r.size_bytes for r in others)
        if quota.max_bytes is not None and used + size > quota.max_bytes:
            raise StorageQuotaExceeded(f"namespace '{namespace}' stores {used} bytes of adapters; {size} more would "
                                       f"pass its limit of {quota.max_bytes} bytes (--max-adapter-mb-per-tenant)")

    def _raise_stale_or_corrupt(self, record: AdapterRecord, problem: str) -> NoReturn:
        with self._lock:
            current = self._index.get(record.key)
            if current is None or current.sha256 != record.sha256:
                raise AdapterNotFound(
                    f"adapter '{record.id}' (sha256 {record.sha256}) was deleted or replaced"
                )
            del self._index[record.key]
            reason = f"on load: {problem}"
            self._quarantine(record.key, record.path, reason)
        raise AdapterCorrupt(f"adapter '{record.id}' is corrupt on disk ({problem}); it was quarantined")

    def _stage(self, namespace: str, adapter_id: str, config_bytes: bytes, weights_bytes: bytes,
               adapter: LoraAdapter, created_at: float) -> Path:
        """Write a complete, fsynced version into root/.tmp/<random> and return its path."""
        meta = {
            "format": 1, "namespace": namespace, "id": adapter_id, "sha256": adapter.sha256,
            "created_at": created_at, "rank": adapter.rank, "alpha": adapter.alpha,
            "target_modules": list(adapter.target_modules), "size_bytes": adapter.size_bytes,
        }
        files = {CONFIG_FILE: config_bytes, WEIGHTS_FILE: weights_bytes, META_FILE: json.dumps(meta, indent=2).encode()}
        return stage_directory(self._tmp, files)

    def _commit(self, staged: Path, final: Path) -> None:
        if not final.parent.is_dir():
            os.makedirs(final.parent, exist_ok=True)
            fsync_dir(self.root)
        replace_directory(staged, final)

    def _start_up(self) -> None:
        for d in (self.root, self._tmp, self._quarantine_dir):
            os.makedirs(d, exist_ok=True)
        for leftover in self._tmp.iterdir():
            remove_quietly(leftover)
        for ns_dir in sorted(self.root.iterdir()):
            if ns_dir.name.startswith("."):
                continue
            if not ns_dir.is_dir() or not _is_valid_name(ns_dir.name):
                logger.warning("ignoring %s: not a namespace directory", ns_dir)
                continue
            self._recover_overwrites(ns_dir)
            for adapter_dir in sorted(ns_dir.iterdir()):
                self._index_dir(ns_dir.name, adapter_dir)
        logger.info(
            "adapter store %s: %d adapters, %d quarantined",
            self.root,
            len(self._index),
            len(self._quarantined),
        )

    def _recover_overwrites(self, ns_dir: Path) -> None:
        for aside in ns_dir.glob(".*.old"):
            final = ns_dir / aside.name[1 : -len(".old")]
            if final.exists():
                remove_quietly(aside)
            else:
                logger.warning("restoring %s after an interrupted overwrite", final)
                os.replace(aside, final)
        fsync_dir_quietly(ns_dir)

    def _index_dir(self, namespace: str, adapter_dir: Path) -> None:
        name = adapter_dir.name
        if name.startswith("."):
            return
        if not adapter_dir.is_dir() or not _is_valid_name(name):
            logger.warning("ignoring %s: not an adapter directory", adapter_dir)
            return
        key = f"{namespace}/{name}"
        try:
            self._index[key] = self._verify(namespace, name, adapter_dir)
        except _Corrupt as e:
            self._quarantine(key, adapter_dir, str(e))

    def _verify(self, namespace: str, adapter_id: str, adapter_dir: Path) -> AdapterRecord:
        try:
            meta = json.loads((adapter_dir / META_FILE).read_bytes())
            config_bytes = (adapter_dir / CONFIG_FILE).read_bytes()
            weights_bytes = (adapter_dir / WEIGHTS_FILE).read_bytes()
        except (OSError, ValueError) as e:
            raise _Corrupt(f"unreadable: {e}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("created_at"), int | float):
            raise _Corrupt(f"{META_FILE} is malformed")
        if (meta.get("namespace"), meta.get("id")) != (namespace, adapter_id):
            raise _Corrupt(f"{META_FILE} names {meta.get('namespace')!r}/{meta.get('id')!r}")
        sha = adapter_sha256(config_bytes, weights_bytes)
        if sha != meta.get("sha256"):
            raise _Corrupt(f"files hash to {sha}, {META_FILE} records {meta.get('sha256')}")
        try:
            adapter = self._parse(adapter_id, config_bytes, weights_bytes)
        except AdapterError as e:
            raise _Corrupt(f"no longer valid for this server: {e.message}") from None
        return _record(namespace, adapter_id, adapter, float(meta["created_at"]), adapter_dir)

    def _quarantine(self, key: str, adapter_dir: Path, reason: str) -> None:
        dest: Path | None = self._quarantine_dir / f"{key.replace('/', '__')}__{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(self._quarantine_dir, exist_ok=True)
            os.replace(adapter_dir, dest)
            (dest / REASON_FILE).write_text(reason + "\n")
        except OSError:
            logger.exception("could not move %s to quarantine", adapter_dir)
            dest = dest if dest.exists() else None
        logger.error("quarantined adapter %s: %s", key, reason)
        self._quarantined.append(QuarantineEntry(key=key, reason=reason, path=dest, at=time.time()))


def _record(
    namespace: str, adapter_id: str, adapter: LoraAdapter, created_at: float, path: Path
) -> AdapterRecord:
    return AdapterRecord(
        identity=AdapterIdentity(namespace, adapter_id, adapter.sha256),
        rank=adapter.rank,
        alpha=adapter.alpha,
        target_modules=adapter.target_modules,
        size_bytes=adapter.size_bytes,
        created_at=created_at,
        path=path,
        kind=adapter.kind,
        virtual_tokens=0 if adapter.virtual is None else adapter.virtual.count,
        composable=adapter.composable,
    )


class VersionMismatch(Exception):
    """The files of a record are missing or hash to other content."""


def read_version(record: AdapterRecord, directory: Path | None = None) -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of the version `record` names, from `directory` (default: the record's
    own path); VersionMismatch if they are missing or are another version."""
    directory = record.path if directory is None else directory
    try:
        config_bytes = (directory / CONFIG_FILE).read_bytes()
        weights_bytes = (directory / WEIGHTS_FILE).read_bytes()
    except FileNotFoundError:
        raise VersionMismatch("its files are missing") from None
    sha = adapter_sha256(config_bytes, weights_bytes)
    if sha != record.sha256:
        raise VersionMismatch(f"its files hash to {sha}, not the recorded {record.sha256}")
    return config_bytes, weights_bytes


def _is_valid_name(name: str) -> bool:
    try:
        validate_id(name)
    except AdapterValidationError:
        return False
    return True
