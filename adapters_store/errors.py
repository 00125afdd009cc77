"""Typed errors: every error carries what the HTTP layer answers, and travels to it unchanged.

``ServingError`` is the base of the store's errors (here) and of the engine's (``server/errors.py``):
a human-readable ``message`` (naming the adapter and the numbers), an HTTP ``status``, a short snake_case
``code`` and, for 429/503, ``retry_after`` seconds.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: ``message`` (str), ``status`` (HTTP status), ``code`` (snake_case), ``retry_after`` (s)."""

    status: int = 500
    code: str = "error"
    retry_after: float | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after

    def __reduce__(self):
        """Pickle with the instance's own status/code (a cluster replica hands errors to its ingress)."""
        return type(self), (self.message,), dict(self.__dict__)


class AdapterError(ServingError):
    code = "adapter_error"


class AdapterValidationError(AdapterError):
    """The adapter (or an id) is invalid: 400; 413 for size caps, 422 when it does not fit the base model."""

    status = 400
    code = "invalid_adapter"


class AdapterNotFound(AdapterError):
    status = 404
    code = "adapter_not_found"


class AdapterConflict(AdapterError):
    """Same id, other content, and no overwrite requested."""

    status = 409
    code = "adapter_conflict"


class StorageQuotaExceeded(AdapterError):
    """The namespace already stores as many adapters, or bytes, as its quota allows."""

    status = 429
    code = "storage_quota_exceeded"


class AdapterCorrupt(AdapterError):
    """The stored files no longer match their recorded sha256; the adapter was quarantined."""

    status = 500
    code = "adapter_corrupt"


class NoFreeSlot(AdapterError):
    """Every device slot is pinned or in use by in-flight requests."""

    status = 503
    code = "no_free_slot"
    retry_after = 1.0
