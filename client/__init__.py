"""Python client and ``loramux`` CLI of the loramux server (sync and asyncio, streaming, adapter management)."""

from .aio import AsyncLoramuxClient
from .errors import (
    AdapterDirError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    LoramuxConnectionError,
    LoramuxError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from .sync import LoramuxClient
from .types import (
    AdapterInfo,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    CompletionChunk,
    ModelInfo,
    Usage,
)

__all__ = [
    "AdapterDirError",
    "AdapterInfo",
    "AsyncLoramuxClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "Completion",
    "CompletionChunk",
    "ConflictError",
    "InternalServerError",
    "LoramuxClient",
    "LoramuxConnectionError",
    "LoramuxError",
    "ModelInfo",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
    "Usage",
]
