"""Blocking client: ``with LoramuxClient(url, api_key) as c: c.complete("my-adapter", "Hello")``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

from . import protocol
from .multipart import Progress
from .types import AdapterInfo, ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelInfo

T = TypeVar("T")


class LoramuxClient:
    """Client of a loramux server. Every non-2xx answer raises a :class:`~client.errors.LoramuxError`.

    ``transport`` replaces httpx's network transport (tests pass an ``httpx.MockTransport``).
    ``tenant`` on adapter methods lets an admin address another tenant's adapters.
    """

    def __init__(
        self,
        base_url: str = protocol.DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = protocol.DEFAULT_TIMEOUT,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = protocol.normalize_base_url(base_url)
        self._http = httpx.Client(
            base_url=self.base_url, headers=protocol.headers(api_key), timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LoramuxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: protocol.Call[T]) -> T:
        try:
            response = self._http.request(**call.request_kwargs())
        except httpx.TransportError as e:
            raise protocol.connection_error(self.base_url, e) from e
        return call.finish(response)

    def _stream(self, call: protocol.StreamCall[T]) -> Iterator[T]:
        reader = protocol.ChunkReader(call.chunk)
        try:
            with self._http.stream("POST", call.path, json=call.json) as response:
                if not response.is_success:
                    response.read()
                    raise protocol.error_from_response(response)
                for line in response.iter_lines():
                    if (chunk := reader.feed(line)) is not None:
                        yield chunk
                    if reader.done:
                        return
        except httpx.TransportError as e:
            raise protocol.connection_error(self.base_url, e) from e
        if (chunk := reader.finish()) is not None:
            yield chunk

    # inference

    def complete(self, model: str, prompt: Any, **params: Any) -> Completion:
        """``POST /v1/completions``; ``model`` is an adapter id or the base model's name.

        ``adapters={"legal": 0.7, "french": 0.3}`` (with ``model`` the base model's name) composes adapters."""
        return self._run(protocol.complete(model, prompt, params))

    def complete_stream(self, model: str, prompt: Any, **params: Any) -> Iterator[CompletionChunk]:
        """Stream a completion; errors are raised when iteration starts."""
        return self._stream(protocol.complete_stream(model, prompt, params))

    def chat(self, model: str, messages: Iterable[Mapping[str, Any]], **params: Any) -> ChatCompletion:
        """``POST /v1/chat/completions`` with ``messages`` like ``[{"role": "user", "content": "Hi"}]``."""
        return self._run(protocol.chat(model, messages, params))

    def chat_stream(
        self, model: str, messages: Iterable[Mapping[str, Any]], **params: Any
    ) -> Iterator[ChatCompletionChunk]:
        """Stream a chat completion; each chunk's ``text`` is the new content."""
        return self._stream(protocol.chat_stream(model, messages, params))

    # adapters

    def upload(
        self,
        adapter_dir: str | Path,
        id: str,
        *,
        overwrite: bool = False,
        shared: bool = False,
        tenant: str | None = None,
        progress: Progress | None = None,
    ) -> AdapterInfo:
        """Upload a PEFT directory; ``progress(sent, total)`` is called as the body streams out."""
        return self._run(
            protocol.upload(adapter_dir, id, overwrite=overwrite, shared=shared, tenant=tenant, progress=progress)
        )

    def list_adapters(self, *, tenant: str | None = None) -> list[AdapterInfo]:
        return self._run(protocol.list_adapters(tenant))

    def get_adapter(self, id: str, *, tenant: str | None = None) -> AdapterInfo:
        return self._run(protocol.get_adapter(id, tenant))

    def load(self, id: str, pin: bool = False, *, tenant: str | None = None) -> AdapterInfo:
        """Make the adapter resident now; ``pin=True`` keeps it resident."""
        return self._run(protocol.load(id, pin, tenant))

    def evict(self, id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Drop the adapter from memory (it stays stored); returns the server's answer."""
        return self._run(protocol.evict(id, tenant))

    def delete(self, id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Delete the adapter from the store (``DELETE ?purge=true``)."""
        return self._run(protocol.delete(id, tenant))

    # service

    def models(self) -> list[ModelInfo]:
        return self._run(protocol.models())

    def health(self) -> dict[str, Any]:
        return self._run(protocol.health())

    def ready(self) -> bool:
        """True when the server is ready, False while it answers 503."""
        return self._run(protocol.ready())
