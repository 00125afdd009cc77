"""Pure request building and response parsing shared by the sync and async clients.

Each API operation is a function returning a :class:`Call` (what to send, how to parse the answer) or a
:class:`StreamCall` (an SSE request and how to type its chunks); the clients only do the I/O.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from .errors import AdapterDirError, LoramuxConnectionError, LoramuxError, error_class
from .multipart import FilePart, MultipartBody, Progress
from .sse import DONE, SSEDecoder
from .types import (
    AdapterInfo,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    CompletionChunk,
    ModelInfo,
)

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request/response exchange; ``parse`` gets the response once its status is acceptable."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, str] | None = None
    json: Any = None
    body: MultipartBody | None = None
    progress: Progress | None = None
    accept: frozenset[int] = frozenset()  # non-2xx statuses that ``parse`` handles itself

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx.Client.request`` (a multipart body as a sync byte iterator)."""
        kwargs: dict[str, Any] = {"method": self.method, "url": self.path, "params": self.params}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.body is not None:
            kwargs["content"] = self.body.iter_bytes(self.progress)
            kwargs["headers"] = {"Content-Type": self.body.content_type, "Content-Length": str(self.body.length())}
        return kwargs

    def finish(self, response: httpx.Response) -> T:
        """Raise the server's error for a non-2xx answer (unless accepted), else parse it."""
        if not response.is_success and response.status_code not in self.accept:
            raise error_from_response(response)
        return self.parse(response)


@dataclass(frozen=True)
class StreamCall(Generic[T]):
    """A POST answered by server-sent events, each ``data`` a JSON object typed by ``chunk``."""

    path: str
    json: dict[str, Any]
    chunk: Callable[[dict[str, Any]], T]


@dataclass
class ChunkReader(Generic[T]):
    """Feed SSE lines; get typed chunks; ``done`` once ``data: [DONE]`` arrives. Raises on error events."""

    chunk: Callable[[dict[str, Any]], T]
    done: bool = False
    _decoder: SSEDecoder = field(default_factory=SSEDecoder)

    def feed(self, line: str) -> T | None:
        return self._event(self._decoder.feed(line))

    def finish(self) -> T | None:
        return self._event(self._decoder.flush())

    def _event(self, data: str | None) -> T | None:
        if data is None or self.done:
            return None
        if data.strip() == DONE:
            self.done = True
            return None
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            raise LoramuxError(None, f"invalid event in the server's stream: {data[:200]!r}") from None
        if isinstance(obj, dict) and "error" in obj:
            message, type_, code, param = _error_fields(obj)
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            raise error_class(status)(status, message or "error in stream", type_, code, param=param)
        return self.chunk(obj)


# --- connection --------------------------------------------------------------------------------------------


def normalize_base_url(url: str) -> str:
    """Strip a trailing slash and a trailing ``/v1`` (OpenAI-style base URLs work too)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def connection_error(base_url: str, exc: httpx.TransportError) -> LoramuxConnectionError:
    if isinstance(exc, httpx.ConnectError):
        return LoramuxConnectionError(None, f"cannot reach the loramux server at {base_url}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return LoramuxConnectionError(None, f"request to {base_url} timed out ({type(exc).__name__})")
    return LoramuxConnectionError(None, f"request to {base_url} failed: {type(exc).__name__}: {exc}")


# --- errors --------------------------------------------------------------------------------------------------


def error_from_response(response: httpx.Response) -> LoramuxError:
    """The exception for a non-2xx response (its body must have been read)."""
    status = response.status_code
    message, type_, code, param = _error_fields(_maybe_json(response.content))
    if not message:
        message = f"HTTP {status} {response.reason_phrase}".strip()
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    return error_class(status)(status, message, type_, code, retry_after, param)


def _maybe_json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace").strip()[:1000]


def _error_fields(body: Any) -> tuple[str, str | None, str | int | None, str | None]:
    """(message, type, code, param) from an OpenAI error body, a FastAPI ``detail`` body or plain text."""
    if isinstance(body, str):
        return body, None, None, None
    if not isinstance(body, dict):
        return "", None, None, None
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or ""), err.get("type"), err.get("code"), err.get("param")
    if isinstance(err, str):
        return err, body.get("type"), body.get("code"), None
    detail = body.get("detail")
    if isinstance(detail, str):
        return detail, None, None, None
    if isinstance(detail, list):
        return "; ".join(_validation_item(d) for d in detail), "invalid_request_error", None, None
    return str(body.get("message") or ""), None, None, None


def _validation_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
    return f"{'.'.join(loc)}: {item.get('msg', '')}" if loc else str(item.get("msg", item))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# --- parsing helpers -------------------------------------------------------------------------------------------


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise LoramuxError(response.status_code, f"the server's answer is not JSON: {response.text[:200]!r}") from None


def _items(body: Any) -> list[Any]:
    """The list of an answer: a bare list or ``{"data": [...]}`` (also ``adapters``/``models``)."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        for key in ("data", "adapters", "models"):
            if isinstance(body.get(key), list):
                return body[key]
    raise LoramuxError(None, f"unexpected list answer from the server: {str(body)[:200]}")


