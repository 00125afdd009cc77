"""Exception types of the adapter store.

Every error carries what the HTTP layer needs to answer: a human-readable
``message`` (naming the adapter and the numbers), an HTTP ``status`` and a short
snake_case ``code``.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class: ``message`` (str), ``status`` (HTTP status), ``code`` (snake_case)."""

    status: int = 500
    code: str = "adapter_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


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


class AdapterCorrupt(AdapterError):
    """The stored files no longer match their recorded sha256; the adapter was quarantined."""

    status = 500
    code = "adapter_corrupt"


class NoFreeSlot(AdapterError):
    """Every device slot is pinned or in use by in-flight requests."""

    status = 503
    code = "no_free_slot"


class AdapterBusy(AdapterError):
    """The operation cannot proceed while the adapter is in use."""

    status = 409
    code = "adapter_busy"
