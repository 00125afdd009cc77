"""The engine's typed errors; like the store's (``adapters_store.errors``) they carry their HTTP answer."""

from __future__ import annotations

from adapters_store.errors import ServingError


class EngineError(ServingError):
    code = "engine_error"


class InvalidRequest(EngineError, ValueError):
    """A request that can never be served (context length, vocabulary, n): 400 naming the numbers."""

    status = 400
    code = "invalid_request"


class EngineOverloaded(EngineError):
    """The waiting queue is full (HTTP 503 with Retry-After)."""

    status = 503
    code = "server_overloaded"
    retry_after = 1.0


class TenantOverQuota(EngineError):
    """The request's tenant is over one of its quotas (HTTP 429 with Retry-After)."""

    status = 429
    code = "tenant_over_quota"
    retry_after = 1.0


class EngineStopped(EngineError):
    """The engine is shutting down or died; no new requests are taken (HTTP 503)."""

    status = 503
    code = "engine_stopped"
    retry_after = 5.0


class GenerationFailed(EngineError):
    """The forward pass of a step failed; the step's requests end with this error."""

    status = 500
    code = "generation_error"
