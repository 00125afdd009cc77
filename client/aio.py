"""Asyncio client: ``async with AsyncLoramuxClient(url) as c: await c.complete("my-adapter", "Hello")``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

from . import protocol
from .multipart import Progress
from .types import AdapterInfo, ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelInfo

T = TypeVar("T")


async def _in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Read a blocking byte iterator (file chunks of an upload) off the event loop."""
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk


class AsyncLoramuxClient:
    """Async twin of :class:`~client.sync.LoramuxClient` (same methods, awaited; streams are async iterators).

    Upload progress callbacks run in a worker thread.
    """

    def __init__(
        self,
        base_url: str = protocol.DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = protocol.DEFAULT_TIMEOUT,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = protocol.normalize_base_url(base_url)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=protocol.headers(api_key), timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncLoramuxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, call: protocol.Call[T]) -> T:
        kwargs = call.request_kwargs()
        if "content" in kwargs:
            kwargs["content"] = _in_thread(kwargs["content"])
        try:
            response = await self._http.request(**kwargs)
        except httpx.TransportError as e:
            raise protocol.connection_error(self.base_url, e) from e
        return call.finish(response)

    async def _stream(self, call: protocol.StreamCall[T]) -> AsyncIterator[T]:
        reader = protocol.ChunkReader(call.chunk)
        try:
            async with self._http.stream("POST", call.path, json=call.json) as response:
                if not response.is_success:
                    await response.aread()
                    raise protocol.error_from_response(response)
                async for line in response.aiter_lines():
                    if (chunk := reader.feed(line)) is not None:
                        yield chunk
                    if reader.done:
                        return
        except httpx.TransportError as e:
            raise protocol.connection_error(self.base_url, e) from e
        if (chunk := reader.finish()) is not None:
            yield chunk

    # inference

    async def complete(self, model: str, prompt: Any, **params: Any) -> Completion:
        return await self._run(protocol.complete(model, prompt, params))

    def complete_stream(self, model: str, prompt: Any, **params: Any) -> AsyncIterator[CompletionChunk]:
        """``async for chunk in client.complete_stream(...)``; errors are raised when iteration starts."""
        return self._stream(protocol.complete_stream(model, prompt, params))

    async def chat(self, model: str, messages: Iterable[Mapping[str, Any]], **params: Any) -> ChatCompletion:
        return await self._run(protocol.chat(model, messages, params))

    def chat_stream(
        self, model: str, messages: Iterable[Mapping[str, Any]], **params: Any
    ) -> AsyncIterator[ChatCompletionChunk]:
        return self._stream(protocol.chat_stream(model, messages, params))

    # adapters

    async def upload(
        self,
        adapter_dir: str | Path,
        id: str,
        *,
        overwrite: bool = False,
        shared: bool = False,
        tenant: str | None = None,
        progress: Progress | None = None,
    ) -> AdapterInfo:
        return await self._run(
            protocol.upload(adapter_dir, id, overwrite=overwrite, shared=shared, tenant=tenant, progress=progress)
        )

    async def list_adapters(self, *, tenant: str | None = None) -> list[AdapterInfo]:
        return await self._run(protocol.list_adapters(tenant))

    async def get_adapter(self, id: str, *, tenant: str | None = None) -> AdapterInfo:
        return await self._run(protocol.get_adapter(id, tenant))

    async def load(self, id: str, pin: bool = False, *, tenant: str | None = None) -> AdapterInfo:
        return await self._run(protocol.load(id, pin, tenant))

    async def evict(self, id: str, *, tenant: str | None = None) -> dict[str, Any]:
        return await self._run(protocol.evict(id, tenant))

    async def delete(self, id: str, *, tenant: str | None = None) -> dict[str, Any]:
        return await self._run(protocol.delete(id, tenant))

    # service

    async def models(self) -> list[ModelInfo]:
        return await self._run(protocol.models())

    async def health(self) -> dict[str, Any]:
        return await self._run(protocol.health())

    async def ready(self) -> bool:
        return await self._run(protocol.ready())
