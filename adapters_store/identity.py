"""The one identity of an adapter version: namespace, id and content hash.

The store indexes adapters by name (``namespace/id``); everything that holds an adapter's *content* (host
copies, device slots, the router's merged adapter, metrics and logs) names it by identity, so an overwrite
is a new identity and nothing keyed by the old one can serve the new content, or the other way round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters_store.errors import AdapterValidationError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class AdapterIdentity:
    namespace: str
    id: str
    sha256: str  # adapter_sha256(config bytes, weights bytes)

    @property
    def key(self) -> str:
        """The name across versions, ``namespace/id`` (metric label, store index key)."""
        return f"{self.namespace}/{self.id}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.id}@{self.sha256[:12]}"


def validate_id(s: str, what: str = "adapter id") -> str:
    """Return ``s`` if it is a valid id: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` without '..'."""
    if not isinstance(s, str) or not _NAME_RE.fullmatch(s) or ".." in s:
        raise AdapterValidationError(
            f"invalid {what} {s!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or "
            "digit, without '..'",
            code="invalid_id",
        )
    return s


def validate_namespace(s: str) -> str:
    return validate_id(s, "namespace")
