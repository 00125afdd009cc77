"""Exceptions raised by the loramux client.

Every non-2xx answer becomes a :class:`LoramuxError` (a subclass chosen by HTTP status) carrying the
server's OpenAI-style error body ``{"error": {"message", "type", "code"}}``. Failures before an answer
(connection refused, an adapter directory that cannot be uploaded) are ``LoramuxError`` with ``status=None``.
"""

from __future__ import annotations


class LoramuxError(Exception):
    """An error from the server (``status`` set) or from the client side (``status`` is None)."""

    def __init__(
        self,
        status: int | None,
        message: str,
        type: str | None = None,
        code: str | int | None = None,
        retry_after: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.retry_after = retry_after  # seconds, from the Retry-After header (429/503)
        self.param = param  # the request field at fault, when the server names one

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, message={self.message!r}, code={self.code!r})"


class BadRequestError(LoramuxError):
    """400."""


class AuthenticationError(LoramuxError):
    """401: missing or unknown API key."""


class PermissionDeniedError(LoramuxError):
    """403: the key's role may not do this."""


class NotFoundError(LoramuxError):
    """404: no such adapter or model (for this tenant)."""


class ConflictError(LoramuxError):
    """409: same adapter id with other content (upload with ``overwrite=True``), or the adapter is busy."""


class PayloadTooLargeError(LoramuxError):
    """413: the upload exceeds the server's size cap."""


class UnprocessableEntityError(LoramuxError):
    """422: the request or adapter does not fit the model (e.g. rank, shapes, context length)."""


class RateLimitError(LoramuxError):
    """429: the tenant is over its concurrency quota; retry after ``retry_after`` seconds."""


class ServiceUnavailableError(LoramuxError):
    """503: the server is overloaded or not ready; retry after ``retry_after`` seconds."""


class InternalServerError(LoramuxError):
    """Any other 5xx."""


class LoramuxConnectionError(LoramuxError):
    """The server could not be reached, or the connection broke before an answer."""


class AdapterDirError(LoramuxError, ValueError):
    """The local adapter directory cannot be uploaded (missing files, pickle-only weights)."""


STATUS_ERRORS: dict[int, type[LoramuxError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class(status: int) -> type[LoramuxError]:
    """The exception class for an HTTP status."""
    if status in STATUS_ERRORS:
        return STATUS_ERRORS[status]
    return InternalServerError if status >= 500 else LoramuxError