def _adapter(body: Any, adapter_id: str) -> AdapterInfo:
    if isinstance(body, dict) and isinstance(body.get("adapter"), dict):
        body = body["adapter"]
    data = body if isinstance(body, dict) else {}
    return AdapterInfo.model_validate({"id": adapter_id, **data})


def _body_dict(response: httpx.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    body = _json(response)
    return body if isinstance(body, dict) else {"result": body}


def _query(**values: Any) -> dict[str, str] | None:
    """Query parameters without the None ones; booleans as ``true``."""
    params = {k: ("true" if v is True else str(v)) for k, v in values.items() if v is not None and v is not False}
    return params or None


def _adapter_path(adapter_id: str, suffix: str = "") -> str:
    return f"/v1/adapters/{quote(adapter_id, safe='')}{suffix}"


# --- inference ----------------------------------------------------------------------------------------------------


def composition(adapters: Mapping[str, float] | Iterable[Any]) -> list[dict[str, Any]]:
    """The API's `adapters` list from ``{"legal": 0.7, "french": 0.3}``, ``[("legal", 0.7), ...]`` or
    ``[{"id": "legal", "weight": 0.7}, ...]`` (a bare id has weight 1)."""
    items = adapters.items() if isinstance(adapters, Mapping) else adapters
    out = []
    for item in items:
        if isinstance(item, Mapping):
            out.append(dict(item))
        elif isinstance(item, str):
            out.append({"id": item, "weight": 1.0})
        else:
            adapter_id, weight = item
            out.append({"id": adapter_id, "weight": float(weight)})
    return out


def _params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Request fields without the None ones; `adapters` in any form ``composition`` takes."""
    body = {k: v for k, v in params.items() if v is not None}
    if "adapters" in body:
        body["adapters"] = composition(body["adapters"])
    return body


def complete(model: str, prompt: Any, params: Mapping[str, Any]) -> Call[Completion]:
    body = {**_params(params), "model": model, "prompt": prompt, "stream": False}
    return Call("POST", "/v1/completions", lambda r: Completion.model_validate(_json(r)), json=body)


def complete_stream(model: str, prompt: Any, params: Mapping[str, Any]) -> StreamCall[CompletionChunk]:
    body = {**_params(params), "model": model, "prompt": prompt, "stream": True}
    return StreamCall("/v1/completions", body, CompletionChunk.model_validate)


def _messages(messages: Iterable[Mapping[str, Any] | ChatMessage]) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else dict(m) for m in messages]


def chat(model: str, messages: Iterable[Any], params: Mapping[str, Any]) -> Call[ChatCompletion]:
    body = {**_params(params), "model": model, "messages": _messages(messages), "stream": False}
    return Call("POST", "/v1/chat/completions", lambda r: ChatCompletion.model_validate(_json(r)), json=body)


def chat_stream(model: str, messages: Iterable[Any], params: Mapping[str, Any]) -> StreamCall[ChatCompletionChunk]:
    body = {**_params(params), "model": model, "messages": _messages(messages), "stream": True}
    return StreamCall("/v1/chat/completions", body, ChatCompletionChunk.model_validate)


# --- adapters ----------------------------------------------------------------------------------------------------


def adapter_files(adapter_dir: str | Path) -> tuple[Path, Path]:
    """(adapter_config.json, adapter_model.safetensors) of a PEFT directory; refuses pickle-only weights."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterDirError(None, f"{d} is not a directory")
    config, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not config.is_file():
        raise AdapterDirError(None, f"{d} has no adapter_config.json: is it a PEFT adapter directory?")
    if not weights.is_file():
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterDirError(
                None,
                f"{d} has pickle weights only ({', '.join(pickles)}); loramux never loads pickle files: "
                "save the adapter as adapter_model.safetensors (PEFT save_pretrained(..., safe_serialization=True))",
            )
        raise AdapterDirError(None, f"{d} has no adapter_model.safetensors")
    return config, weights


def upload(
    adapter_dir: str | Path,
    adapter_id: str,
    *,
    overwrite: bool = False,
    shared: bool = False,
    tenant: str | None = None,
    progress: Progress | None = None,
) -> Call[AdapterInfo]:
    config, weights = adapter_files(adapter_dir)
    fields = {"id": adapter_id, **({"shared": "true"} if shared else {})}
    files = [
        FilePart("config", config, config.name, "application/json"),
        FilePart("weights", weights, weights.name, "application/octet-stream"),
    ]

    def parse(r: httpx.Response) -> AdapterInfo:
        info = _adapter(_json(r), adapter_id)
        info.is_new = r.status_code == 201
        return info

    body = MultipartBody.build(fields, files)
    return Call("POST", "/v1/adapters", parse, _query(overwrite=overwrite, tenant=tenant), body=body, progress=progress)


def list_adapters(tenant: str | None = None) -> Call[list[AdapterInfo]]:
    def parse(r: httpx.Response) -> list[AdapterInfo]:
        return [AdapterInfo.model_validate(a) for a in _items(_json(r))]

    return Call("GET", "/v1/adapters", parse, _query(tenant=tenant))


def get_adapter(adapter_id: str, tenant: str | None = None) -> Call[AdapterInfo]:
    return Call("GET", _adapter_path(adapter_id), lambda r: _adapter(_json(r), adapter_id), _query(tenant=tenant))


def load(adapter_id: str, pin: bool = False, tenant: str | None = None) -> Call[AdapterInfo]:
    return Call(
        "POST",
        _adapter_path(adapter_id, "/load"),
        lambda r: _adapter(_body_dict(r), adapter_id),
        _query(pin=pin, tenant=tenant),
    )


def evict(adapter_id: str, tenant: str | None = None) -> Call[dict[str, Any]]:
    return Call("DELETE", _adapter_path(adapter_id), _body_dict, _query(tenant=tenant))


def delete(adapter_id: str, tenant: str | None = None) -> Call[dict[str, Any]]:
    return Call("DELETE", _adapter_path(adapter_id), _body_dict, _query(purge=True, tenant=tenant))


# --- service -------------------------------------------------------------------------------------------------------


def models() -> Call[list[ModelInfo]]:
    return Call("GET", "/v1/models", lambda r: [ModelInfo.model_validate(m) for m in _items(_json(r))])


def health() -> Call[dict[str, Any]]:
    return Call("GET", "/health", lambda r: _body_dict(r) if _is_json(r) else {"status": r.text.strip()})


def ready() -> Call[bool]:
    return Call("GET", "/ready", lambda r: r.is_success, accept=frozenset({503}))


def _is_json(response: httpx.Response) -> bool:
    return "json" in response.headers.get("content-type", "")
