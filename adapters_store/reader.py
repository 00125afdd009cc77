"""A read-only view of an adapter store that another process writes (a cluster replica's view).

The writer (the cluster's ingress) indexes, validates, quarantines and cleans up; a reader only loads the
versions its requests name, by their records. It never writes to the directory: a version deleted or
replaced since the request was routed is AdapterNotFound, never a reason to quarantine the new one.
"""

from __future__ import annotations

from pathlib import Path

from adapters_store.errors import AdapterNotFound
from adapters_store.format import LoraAdapter
from adapters_store.store import AdapterRecord, ParseFn, VersionMismatch, read_version


class StoreReader:
    def __init__(self, root: Path, parse: ParseFn) -> None:
        self.root = Path(root)
        self._parse = parse

    def load(self, record: AdapterRecord) -> LoraAdapter:
        """Parse the version `record` names, from this reader's root (the writer may mount it elsewhere)."""
        try:
            config_bytes, weights_bytes = read_version(record, self.root / record.namespace / record.id)
        except VersionMismatch as e:
            raise AdapterNotFound(f"adapter '{record.id}' (sha256 {record.sha256}) was deleted or replaced: "
                                  f"{e}") from None
        return self._parse(record.id, config_bytes, weights_bytes)
